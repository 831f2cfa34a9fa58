"""The HTTP service: routes queries and scores tasks from a bundle, following its ``latest`` ref.

    benchroute serve --bundle STORE_URL --name NAME [--port 8000]

Endpoints: ``POST /v1/route``, ``POST /v1/score-task``, ``GET /v1/bundle``, ``GET /healthz``.
A background thread polls the bundle's ``latest`` ref; a new version is loaded and verified
beside the old one and swapped in with one assignment, so requests in flight finish on the
router they started with and none is dropped. A version that fails to verify is not swapped in
(the service keeps serving the old one and ``/healthz`` says ``degraded`` with the error).

Every bad request is a 4xx with a JSON ``detail``: a body over ``MAX_BODY_BYTES`` (counted as it
arrives, chunked or not) a 413; a request that fails validation (NaN, a lone surrogate, too many
texts or characters) a 422; a ``RouteError``/``ValueError`` from the router a 400. Anything else
is a JSON 500 without a traceback (logged here).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from benchroute.artifacts.bundle import BundleError, BundleStore
from benchroute.artifacts.router import RouteError, Router, describe, load_router

log = logging.getLogger("benchroute.service")

MAX_BODY_BYTES = 8 * 2**20
MAX_TEXTS = 2_000
MAX_TEXT_CHARS = 20_000
MAX_TASK_CHARS = 400_000  # all texts of one score-task request together


def _utf8(text: str) -> str:
    """A string that encodes as UTF-8 (one holding a lone surrogate such as ``\\ud800`` does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (lone surrogate at character {exc.start})") from None
    return text


Utf8 = Annotated[str, AfterValidator(_utf8)]


class Filters(BaseModel):
    """Which models may answer, and the operating point of the cost-aware policy (at most one of
    ``lambda``, ``delta``, ``max_cost_share``, ``max_quality_loss``)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")  # a typo is a 422, not ignored

    models: list[Utf8] | None = Field(default=None, max_length=1_000)
    max_params_b: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    lam: float | None = Field(default=None, ge=0, alias="lambda", allow_inf_nan=False)
    delta: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_cost_share: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_quality_loss: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    input_tokens: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def options(self) -> dict:
        return {k: getattr(self, k) for k in ("models", "max_params_b", "max_cost", "lam", "delta",
                                              "max_cost_share", "max_quality_loss", "input_tokens")}


class RouteRequest(Filters):
    text: Utf8 | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    embedding: list[float] | None = Field(default=None, max_length=8_192)
    top: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def one_input(self):
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'text' or 'embedding'")
        return self


class ScoreTaskRequest(Filters):
    texts: list[Utf8] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    embeddings: list[list[float]] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)

    @model_validator(mode="after")
    def one_input(self):
        if (self.texts is None) == (self.embeddings is None):
            raise ValueError("give exactly one of 'texts' or 'embeddings'")
        if self.texts is not None and any(len(t) > MAX_TEXT_CHARS or not t.strip() for t in self.texts):
            raise ValueError(f"every text must be non-empty and at most {MAX_TEXT_CHARS} characters")
        if self.texts is not None and sum(map(len, self.texts)) > MAX_TASK_CHARS:
            raise ValueError(f"the texts of one task may hold at most {MAX_TASK_CHARS} characters in all")
        return self


class _JSON(JSONResponse):
    """JSON with non-ASCII escaped, so an error that echoes a lone surrogate still encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class BodyTooLarge(HTTPException):
    """A body past the limit, raised while it is received (FastAPI passes it on as a 413)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"request body over {limit} bytes")


class RequestGuard:
    """ASGI middleware: a body over ``limit`` bytes is refused with 413, by its Content-Length
    when it declares one, else by counting the bytes as they arrive (chunked), so an oversized
    body is never read whole; an unexpected exception becomes a JSON 500 (traceback in the log,
    not the answer) and, unlike an exception left to the server, keeps the connection open."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                return await _JSON({"detail": "bad Content-Length"}, status_code=400)(scope, receive, send)
            if too_large:
                exc = BodyTooLarge(self.limit)
                return await _JSON({"detail": exc.detail}, status_code=413)(scope, receive, send)
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # raised outside a route's body parsing: answer it here
            if started:
                raise
            await _JSON({"detail": exc.detail}, status_code=413)(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - no traceback reaches the client
            if started:
                raise
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            detail = f"internal error ({type(exc).__name__}); see the service log"
            await _JSON({"detail": detail}, status_code=500)(scope, receive, send)


class RouterHolder:
    """The current router; ``refresh`` loads a newer ``latest`` and swaps it in. ``last_error``
    is the last failed load, cleared when the served version is ``latest`` again."""

    def __init__(self, url: str, name: str, version: str = "latest"):
        self.url, self.name, self.version_ref = url, name, version
        self.router: Router = load_router(url, name, version)
        self.last_error: str | None = None
        self.swaps = 0

    def refresh(self) -> bool:
        if self.version_ref != "latest":
            return False  # pinned to one version: nothing to follow
        try:
            current = BundleStore(self.url).resolve(self.name, "latest")
            if current == self.router.version:
                self.last_error = None  # e.g. latest rolled back to the version served
                return False
            fresh = load_router(self.url, self.name, current)
        except (BundleError, OSError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("keeping %s: %s", self.router.version, self.last_error)
            return False
        self.router = fresh  # one assignment: requests in flight keep the old object
        self.last_error = None
        self.swaps += 1
        log.info("now serving %s/%s", self.name, fresh.version)
        return True


def create_app(url: str, name: str, version: str = "latest", poll_seconds: float = 5.0) -> FastAPI:
    holder = RouterHolder(url, name, version)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                holder.refresh()
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any bad bundle
                holder.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("keeping %s: could not load the new bundle", holder.router.version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=poll, name="bundle-poller", daemon=True)
        thread.start()
        yield
        stop.set()

    app = FastAPI(title="benchroute", version="1", lifespan=lifespan)
    app.state.holder = holder

    app.add_middleware(RequestGuard, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # Without the offending input: NaN or a lone surrogate cannot be echoed as JSON.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return _JSON({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ValueError)  # RouteError and any other bad value the router meets
    async def bad_value(request: Request, exc: ValueError):
        return _JSON({"detail": str(exc)}, status_code=400)

    @app.get("/healthz")
    def healthz():
        return {
            "status": "degraded" if holder.last_error else "ok",
            "bundle": name,
            "version": holder.router.version,
            "swaps": holder.swaps,
            "last_error": holder.last_error,
        }

    @app.get("/v1/bundle")
    def bundle():
        return describe(holder.router)

    @app.post("/v1/route")
    def route(req: RouteRequest):
        router = holder.router
        try:
            return router.route(
                req.text if req.text is not None else req.embedding, top=req.top, **req.options(),
            )
        except RouteError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    @app.post("/v1/score-task")
    def score_task(req: ScoreTaskRequest):
        router = holder.router
        t0 = time.perf_counter()
        try:
            rows = router.score_task(
                req.texts if req.texts is not None else req.embeddings, **req.options(),
            )
        except RouteError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "bundle_version": router.version,
            "models": rows,
            "seconds": round(time.perf_counter() - t0, 4),
        }

    return app
