"""The HTTP sidecar: the Trigger API over HTTP, and the gateway triggers' routes."""
