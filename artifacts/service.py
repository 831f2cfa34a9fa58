"""The HTTP service: routes queries and scores tasks from a bundle, following its ``latest`` ref.

    benchroute serve --bundle STORE_URL --name NAME [--port 8000]

Endpoints: ``POST /v1/route``, ``POST /v1/score-task``, ``GET /v1/bundle``, ``GET /healthz``.
A background thread polls the bundle's ``latest`` ref; a new version is loaded and verified
beside the old one and swapped in with one assignment, so requests in flight finish on the
router they started with and none is dropped. A version that fails to verify is not swapped in
(the service keeps serving the old one and reports the error on ``/healthz``).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from benchroute.artifacts.bundle import BundleError, BundleStore
from benchroute.artifacts.router import RouteError, Router, describe, load_router

log = logging.getLogger("benchroute.service")

MAX_BODY_BYTES = 8 * 2**20
MAX_TEXTS = 2_000
MAX_TEXT_CHARS = 20_000


class Filters(BaseModel):
    """Which models may answer, and the operating point of the cost-aware policy (at most one of
    ``lambda``, ``delta``, ``max_cost_share``, ``max_quality_loss``)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")  # a typo is a 422, not ignored

    models: list[str] | None = Field(default=None, max_length=1_000)
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
    text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    embedding: list[float] | None = Field(default=None, max_length=8_192)
    top: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def one_input(self):
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'text' or 'embedding'")
        return self


class ScoreTaskRequest(Filters):
    texts: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    embeddings: list[list[float]] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)

    @model_validator(mode="after")
    def one_input(self):
        if (self.texts is None) == (self.embeddings is None):
            raise ValueError("give exactly one of 'texts' or 'embeddings'")
        if self.texts is not None and any(len(t) > MAX_TEXT_CHARS or not t.strip() for t in self.texts):
            raise ValueError(f"every text must be non-empty and at most {MAX_TEXT_CHARS} characters")
        return self


class RouterHolder:
    """The current router; ``refresh`` loads a newer ``latest`` and swaps it in."""

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

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and int(size) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/healthz")
    def healthz():
        return {
            "status": "ok",
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
