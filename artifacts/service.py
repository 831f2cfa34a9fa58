"""The HTTP service: routes queries and scores tasks from a bundle, following its ``latest`` ref.

    benchroute serve --bundle STORE_URL --name NAME [--port 8000]

Endpoints: ``POST /v1/route`` (with ``strong``/``weak`` and ``strong_share`` or ``threshold``: a
strong/weak pair decision), ``POST /v1/calibrate`` (a pair router's thresholds on the caller's
own queries), ``POST /v1/score-task``, ``GET /v1/bundle``, ``GET /healthz``.
A background thread polls the bundle's ``latest`` ref; a new version is loaded and verified
beside the old one and swapped in with one assignment, so requests in flight finish on the
router they started with and none is dropped. A version that fails to verify is not swapped in
(the service keeps serving the old one and ``/healthz`` says ``degraded`` with the error).

Every bad request is a 4xx with a JSON ``detail``: a body over ``MAX_BODY_BYTES`` (counted as it
arrives, chunked or not) a 413; a request that fails validation (NaN, a lone surrogate, too many
texts or characters) a 422; a ``RouteError``/``ValueError`` from the router a 400. Anything else
is a JSON 500 without a traceback (logged here).

Raw text is embedded off the event loop by one embedder thread (``EmbedLanes``) fed by two lanes
that take turns: ``/v1/route`` texts, batched together, and ``/v1/score-task`` texts, one task at
a time, in chunks sized to take about ``ServiceLimits.chunk_seconds``, so a route text waits for
at most one chunk of a big task, never for the whole task. Requests that bring embeddings never
wait on the embedder. Each lane is bounded: a full queue, a wait past its limit or a task past its
deadline is a 503 with ``Retry-After`` (``/healthz`` then says ``degraded`` for a while, and its
``embedding`` entry shows the queues), not a latency without bound. A task whose client has gone
is dropped at the next chunk. The embedder is loaded in the background at start and after a swap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from benchroute.artifacts.bundle import BundleError, BundleStore
from benchroute.artifacts.router import RouteError, Router, describe, load_router
from benchroute.transforms.costs import input_tokens

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
    # quality points per USD; above 1e12 every priced model scores -inf alike (overflow)
    lam: float | None = Field(default=None, ge=0, le=1e12, alias="lambda", allow_inf_nan=False)
    delta: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_cost_share: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_quality_loss: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    input_tokens: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def options(self) -> dict:
        return {k: getattr(self, k) for k in ("models", "max_params_b", "max_cost", "lam", "delta",
                                              "max_cost_share", "max_quality_loss", "input_tokens")}


ModelName = Annotated[Utf8, Field(min_length=1, max_length=500)]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class PairFields(BaseModel):
    """A strong/weak decision (``Router.route_pair``): the pair, and which pair router."""

    strong: ModelName | None = None
    weak: ModelName | None = None
    pair_router: Annotated[Utf8, Field(max_length=100)] | None = None

    def pair(self) -> dict:
        return {"strong": self.strong, "weak": self.weak, "pair_router": self.pair_router}


class RouteRequest(Filters, PairFields):
    text: Utf8 | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    embedding: list[float] | None = Field(default=None, max_length=8_192)
    top: int = Field(default=3, ge=1, le=100)
    strong_share: Share | None = None  # with strong/weak: the share of calls the strong model gets
    threshold: float | None = Field(default=None, allow_inf_nan=False)  # or α itself

    @model_validator(mode="after")
    def one_input(self):
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'text' or 'embedding'")
        if self.text is not None and not self.text.strip():
            raise ValueError("the text must not be blank")
        return self

    @property
    def is_pair(self) -> bool:
        return any(v is not None for v in (*self.pair().values(), self.strong_share, self.threshold))


class CalibrateRequest(PairFields):
    """A user's own unlabelled queries (texts or embeddings) and the target strong shares."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Utf8] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    embeddings: list[list[float]] | None = Field(default=None, min_length=1, max_length=MAX_TEXTS)
    shares: list[Share] | None = Field(default=None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def inputs(self):
        if (self.texts is None) == (self.embeddings is None):
            raise ValueError("give exactly one of 'texts' or 'embeddings'")
        if self.strong is None or self.weak is None:
            raise ValueError("give both 'strong' and 'weak'")
        if self.texts is not None and any(len(t) > MAX_TEXT_CHARS or not t.strip() for t in self.texts):
            raise ValueError(f"every text must be non-empty and at most {MAX_TEXT_CHARS} characters")
        if self.texts is not None and sum(map(len, self.texts)) > MAX_TASK_CHARS:
            raise ValueError(f"the texts may hold at most {MAX_TASK_CHARS} characters in all")
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


# ------------------------------------------------------------------ embedding off the event loop
def _available_cores() -> int:
    """Cores this process may use (affinity mask, capped by a cgroup quota), without torch."""
    from benchroute.transforms.embedder import available_cores

    return available_cores()


@dataclass(frozen=True)
class ServiceLimits:
    """How much embedding work the service takes on, and when it says no (503 + Retry-After)."""

    route_queue: int = 256  # route texts waiting for the embedder; one more is refused
    route_wait_s: float = 30.0  # a route text still queued after this long is refused
    task_queue: int = 2  # score-tasks of raw text waiting behind the one embedding; more are refused
    task_wait_s: float = 60.0  # a task waiting that long for its turn is refused
    task_deadline_s: float = 120.0  # a task whose texts take longer to embed is stopped
    chunk_seconds: float = 0.25  # target time of one embedder batch: what a route text may wait
    degraded_s: float = 30.0  # /healthz says degraded this long after a refusal
    embed_threads: int | None = None  # torch threads; None: the cores less one for the event loop
    # numpy's BLAS threads while the app runs: each request's arrays are small and requests run
    # side by side, where BLAS threads that spin waiting for each other cut throughput many-fold
    # (measured: benchmarks/service_load.py); None leaves them as they are.
    blas_threads: int | None = 1


class Overloaded(StarletteHTTPException):
    """A 503 with Retry-After: the embedder has more work than the limits allow."""

    def __init__(self, detail: str, retry_after: float = 1.0):
        seconds = max(1, min(120, math.ceil(retry_after)))
        super().__init__(status_code=503, detail=detail, headers={"Retry-After": str(seconds)})


TOKEN_CAP = 512  # the estimate of a text's tokens is capped where embedders truncate


def _tokens(text: str) -> int:
    """Rough tokens of ``text`` for sizing batches (characters / 4, capped, plus the specials)."""
    return min(TOKEN_CAP, len(text) // 4) + 2


class _Job:
    __slots__ = ("router", "texts", "tokens", "future", "queued")

    def __init__(self, router, texts: list[str]):
        self.router, self.texts = router, texts
        self.tokens = max(map(_tokens, texts)) * len(texts)  # padded to the longest
        self.future: Future = Future()
        self.queued = time.monotonic()


class EmbedLanes:
    """The one thread that runs the embedder (torch, CPU-bound: more threads would only share the
    same cores), fed by two bounded lanes that take turns while both have work. The route lane's
    waiting texts (of one router) are embedded together, up to one chunk's worth. The task lane
    holds the chunks of the one score-task embedding at a time (more wait their turn, at most
    ``task_queue`` of them). A chunk is as many texts as the measured rate embeds in
    ``chunk_seconds``: a route text waits for at most one chunk and one batch of route texts, and
    a task gets at least every other batch however many route texts come."""

    def __init__(self, limits: ServiceLimits | None = None):
        self.limits = limits or ServiceLimits()
        self.threads = self.limits.embed_threads or max(1, _available_cores() - 1)
        self._cv = threading.Condition()
        self._route: deque[_Job] = deque()
        self._task: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._running: str | None = None
        self._last: str | None = None  # the lane of the last batch
        self._stopping = False
        self._rate = 1000.0  # padded tokens per second, measured (starts low: small first chunks)
        self._tasks = 0  # score-tasks embedding or waiting to
        self._task_left = 0  # tokens of the running task not yet embedded
        self._slot: asyncio.Lock | None = None
        self._slot_loop = None
        self.shed = 0
        self._last_shed = -math.inf
        self._warming = 0  # warm-ups queued or running
        self.embedder = "not loaded"  # "loading", "ready" or "failed: ..." (as the last warm-up)

    # ---------------------------------------------------------------- the embedder thread
    def _start(self) -> None:  # under self._cv
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="embedder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _budget(self) -> float:
        return max(64.0, self._rate * self.limits.chunk_seconds)

    def _next(self) -> tuple[str, list[_Job]] | None:  # under self._cv
        """The next batch: the lanes take turns while both have work (so neither starves)."""
        if self._last == "route":
            picked = self._next_task() or self._next_route()
        else:
            picked = self._next_route() or self._next_task()
        if picked is not None:
            self._last = picked[0]
        return picked

    def _next_route(self) -> tuple[str, list[_Job]] | None:
        batch: list[_Job] = []
        longest = 0  # tokens of the batch's longest text: every text is padded to it
        while self._route:
            job = self._route[0]
            longest = max(longest, job.tokens)
            if batch and (job.router is not batch[0].router or len(batch) >= 64
                          or longest * (len(batch) + 1) > self._budget()):
                break
            self._route.popleft()
            if job.future.set_running_or_notify_cancel():  # False: its request was refused
                batch.append(job)
        return ("route", batch) if batch else None

    def _next_task(self) -> tuple[str, list[_Job]] | None:
        while self._task:
            job = self._task.popleft()
            if job.future.set_running_or_notify_cancel():
                return "task", [job]
        return None

    def _work(self) -> None:
        while True:
            with self._cv:
                picked = self._next()
                while picked is None:
                    if self._stopping:
                        return
                    self._cv.wait()
                    picked = self._next()
                self._running = picked[0]
            jobs = picked[1]
            texts = [t for j in jobs for t in j.texts]
            t0 = time.perf_counter()
            X, error = None, None
            try:
                X = jobs[0].router.embed(texts)
            except BaseException as exc:  # noqa: BLE001 - handed to each waiting request
                error = exc
            seconds = time.perf_counter() - t0
            self._set_threads()
            with self._cv:
                self._running = None
                if error is None and seconds > 0:
                    padded = max(map(_tokens, texts)) * len(texts)
                    self._rate = 0.7 * self._rate + 0.3 * padded / seconds
            start = 0
            for j in jobs:
                if error is not None:
                    j.future.set_exception(error)
                else:
                    j.future.set_result(X[start : start + len(j.texts)])
                start += len(j.texts)

    def _set_threads(self) -> None:
        torch = sys.modules.get("torch")  # only once an embedder has loaded it
        if torch is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # this thread runs every forward pass

    def _submit(self, lane: deque, job: _Job) -> None:
        with self._cv:
            self._start()
            lane.append(job)
            self._cv.notify()

    def warm(self, router: Router) -> None:
        """Load ``router``'s embedder on the embedder thread now, not on the first text's time
        (a failure is logged: text requests will meet it as a 400, embeddings still work)."""
        job = _Job(router, ["warm up"])

        def done(fut: Future) -> None:
            exc = None if fut.cancelled() else fut.exception()
            with self._cv:
                self._warming -= 1
                if exc is None:
                    self.embedder = "ready"
                else:
                    self.embedder = f"failed: {type(exc).__name__}: {exc}"
            if exc is not None:
                log.warning("text requests will fail: no embedder for %s (%s: %s)", router.version,
                            type(exc).__name__, exc)

        with self._cv:
            self._warming += 1
            if self.embedder != "ready":
                self.embedder = "loading"
        job.future.add_done_callback(done)
        self._submit(self._route, job)

    def _refuse(self, detail: str, retry_after: float) -> Overloaded:
        with self._cv:
            self.shed += 1
            self._last_shed = time.monotonic()
        log.warning("503: %s", detail)
        return Overloaded(detail, retry_after)

    # ---------------------------------------------------------------- the two lanes
    async def embed_one(self, router: Router, text: str) -> np.ndarray:
        """The vector of one route text (a 503 when the lane is full or the wait too long)."""
        with self._cv:
            waiting = len(self._route)
        if waiting >= self.limits.route_queue:
            raise self._refuse(f"{waiting} route texts are waiting for the embedder; retry shortly, "
                               "or send an embedding", 1)
        job = _Job(router, [text])
        self._submit(self._route, job)
        waiting = asyncio.wrap_future(job.future)
        while not (await asyncio.wait({waiting}, timeout=self.limits.route_wait_s))[0]:
            if self._warming:  # the embedder is loading (start, swap): not a queue to refuse
                continue
            if job.future.cancel():  # still queued (a running batch is waited for)
                raise self._refuse(f"the text waited {self.limits.route_wait_s:g} s for the "
                                   "embedder; retry shortly, or send an embedding", 1)
        return (await waiting)[0]

    async def embed_task(self, router: Router, texts: list[str], request: Request | None = None):
        """The vectors of one task's texts (rows in order), embedded chunk by chunk; None when
        the client went away meanwhile. A 503 when too many tasks wait, the wait for this one's
        turn is too long, or its embedding passes the deadline."""
        with self._cv:
            if self._tasks > self.limits.task_queue:
                retry = self._task_left / self._rate
                refused = True
            else:
                self._tasks += 1
                refused = False
        if refused:
            raise self._refuse(f"{self.limits.task_queue + 1} score-tasks of raw text are queued "
                               "already; retry later, or send embeddings", retry)
        try:
            loop = asyncio.get_running_loop()
            if self._slot_loop is not loop:
                self._slot, self._slot_loop = asyncio.Lock(), loop
            try:
                await asyncio.wait_for(self._slot.acquire(), self.limits.task_wait_s)
            except TimeoutError:
                raise self._refuse(
                    f"waited {self.limits.task_wait_s:g} s for the score-tasks ahead to be embedded; "
                    "retry later, or send embeddings", self._task_left / self._rate) from None
            try:
                return await self._chunks(router, texts, request)
            finally:
                self._slot.release()
        finally:
            with self._cv:
                self._tasks -= 1
                self._task_left = 0 if self._tasks == 0 else self._task_left

    async def _chunks(self, router: Router, texts: list[str], request: Request | None):
        deadline = time.monotonic() + self.limits.task_deadline_s
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
        tokens = [_tokens(texts[i]) for i in order]
        self._task_left = sum(tokens)
        out: list[np.ndarray] = []
        start = 0
        while start < len(order):
            end, budget = start + 1, self._budget()
            while end < len(order) and tokens[end] * (end + 1 - start) <= budget and end - start < 256:
                end += 1
            if time.monotonic() > deadline:
                raise self._refuse(
                    f"the task's texts were not embedded within {self.limits.task_deadline_s:g} s "
                    f"({start} of {len(texts)} done); send fewer texts, or embeddings", 30)
            if request is not None and await request.is_disconnected():
                log.info("score-task dropped after %d of %d texts: the client went away", start,
                         len(texts))
                return None
            job = _Job(router, [texts[i] for i in order[start:end]])
            self._submit(self._task, job)
            try:
                out.append(await asyncio.wait_for(asyncio.wrap_future(job.future),
                                                  max(0.0, deadline - time.monotonic()) + 1))
            except TimeoutError:
                raise self._refuse(
                    f"the task's texts were not embedded within {self.limits.task_deadline_s:g} s "
                    f"({start} of {len(texts)} done); send fewer texts, or embeddings", 30) from None
            self._task_left -= sum(tokens[start:end])
            start = end
        X = np.empty((len(texts), out[0].shape[1]), np.float32)
        X[order] = np.vstack(out)
        return X

    def health(self) -> dict:
        with self._cv:
            now = time.monotonic()
            oldest = min((j.queued for j in self._route if not j.future.done()), default=now)
            wait = now - oldest
            return {
                "embedder": self.embedder,
                "busy": bool(self._route or self._task or self._running or self._tasks),
                "running": self._running,
                "route_queue": len(self._route),
                "tasks": self._tasks,
                "oldest_wait_s": round(wait, 3),
                "tokens_per_s": round(self._rate),
                "threads": self.threads,
                "refused": self.shed,
                "overloaded": now - self._last_shed < self.limits.degraded_s
                or wait > self.limits.route_wait_s / 2,
            }


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


def _limit_blas(threads: int | None):
    """Limit the BLAS libraries' threads (process-wide) until the returned limiter is restored."""
    if threads is None:
        return None
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn
    except ImportError:  # pragma: no cover - a dependency of benchroute
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def create_app(url: str, name: str, version: str = "latest", poll_seconds: float = 5.0,
               limits: ServiceLimits | None = None, warm: bool = True) -> FastAPI:
    """The service over bundle ``name`` in store ``url``. ``warm``: load the embedder (torch) in
    the background at start and after each swap, before the first text needs it."""
    holder = RouterHolder(url, name, version)
    lanes = EmbedLanes(limits)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                if holder.refresh() and warm:
                    lanes.warm(holder.router)
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any bad bundle
                holder.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("keeping %s: could not load the new bundle", holder.router.version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=poll, name="bundle-poller", daemon=True)
        thread.start()
        blas = _limit_blas(lanes.limits.blas_threads)
        if warm:
            lanes.warm(holder.router)
        try:
            yield
        finally:
            stop.set()
            lanes.stop()
            if blas is not None:
                blas.restore_original_limits()

    app = FastAPI(title="benchroute", version="1", lifespan=lifespan)
    app.state.holder = holder
    app.state.lanes = lanes

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
    async def healthz():  # on the event loop: answered however busy the embedder is
        embedding = lanes.health()
        return {
            "status": "degraded" if holder.last_error or embedding["overloaded"] else "ok",
            "bundle": name,
            "version": holder.router.version,
            "swaps": holder.swaps,
            "last_error": holder.last_error,
            "embedding": embedding,
        }

    @app.get("/v1/bundle")
    def bundle():
        return describe(holder.router)

    @app.post("/v1/route")
    async def route(req: RouteRequest):
        router = holder.router
        options = req.options()
        if req.is_pair:  # a strong/weak decision; the cost filters do not apply (the router says so)
            options = {k: v for k, v in options.items() if v is not None}
            options.update(req.pair(), strong_share=req.strong_share, threshold=req.threshold)
        if req.text is None:
            query = req.embedding  # never waits on the embedder
        else:
            query = await lanes.embed_one(router, req.text)
            if not req.is_pair and options["input_tokens"] is None:  # as the router estimates it
                options["input_tokens"] = float(input_tokens([req.text])[0])
        try:
            return await run_in_threadpool(partial(router.route, query, top=req.top, **options))
        except RouteError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    @app.post("/v1/score-task")
    async def score_task(req: ScoreTaskRequest, request: Request):
        router = holder.router
        t0 = time.perf_counter()
        options = req.options()
        if req.texts is None:
            inputs = req.embeddings
        else:
            inputs = await lanes.embed_task(router, req.texts, request)
            if inputs is None:  # the client has gone: nobody reads this
                return _JSON({"detail": "client closed the request"}, status_code=499)
            if options["input_tokens"] is None:
                # The mean over the texts of their estimated tokens: their mean expected cost,
                # which is what the router averages (costs are linear in input tokens).
                options["input_tokens"] = float(input_tokens(req.texts).mean())
        try:
            rows = await run_in_threadpool(partial(router.score_task, inputs, **options))
        except RouteError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "bundle_version": router.version,
            "models": rows,
            "seconds": round(time.perf_counter() - t0, 4),
        }

    @app.post("/v1/calibrate")
    async def calibrate(req: CalibrateRequest, request: Request):
        router = holder.router
        if req.texts is None:
            inputs = req.embeddings
        else:
            inputs = await lanes.embed_task(router, req.texts, request)
            if inputs is None:
                return _JSON({"detail": "client closed the request"}, status_code=499)
        try:
            rows = await run_in_threadpool(partial(router.calibrate_pair, inputs, strong=req.strong, weak=req.weak,
                                                   shares=req.shares, router=req.pair_router))
        except RouteError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"bundle_version": router.version, "strong": req.strong, "weak": req.weak,
                "n": len(inputs), "thresholds": rows}

    return app
