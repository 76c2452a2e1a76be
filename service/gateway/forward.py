"""Gateway triggers: the sidecar's dynamic HTTP routes, reconciled from the bucket (stub)."""

from __future__ import annotations

from types import TracebackType

from aiohttp import web
from nats.aio.client import Client

from service.config import Settings
from service.store import TriggerStore


class GatewayRoutes:
    """Serves every live gateway trigger's METHOD path; follows the bucket."""

    def __init__(self, settings: Settings, nc: Client, store: TriggerStore) -> None:
        self._settings = settings
        self._nc = nc
        self._store = store

    async def __aenter__(self) -> GatewayRoutes:
        """Load every live gateway trigger, then follow the bucket's changes."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop following the bucket."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one HTTP request on a gateway trigger's route, or 404."""
        return web.json_response({"error": "Not found: no such route", "status_code": 404}, status=404)
