"""The admin HTTP application: JSON API, dashboard, health and metrics."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from db.errors import Conflict, DbError, NotFound
from db.queue import SessionFactory
from node.admin import api
from node.admin.auth import AuthError, Guard, LoginThrottled
from node.admin.catalog import ModelInfo
from node.admin.context import AdminContext, Echo, context
from node.admin.health import readiness
from node.admin.middleware import BodyLimit, TrustedHosts
from node.runtime.clock import utcnow
from node.runtime.metrics import make_registry
from node.send.sender import echo as c_echo
from node.settings import LOOPBACK_HOSTS, AdminSettings, Settings

log = logging.getLogger("ainode.admin")

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(settings: Settings, factory: SessionFactory, *,
               models: Callable[[], list[ModelInfo]],
               clock: Callable[[], datetime] = utcnow, echo: Echo = c_echo,
               receiver_problem: Callable[[], str | None] | None = None) -> FastAPI:
    """Build the admin app; raises ConfigError when bound off loopback without credentials."""
    guard = Guard.for_settings(settings.admin)
    ctx = AdminContext(settings=settings, factory=factory, clock=clock, guard=guard,
                       models=models, echo=echo, receiver_problem=receiver_problem)
    app = FastAPI(title="ainode admin API", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.ctx = ctx
    registry = make_registry(factory, clock)
    _guard_requests(app, settings.admin)

    @app.exception_handler(DbError)
    async def db_error(_request: Request, exc: DbError) -> JSONResponse:
        code = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.exception_handler(AuthError)
    async def auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        if isinstance(exc, LoginThrottled):
            return JSONResponse({"detail": str(exc)}, status_code=429,
                                headers={"Retry-After": str(exc.retry_after)})
        return JSONResponse({"detail": "authentication required"}, status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="ainode", charset="UTF-8"'})

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive and serving HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(ctx: Annotated[AdminContext, Depends(context)]) -> JSONResponse:
        """Database reachable, storage writable above the floor, workers alive, SCP listening."""
        checks = readiness(ctx)
        ok = all(c.ok for c in checks)
        return JSONResponse({"status": "ready" if ok else "not ready",
                             "checks": [c.__dict__ for c in checks]},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(api.principal)])
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    static = api.static_dir()

    @app.get("/", include_in_schema=False, dependencies=[Depends(api.principal)])
    def dashboard() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


def _guard_requests(app: FastAPI, admin: AdminSettings) -> None:
    """Before routing: Host check, then body size; security headers on every answer."""
    if admin.host in ("0.0.0.0", "::") and set(admin.allowed_hosts) <= set(LOOPBACK_HOSTS):
        log.warning("admin.host is %s but admin.allowed_hosts names only loopback: requests to "
                    "other names get 400; list the names clients use", admin.host)
    app.add_middleware(BodyLimit, limit=admin.max_body_kb * 1024)
    app.add_middleware(TrustedHosts, hosts=admin.allowed_hosts)

    @app.middleware("http")  # outermost: refusals of the two above get the headers too
    async def headers(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response
