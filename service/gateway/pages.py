"""The sidecar's web pages: `/docs` (Swagger UI over `/openapi.json`) and `/console`, with their assets.

Every asset is served by the sidecar itself, Swagger UI's from the `swagger-ui-py` package, so the
pages work on a machine without internet; their Content-Security-Policy lets the browser load and
connect to this origin only. The pages hold no data: the console asks `/console/api/` for it, with
the caller's bearer token.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from aiohttp import web

from service.errors import MethodNotAllowed
from service.gateway.api import ExpectHandler, Handler, error_response

_STATIC = Path(__file__).parent / "static"


def _swagger_ui() -> Path:
    """Swagger UI's bundled assets, found without importing the package (it has nothing else we use)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise RuntimeError("the swagger-ui-py package is not installed (it serves /docs)")
    return Path(spec.origin).parent / "static"


_SWAGGER_UI = _swagger_ui()
# path -> (file, content type); each is also reserved (service/paths.py keeps /docs/ and /console/).
_FILES: dict[str, tuple[Path, str]] = {
    "/docs": (_STATIC / "docs.html", "text/html; charset=utf-8"),
    "/docs/docs.js": (_STATIC / "docs.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-ui.css": (_SWAGGER_UI / "swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/swagger-ui-bundle.js": (_SWAGGER_UI / "swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/console": (_STATIC / "console.html", "text/html; charset=utf-8"),
    "/console/console.js": (_STATIC / "console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": (_STATIC / "console.css", "text/css; charset=utf-8"),
}
# Swagger UI sets inline styles and shows its icons as data: images; scripts come from files only.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag), so an upgraded sidecar serves its own
}


def add_pages(router: web.UrlDispatcher, expect_handler: ExpectHandler | None = None) -> None:
    """Register every page and asset (GET and HEAD); another method answers 405."""
    for path, (file, content_type) in _FILES.items():
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise RuntimeError(f"{path}: {file} is missing from the installation") from exc
        serve = _served(content, content_type)
        resource = router.add_resource(path)
        resource.add_route("GET", serve, expect_handler=expect_handler)
        resource.add_route("HEAD", serve, expect_handler=expect_handler)
        resource.add_route("*", not_read, expect_handler=expect_handler)


def _served(content: bytes, content_type: str) -> Handler:
    """A handler of one file, read once; a browser's copy that is still current gets a 304."""
    etag = f'"{hashlib.sha256(content).hexdigest()[:32]}"'
    headers = {**_HEADERS, "ETag": etag}

    async def serve(request: web.Request) -> web.Response:
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=content, headers={**headers, "Content-Type": content_type})

    return serve


async def not_read(request: web.Request) -> web.Response:
    """405 for a method other than GET and HEAD on a read-only resource."""
    error = MethodNotAllowed(f"{request.method} {request.path} (allowed: GET, HEAD)")
    return error_response(error, headers={"Allow": "GET, HEAD"})
