"""The HTTP service: endpoints, 4xx errors, swapping bundles under load without drops, and the
embedder's lanes (route texts never queued behind a big score-task; 503 instead of unbounded
waits)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from benchroute.artifacts.bundle import BundleStore
from benchroute.artifacts.service import (
    MAX_BODY_BYTES,
    MAX_TASK_CHARS,
    MAX_TEXT_CHARS,
    ServiceLimits,
    create_app,
)
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.publish import publish_store
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def served(embedded_sample_store):
    publish_store(embedded_sample_store, "svc", FitOptions(evaluate=False))
    app = create_app(embedded_sample_store, "svc", poll_seconds=0.2)
    with TestClient(app) as client:
        yield embedded_sample_store, app, client


def test_endpoints(served):
    _, app, client = served
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["version"]
    info = client.get("/v1/bundle").json()
    assert info["name"] == "svc" and info["models"]
    x = app.state.holder.router.knn.X_[0].tolist()
    r = client.post("/v1/route", json={"embedding": x, "top": 2})
    assert r.status_code == 200 and len(r.json()["candidates"]) == 2
    s = client.post("/v1/score-task", json={"embeddings": [x, x]})
    assert s.status_code == 200 and s.json()["models"]
    r = client.post("/v1/route", json={"embedding": x, "max_cost_share": 0.5})
    assert r.status_code == 200 and r.json()["operating_point"]["value"] >= 0
    r = client.post("/v1/route", json={"embedding": x, "lambda": 0.05, "input_tokens": 500})
    assert r.status_code == 200 and r.json()["operating_point"] == {"rule": "utility", "value": 0.05}
    assert client.post("/v1/route", json={"embedding": x, "lambda": 0.1, "delta": 0.1}).status_code == 400
    assert client.post("/v1/route", json={"embedding": x, "lambda": -1}).status_code == 422
    assert client.post("/v1/route", json={"embedding": x, "lambda": 1e300}).status_code == 422
    assert client.post("/v1/route", json={"embedding": x, "lamda": 0.05}).status_code == 422  # a typo
    ragged = client.post("/v1/score-task", json={"embeddings": [x, x[:10]]})
    assert ragged.status_code == 400 and "equal-length" in ragged.json()["detail"]
    s = client.post("/v1/score-task", json={"embeddings": [x, x], "delta": 0.1})
    assert s.status_code == 200 and s.json()["models"][0]["expected_cost_usd"] is not None


@pytest.mark.parametrize(
    "path,body,code",
    [
        ("/v1/route", {}, 422),
        ("/v1/route", {"text": "a", "embedding": [0.1]}, 422),
        ("/v1/route", {"embedding": [0.1, 0.2]}, 400),
        ("/v1/route", {"text": "hi", "models": ["nope"]}, 400),
        ("/v1/score-task", {"texts": []}, 422),
        ("/v1/score-task", {"texts": ["ok", " "]}, 422),
        ("/v1/route", {"text": "x" * 30_000}, 422),
    ],
)
def test_bad_requests_get_clear_4xx(served, path, body, code):
    _, _, client = served
    r = client.post(path, json=body)
    assert r.status_code == code
    assert r.json()["detail"]


def test_oversized_body_is_refused(served):
    _, _, client = served
    r = client.post("/v1/score-task", content=b"x" * (9 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _uvicorn(app):
    """``app`` served by a real uvicorn on a free loopback port; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_swaps_to_a_new_latest_without_dropping_requests(embedded_sample_store):
    store = embedded_sample_store
    first = publish_store(store, "swap", FitOptions(evaluate=False))
    app = create_app(store, "swap", poll_seconds=0.1)
    x = app.state.holder.router.knn.X_[0].tolist()
    seen, failures = set(), 0
    stop = time.monotonic() + 30
    published_second = None
    with _uvicorn(app) as url, httpx.Client(timeout=5) as client:
        i = 0
        while time.monotonic() < stop:
            r = client.post(f"{url}/v1/route", json={"embedding": x})
            failures += r.status_code != 200
            seen.add(r.json().get("bundle_version"))
            i += 1
            if i == 20:  # a new version lands while requests keep coming
                published_second = publish_store(store, "swap", FitOptions(router=RouterSpec(k=5), evaluate=False))
            if published_second and published_second["version"] in seen and i > 40:
                break
    assert failures == 0
    assert first["version"] in seen and published_second["version"] in seen


# ------------------------------------------------------------------ no 500s, bounded requests
@pytest.fixture(scope="module")
def live(served):
    """The ``svc`` bundle behind a real uvicorn on loopback: (base URL, a stored embedding)."""
    store, app, _ = served
    x = app.state.holder.router.knn.X_[0].tolist()
    with _uvicorn(create_app(store, "svc", poll_seconds=0.2)) as url:
        yield url, x


def _raw(client: httpx.Client, url: str, text: str) -> httpx.Response:
    """POST ``text`` as is (NaN and lone surrogates are JSON no encoder here would write)."""
    return client.post(url, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "path,body,code",
    [
        ("/v1/route", '{"embedding": %s, "max_params_b": NaN}', 422),
        ("/v1/route", '{"embedding": %s, "lambda": Infinity}', 422),
        ("/v1/route", '{"text": "\\ud800 what?"}', 422),
        ("/v1/route", '{"embedding": %s, "models": ["\\udfff"]}', 422),
        ("/v1/route", '{"embedding": %s, "\\ud800": 1}', 422),
        ("/v1/score-task", '{"texts": ["ok", "\\ud800"]}', 422),
        ("/v1/score-task", '{"embeddings": [%s, [0.1, 0.2]]}', 400),
        ("/v1/score-task", '{"embeddings": [%s, [NaN]]}', 400),
        ("/v1/route", '{"embedding": [NaN, %t]}', 400),
    ],
    ids=["nan", "inf", "surrogate", "surrogate-model", "surrogate-key", "surrogate-texts",
         "ragged", "ragged-nan", "nan-embedding"],
)
def test_malformed_values_are_4xx_and_keep_the_connection(live, path, body, code):
    url, x = live
    with httpx.Client(base_url=url, timeout=30) as client:
        r = _raw(client, path, body.replace("%s", str(x)).replace("%t", str(x[1:])[1:-1]))
        assert r.status_code == code, r.text
        assert r.json()["detail"]
        after = client.post("/v1/route", json={"embedding": x})  # same keep-alive connection
        assert after.status_code == 200 and after.json()["model"]


def test_chunked_body_over_the_limit_is_refused_while_it_arrives(live):
    """No Content-Length: the bytes are counted as they come, so the 413 needs no whole body."""
    url, x = live
    sent = 0

    def body(total: int = 3 * MAX_BODY_BYTES, chunk: bytes = b" " * 2**16):
        nonlocal sent
        while sent < total:
            sent += len(chunk)
            yield chunk

    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/score-task", content=body(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "request body over" in r.json()["detail"]
        assert client.post("/v1/route", json={"embedding": x}).status_code == 200
    # A body that never ends: the answer comes once the limit is passed, not at its end.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"POST /v1/score-task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 2**16
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            s.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        assert s.recv(64).startswith(b"HTTP/1.1 413")


def test_score_task_text_is_bounded_in_total(served):
    _, _, client = served
    n = MAX_TASK_CHARS // MAX_TEXT_CHARS + 1
    r = client.post("/v1/score-task", json={"texts": ["x" * MAX_TEXT_CHARS] * n})
    assert r.status_code == 422 and f"at most {MAX_TASK_CHARS} characters" in r.text


class _Failing:
    """A router stand-in whose every call raises ``exc`` (and that the poller will not swap out)."""

    def __init__(self, version: str, exc: Exception):
        self.version, self.exc = version, exc

    def route(self, *args, **kwargs):
        raise self.exc

    score_task = route


def test_router_errors_are_400_and_a_crash_is_a_json_500(served, monkeypatch):
    _, app, client = served
    holder = app.state.holder
    x = holder.router.knn.X_[0].tolist()
    echoed = ValueError("unknown models: ['\ud800']")  # an error that quotes a lone surrogate back
    monkeypatch.setattr(holder, "router", _Failing(holder.router.version, echoed))
    r = client.post("/v1/route", json={"embedding": x})
    assert r.status_code == 400 and r.json() == {"detail": str(echoed)}
    monkeypatch.setattr(holder, "router", _Failing(holder.router.version, RuntimeError("secret state")))
    r = client.post("/v1/score-task", json={"embeddings": [x]})
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]
    assert "secret state" not in r.text and "Traceback" not in r.text
    monkeypatch.undo()
    assert client.post("/v1/route", json={"embedding": x}).status_code == 200


def _wait_for(client, pred, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/healthz").json()
        if pred(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_failed_swap_reports_degraded_until_a_good_one(embedded_sample_store):
    store, bs = embedded_sample_store, BundleStore(embedded_sample_store)
    first = publish_store(store, "degrade", FitOptions(evaluate=False))["version"]
    second = publish_store(store, "degrade", FitOptions(router=RouterSpec(k=5), evaluate=False))["version"]
    bs.set_ref("degrade", "latest", first)
    rel = sorted(bs.manifest("degrade", second)["files"])[0]
    path = bs.path("degrade", second, rel)
    with bs.fs.open(path, "rb") as f:
        good = f.read()
    bs.fs.pipe_file(path, good[:-1] + bytes([good[-1] ^ 1]))  # same size, other bytes
    with TestClient(create_app(store, "degrade", poll_seconds=0.1)) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        bs.set_ref("degrade", "latest", second)  # a tampered version becomes latest
        health = _wait_for(client, lambda h: h["last_error"])
        assert health["status"] == "degraded" and health["version"] == first
        assert rel in health["last_error"]
        bs.set_ref("degrade", "latest", first)  # rolled back to what is served: healthy again
        assert _wait_for(client, lambda h: not h["last_error"])["status"] == "ok"
        bs.set_ref("degrade", "latest", second)
        assert _wait_for(client, lambda h: h["last_error"])["status"] == "degraded"
        bs.fs.pipe_file(path, good)
        health = _wait_for(client, lambda h: h["version"] == second)
        assert health == {**health, "status": "ok", "version": second, "last_error": None}


# ------------------------------------------------------------------ the embedder's lanes
def test_text_answers_match_the_router(served):
    """Texts embedded by the service's lanes (batched, chunked, sorted by length) score as the
    router scores them itself."""
    _, app, client = served
    router = app.state.holder.router
    texts = ["What is the capital of France?", "Integrate x squared from 0 to 1.",
             "Write a short poem about the sea, in the style of a sailor's song. " * 4]
    r = client.post("/v1/score-task", json={"texts": texts})
    assert r.status_code == 200, r.text
    got = {m["model"]: m for m in r.json()["models"]}
    want = {m["model"]: m for m in router.score_task(texts)}
    assert got.keys() == want.keys()
    for model, row in want.items():
        for key in ("S1", "S2", "S3", "p_hat", "coverage", "expected_cost_usd"):
            if row[key] is None:
                assert got[model][key] is None, (model, key)
            else:
                assert got[model][key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), (model, key)
    r = client.post("/v1/route", json={"text": texts[0], "top": 5})
    assert r.status_code == 200
    assert r.json()["model"] == router.route(texts[0])["model"]


def _health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()


def _until(url: str, pred, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = _health(url)
        if pred(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_route_text_is_answered_while_a_big_score_task_embeds(live):
    """A score-task of 400k characters is embedded chunk by chunk; route texts go between chunks,
    so they are answered while the task is still in flight (not after it), and the task is
    dropped once its client hangs up."""
    url, x = live
    assert _until(url, lambda h: h["embedding"]["embedder"] == "ready")["embedding"]["embedder"] == "ready"
    texts = [f"Question {i}: " + "explain the history of the river and its cities " * 20 for i in range(400)]
    texts = [t[:MAX_TASK_CHARS // 400] for t in texts]
    body = json.dumps({"texts": texts}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as task:
        task.sendall(b"POST /v1/score-task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        health = _until(url, lambda h: h["embedding"]["running"] == "task")
        assert health["embedding"]["tasks"] == 1, health
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(3):
                r = client.post("/v1/route", json={"text": f"What is {i} plus {i}?"})
                assert r.status_code == 200 and r.json()["model"]
            assert client.post("/v1/route", json={"embedding": x}).status_code == 200
        # Ordering evidence: every route answer came while the task was still being embedded.
        assert _health(url)["embedding"]["tasks"] == 1
        task.setblocking(False)
        with pytest.raises(BlockingIOError):
            task.recv(1)  # no answer to the task yet
    # The client hung up: the service stops at the next chunk instead of embedding the rest.
    health = _until(url, lambda h: not h["embedding"]["busy"], seconds=60)
    assert health["embedding"]["tasks"] == 0 and not health["embedding"]["busy"]
    assert health["status"] == "ok" and health["embedding"]["refused"] == 0


class _Gated:
    """A router stand-in whose embedder blocks until ``gate`` opens (a slow, busy embedder)."""

    def __init__(self, router):
        self.version, self.dim = router.version, router.knn.n_features_in_
        self.gate = threading.Event()
        self.embedded: list[str] = []

    def embed(self, texts):
        import numpy as np

        assert self.gate.wait(60)
        self.embedded += texts
        return np.ones((len(texts), self.dim), np.float32)

    def route(self, query, **options):
        return {"model": "m", "bundle_version": self.version}

    def score_task(self, inputs, **options):
        return [{"model": "m", "rows": len(inputs)}]


def test_a_busy_embedder_answers_503_with_retry_after_not_a_long_wait(served):
    store, _, _ = served
    limits = ServiceLimits(route_queue=2, route_wait_s=1.0, task_queue=1, task_wait_s=1.0,
                           task_deadline_s=1.0, degraded_s=3.0)
    app = create_app(store, "svc", poll_seconds=0.2, limits=limits, warm=False)
    x = app.state.holder.router.knn.X_[0].tolist()
    gated = _Gated(app.state.holder.router)
    app.state.holder.router = gated  # the same version: the poller keeps it
    post = lambda c, path, body: c.post(path, json=body)  # noqa: E731
    with _uvicorn(app) as url, httpx.Client(base_url=url, timeout=60) as client, \
            ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, client, "/v1/route", {"text": "first"})
        _until(url, lambda h: h["embedding"]["running"] == "route", 10)
        queued = [pool.submit(post, client, "/v1/route", {"text": f"queued {i}"}) for i in range(2)]
        _until(url, lambda h: h["embedding"]["route_queue"] == 2, 10)
        full = client.post("/v1/route", json={"text": "one too many"})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "waiting for the embedder" in full.json()["detail"]
        # An embedding never waits on the embedder, however busy.
        assert client.post("/v1/route", json={"embedding": x}).status_code == 200
        assert client.post("/v1/score-task", json={"embeddings": [x, x]}).status_code == 200
        health = _health(url)
        assert health["status"] == "degraded" and health["embedding"]["overloaded"]
        # Queued past route_wait_s: refused (503), not left waiting.
        for f in queued:
            r = f.result(timeout=30)
            assert r.status_code == 503 and "waited 1 s" in r.json()["detail"] and r.headers["retry-after"]
        # Tasks: one embedding (stuck behind the gate), one waiting for its turn, more refused.
        task = pool.submit(post, client, "/v1/score-task", {"texts": ["a task"] * 3})
        _until(url, lambda h: h["embedding"]["tasks"] == 1, 10)
        second = pool.submit(post, client, "/v1/score-task", {"texts": ["another"]})
        _until(url, lambda h: h["embedding"]["tasks"] == 2, 10)
        third = client.post("/v1/score-task", json={"texts": ["and another"]})
        assert third.status_code == 503 and "queued already" in third.json()["detail"]
        assert int(third.headers["retry-after"]) >= 1
        r = second.result(timeout=30)
        assert r.status_code == 503 and "waited 1 s" in r.json()["detail"]
        r = task.result(timeout=30)
        assert r.status_code == 503 and "not embedded within 1 s" in r.json()["detail"]
        gated.gate.set()
        assert first.result(timeout=30).status_code == 200
        assert gated.embedded == ["first"]  # nothing refused was embedded afterwards
        # Idle again: healthy once degraded_s has passed without a refusal.
        health = _until(url, lambda h: h["status"] == "ok", 30)
        assert health["status"] == "ok" and health["embedding"]["refused"] == 6
        ok = client.post("/v1/score-task", json={"texts": ["fine now", "and this"]})
        assert ok.status_code == 200 and ok.json()["models"] == [{"model": "m", "rows": 2}]
