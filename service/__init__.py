"""The Trigger Service: a NATS micro service that manages triggers and makes them live."""

__version__ = "0.1.0"
