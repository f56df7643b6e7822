"""The dashboard: static files served by the API itself at `/` (no CDN, no build step).

The page is plain ES modules that call the same-origin REST API with the key the user signs
in with (kept in the tab's sessionStorage). Every dashboard response carries a strict
Content-Security-Policy: scripts, styles and requests come from this origin only."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/dashboard"  # the assets; the API stays under /v1, /docs, /healthz, …

# No inline script or style anywhere; uPlot sets element styles through the CSSOM, which
# style-src does not govern. Downloads are blob: URLs made by the page.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _Assets(StaticFiles):
    """The dashboard's files, each with the security headers and revalidated on every load
    (a new release's page must not run with an old module)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under /dashboard/."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={**HEADERS, "Cache-Control": "no-cache"})

    app.mount(PREFIX, _Assets(directory=STATIC), name="dashboard")
