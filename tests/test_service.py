"""The HTTP service: endpoints, 4xx errors, and swapping bundles under load without drops."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from benchroute.artifacts.service import create_app
from benchroute.flows.publish import publish_store


@pytest.fixture(scope="module")
def served(embedded_sample_store):
    publish_store(embedded_sample_store, "svc", evaluate=False)
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


def test_swaps_to_a_new_latest_without_dropping_requests(embedded_sample_store):
    store = embedded_sample_store
    first = publish_store(store, "swap", evaluate=False)
    app = create_app(store, "swap", poll_seconds=0.1)
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
    x = app.state.holder.router.knn.X_[0].tolist()
    seen, failures = set(), 0
    stop = time.monotonic() + 30
    published_second = None
    with httpx.Client(timeout=5) as client:
        i = 0
        while time.monotonic() < stop:
            r = client.post(f"{url}/v1/route", json={"embedding": x})
            failures += r.status_code != 200
            seen.add(r.json().get("bundle_version"))
            i += 1
            if i == 20:  # a new version lands while requests keep coming
                published_second = publish_store(store, "swap", k=5, evaluate=False)
            if published_second and published_second["version"] in seen and i > 40:
                break
    server.should_exit = True
    thread.join(timeout=10)
    assert failures == 0
    assert first["version"] in seen and published_second["version"] in seen
