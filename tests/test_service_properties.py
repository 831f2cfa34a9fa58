"""Property-based tests (hypothesis) of the service's request models, through the HTTP app.

Whatever JSON (or bytes) a client sends to ``/v1/route`` or ``/v1/score-task`` — arbitrary
values, wrong types, nested junk, lone surrogates, NaN/Infinity, huge numbers — the answer is a
2xx or a 4xx with a JSON ``detail``, never a 500; and a valid request gets a valid answer.
"""

from __future__ import annotations

import json
import math

import pytest
from benchroute.artifacts.service import MAX_TEXT_CHARS, create_app
from benchroute.artifacts.stages.fit import FitOptions
from benchroute.flows.publish import publish_store
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PATHS = ("/v1/route", "/v1/score-task")


@pytest.fixture(scope="module")
def svc(embedded_sample_store):
    publish_store(embedded_sample_store, "props", FitOptions(evaluate=False))
    app = create_app(embedded_sample_store, "props", poll_seconds=60)
    router = app.state.holder.router
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, router


def _post(client: TestClient, path: str, value) -> object:
    """POST ``value`` as JSON the way a lax client writes it: NaN/Infinity literals, lone
    surrogates as ``\\ud800`` escapes, integers of any size."""
    body = json.dumps(value, ensure_ascii=True, allow_nan=True)
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def _check(r, path: str, router) -> dict | None:
    """A 2xx or 4xx with a JSON body (a ``detail`` for a 4xx); the body of a 2xx."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, r.status_code
    body = r.json()
    if r.status_code >= 400:
        assert body["detail"], body
        return None
    assert body["bundle_version"] == router.version
    if path == "/v1/route":
        assert body["model"] in router.model_names
        assert body["candidates"] and body["candidates"][0]["model"] == body["model"]
    else:
        assert body["models"] and all(m["model"] in router.model_names for m in body["models"])
    return body


# ------------------------------------------------------------------ strategies
# Every character, lone surrogates included (json.dumps writes them as \\udXXX escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 10**400, -(10**400), 2**63, 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, any_text)
junk = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
FILTERS = ("models", "max_params_b", "max_cost", "lambda", "delta", "max_cost_share",
           "max_quality_loss", "input_tokens")


def _vectors(dim: int):
    """Embeddings of the right width (finite, huge, tiny, zero), wrong widths, and junk."""
    right = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=dim,
                     max_size=dim)
    return st.one_of(right, st.just([0.0] * dim), st.lists(numbers, max_size=8), junk)


def _odd_values(router, path: str) -> dict:
    """For each field, values of every kind: right, wrong, out of range, junk."""
    dim = router.knn.n_features_in_
    names = st.sampled_from(router.model_names)
    field = {
        "text": st.one_of(any_text, st.sampled_from(["", " ", "\n\t", "x" * (MAX_TEXT_CHARS + 1)]), junk),
        "embedding": _vectors(dim),
        "texts": st.one_of(st.lists(any_text, max_size=4), junk),
        "embeddings": st.one_of(st.lists(_vectors(dim), max_size=3), junk),
        "top": st.one_of(st.integers(-5, 200), junk),
        "models": st.one_of(st.lists(names | any_text, max_size=4), junk),
    }
    for key in FILTERS[1:]:
        field[key] = st.one_of(numbers, junk)
    keys = ("text", "embedding", "top") if path == "/v1/route" else ("texts", "embeddings")
    return {k: field[k] for k in (*keys, *FILTERS)}


def _valid_bodies(router, path: str):
    X = router.knn.X_
    rows = st.integers(0, len(X) - 1)
    text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80).filter(str.strip)
    if path == "/v1/route":
        inputs = st.one_of(rows.map(lambda i: {"embedding": X[i].tolist()}),
                           text.map(lambda t: {"text": t}))
    else:
        inputs = st.one_of(st.lists(rows, min_size=1, max_size=5).map(
            lambda ix: {"embeddings": [X[i].tolist() for i in ix]}),
            st.lists(text, min_size=1, max_size=3).map(lambda ts: {"texts": ts}))
    return st.builds(lambda a, b: {**a, **b}, inputs, _filters(router))


def _bodies(router, path: str):
    """Valid bodies with one field set to an odd value, or one dropped, or one key added;
    bodies of the right keys with odd values; and any JSON at all."""
    odd = _odd_values(router, path)
    valid = _valid_bodies(router, path)
    one_odd = st.builds(lambda body, kv: {**body, kv[0]: kv[1]}, valid,
                        st.sampled_from(sorted(odd)).flatmap(lambda k: st.tuples(st.just(k), odd[k])))
    dropped = valid.flatmap(lambda b: st.sampled_from(sorted(b)).map(
        lambda k: {kk: v for kk, v in b.items() if kk != k}))
    extra = st.builds(lambda body, more: {**body, **more}, valid,
                      st.dictionaries(any_text, junk, min_size=1, max_size=2))
    shaped = st.fixed_dictionaries({}, optional=odd)
    return st.one_of(valid, one_odd, dropped, extra, shaped, junk)


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("path", PATHS)
def test_any_json_gets_a_json_2xx_or_4xx(svc, path):
    client, router = svc

    @settings(SETTINGS, max_examples=100)
    @given(body=_bodies(router, path))
    def check(body):
        _check(_post(client, path, body), path, router)

    check()


@pytest.mark.parametrize("path", PATHS)
def test_any_bytes_get_a_json_2xx_or_4xx(svc, path):
    client, router = svc

    @settings(SETTINGS, max_examples=40)
    @given(raw=st.one_of(st.binary(max_size=200),
                         st.text(st.characters(codec="utf-8"), max_size=200).map(str.encode),
                         st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                         st.integers(1, 3000).map(lambda n: b'{"text":' * n)))
    def check(raw):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        _check(r, path, router)

    check()


def _filters(router):
    """Valid filters: any may leave no model (a 400 that says so), never a 422 or a 500."""
    pos = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
    nonneg = st.floats(min_value=0, max_value=1e3, allow_nan=False)
    point = st.sampled_from(["lambda", "delta", "max_cost_share", "max_quality_loss"])
    return st.builds(
        lambda models, size, cost, tokens, which, value: {
            k: v for k, v in {"models": models, "max_params_b": size, "max_cost": cost,
                              "input_tokens": tokens, which: value}.items() if v is not None
        },
        st.none() | st.lists(st.sampled_from(router.model_names), min_size=1, max_size=5, unique=True),
        st.none() | pos, st.none() | nonneg, st.none() | pos, point, st.none() | nonneg,
    )


NO_ANSWER = ("no model satisfies", "need prices", "curve", "no measured point", "no model is allowed")


def _valid_outcome(r, path, router, filters) -> dict | None:
    if r.status_code == 400:  # only where the filters leave no model or no operating point
        assert any(s in r.json()["detail"] for s in NO_ANSWER), r.text
        return None
    assert r.status_code == 200, r.text
    body = _check(r, path, router)
    allowed = set(filters.get("models") or router.model_names)
    got = [c["model"] for c in body["candidates"]] if path == "/v1/route" else \
        [m["model"] for m in body["models"]]
    assert set(got) <= allowed
    return body


def test_valid_routes_get_valid_answers(svc):
    client, router = svc
    X = router.knn.X_

    @SETTINGS
    @given(row=st.integers(0, len(X) - 1), scale=st.floats(1e-3, 1e3), top=st.integers(1, 100),
           filters=_filters(router))
    def check(row, scale, top, filters):
        body = {"embedding": [float(v) * scale for v in X[row]], "top": top, **filters}
        out = _valid_outcome(_post(client, "/v1/route", body), "/v1/route", router, filters)
        if out is not None:
            allowed = len(set(filters.get("models") or router.model_names))
            assert 1 <= len(out["candidates"]) <= min(top, allowed)
            if not set(filters) - {"models"}:  # no size, cost or operating point: every allowed model
                assert len(out["candidates"]) == min(top, allowed)
            assert out["g"] is None or 0 <= out["g"] <= 1

    check()


def test_valid_score_tasks_get_valid_answers(svc):
    client, router = svc
    X = router.knn.X_

    @SETTINGS
    @given(rows=st.lists(st.integers(0, len(X) - 1), min_size=1, max_size=20), filters=_filters(router))
    def check(rows, filters):
        body = {"embeddings": [X[i].tolist() for i in rows], **filters}
        out = _valid_outcome(_post(client, "/v1/score-task", body), "/v1/score-task", router, filters)
        if out is not None:
            for m in out["models"]:
                for key in ("S1", "S2", "S3", "p_hat"):
                    assert m[key] is None or (math.isfinite(m[key]) and -1e-9 <= m[key] <= 1 + 1e-9)
                assert 0 <= m["coverage"] <= 1

    check()


def test_valid_texts_get_valid_answers(svc):
    """Texts of any Unicode (no lone surrogate), embedded by the real embedder."""
    client, router = svc
    text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300).filter(
        lambda t: t.strip())

    @settings(SETTINGS, max_examples=15)
    @given(texts=st.lists(text, min_size=1, max_size=4))
    def check(texts):
        r = client.post("/v1/route", json={"text": texts[0]})
        assert r.status_code == 200, r.text
        _check(r, "/v1/route", router)
        r = client.post("/v1/score-task", json={"texts": texts})
        assert r.status_code == 200, r.text
        _check(r, "/v1/score-task", router)

    check()
    long = client.post("/v1/route", json={"text": "x" * MAX_TEXT_CHARS})
    assert long.status_code == 200
