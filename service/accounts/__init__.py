"""Accounts mode: stream triggers as real NATS account exports and imports."""
