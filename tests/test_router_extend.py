"""A published bundle extended by a model whose results land after it (``artifacts.router_extend``),
on the shipped sample: one model's outcomes and labels are taken out of a copy of the store, the
bundle is published, then they land again as new parts."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from benchroute.artifacts.bundle import open_bundle
from benchroute.artifacts.router import load_router
from benchroute.artifacts.router_build import bundle_content
from benchroute.artifacts.stages.publish import fit_and_publish
from benchroute.artifacts.router_extend import extend_content, extension_plan, logistic_head
from benchroute.artifacts.specs import RouterSpec, Selection
from benchroute.artifacts.store import Store
from benchroute.artifacts import embeddings as emb
from benchroute.artifacts.label_pack import PackedLabels
from benchroute.transforms.predictors import dense_forward, predictor_from_state

ROUTER = RouterSpec(predictor="mlp")


@pytest.fixture(scope="module")
def landed(embedded_sample_store, tmp_path_factory):
    """(store url, the late model, its labels): the base bundle published without the model,
    then the model's outcomes and labels appended as new parts."""
    url = str(tmp_path_factory.mktemp("extend") / "store")
    shutil.copytree(embedded_sample_store, url)
    store = Store(url)
    labels, outcomes = store.read("labels"), store.read("outcomes")
    counts = labels.group_by("model").len().sort(["len", "model"], descending=[True, False])
    late = counts["model"][len(counts) // 2]  # a model with a middling number of labels
    store.commit(replace={"labels": labels.filter(pl.col("model") != late),
                          "outcomes": outcomes.filter(pl.col("model") != late)})
    eid = emb.embedders(store)[0]
    fit_and_publish(url, "default", eid, Selection(), {}, ROUTER)  # records the parts it was built from
    store.commit(append={"outcomes": outcomes.filter(pl.col("model") == late),
                         "labels": labels.filter(pl.col("model") == late)})
    return url, eid, late


def test_an_extended_bundle_equals_a_full_build_but_for_the_predictor_and_curve(landed):
    url, eid, late = landed
    base = open_bundle(url, "default")
    plan = extension_plan(url, "default", eid, Selection(), ROUTER)
    assert not isinstance(plan, str), plan
    ext = extend_content(url, "default", eid, Selection(), ROUTER, plan)
    full = bundle_content(url, "default", eid, Selection(), {}, ROUTER)
    f, e = full.files, ext.files
    # the index, its labels (packed bits, byte for byte), the members and the kernel's inputs
    for rel in ("index/embeddings.npy", "index/members.npy", "index/input_ids.json", "kernel/u.npy",
                "datasets.json", *[r for r in f if r.startswith("index/labels_") or r.startswith("build/")]):
        assert e[rel] == f[rel], rel
    ext_b, full_b = _bundle(ext), _bundle(full)
    np.testing.assert_allclose(ext_b["p"], full_b["p"], rtol=0, atol=1e-12)  # p(d, m) of every model
    assert ext.meta["parameters"]["bandwidth"] == pytest.approx(full.meta["parameters"]["bandwidth"], rel=1e-12)
    models = [m["model"] for m in full.meta["models"]]
    assert [m["model"] for m in ext.meta["models"]] == models and late in models
    for a, b in zip(ext.meta["models"], full.meta["models"]):
        assert a == b  # prices, sizes, cards
    ta = pl.read_parquet(e["models.parquet"]).select("model", "train_acc", "expected_output_tokens")
    tb = pl.read_parquet(f["models.parquet"]).select("model", "train_acc", "expected_output_tokens")
    assert ta.equals(tb)
    # the base's curve and the base's network for every other model
    assert e["routing/curve.parquet"] == base.files["routing/curve.parquet"]
    j = models.index(late)
    W_base, W_ext = base.npy("predictor/W1.npy"), ext_b["W1"]
    np.testing.assert_array_equal(np.delete(W_ext, j, axis=1), W_base)
    np.testing.assert_array_equal(ext_b["W0"], base.npy("predictor/W0.npy"))
    x = ext.meta["parameters"]["extension"]
    assert x["added_models"] == [late] and x["base_version"] == base.manifest["version"]


def _bundle(content):
    import io

    load = lambda rel: np.load(io.BytesIO(content.files[rel]), allow_pickle=False)  # noqa: E731
    return {"p": load("kernel/p.npy"), "W0": load("predictor/W0.npy"), "W1": load("predictor/W1.npy")}


def test_the_new_output_unit_is_the_penalised_logistic_fit_on_the_frozen_layer(landed):
    from sklearn.linear_model import LogisticRegression

    url, eid, late = landed
    plan = extension_plan(url, "default", eid, Selection(), ROUTER)
    ext = extend_content(url, "default", eid, Selection(), ROUTER, plan)
    base = plan.base
    arrays = {r[len("predictor/"):-4]: base.npy(r) for r in base.files if r.startswith("predictor/") and r.endswith(".npy")}
    est = predictor_from_state(base.json("predictor/params.json"), arrays)
    ids = base.json("index/input_ids.json")
    X, _ = emb.read_matrix(Store(url), eid, ids)
    from benchroute.transforms.knn import normalize_rows

    H = dense_forward(normalize_rows(X), est.layers_[:-1], est.activations_[:-1])
    Y = PackedLabels.from_files(ext.files, "index/labels_").unpack(np.float64)
    j = [m["model"] for m in ext.meta["models"]].index(late)
    y = Y[:, j]
    ok = ~np.isnan(y) & np.isin(y, (0.0, 1.0))
    w, b = logistic_head(H[ok], y[ok])
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(H[ok], y[ok].astype(int))
    np.testing.assert_allclose(w, ref.coef_[0], atol=2e-3)
    assert b == pytest.approx(ref.intercept_[0], abs=2e-3)
    # and the bundle serves it: its probability of the late model beats the constant prior
    W1 = np.load(__import__("io").BytesIO(ext.files["predictor/W1.npy"]))
    b1 = np.load(__import__("io").BytesIO(ext.files["predictor/b1.npy"]))
    g = 1 / (1 + np.exp(-(H @ W1[:, j] + b1[j])))
    lab = ~np.isnan(y)
    p0 = np.clip(y[lab].mean(), 1e-6, 1 - 1e-6)
    ll = -np.mean(y[lab] * np.log(g[lab]) + (1 - y[lab]) * np.log(1 - g[lab]))
    ll0 = -np.mean(y[lab] * np.log(p0) + (1 - y[lab]) * np.log(1 - p0))
    assert ll < ll0


def test_the_extension_is_published_loaded_and_routes(landed, tmp_path):
    url, eid, late = landed
    dst = str(tmp_path / "store")
    shutil.copytree(url, dst)
    r = fit_and_publish(dst, "default", eid, Selection(), {}, ROUTER, incremental=True)
    assert r["created"] and r["extended"]
    router = load_router(dst, "default")
    assert late in router.model_names
    X, _ = emb.read_matrix(Store(dst), eid, open_bundle(dst, "default").json("index/input_ids.json")[:1])
    answer = router.route(np.asarray(X[0]), models=[late])  # the served path can pick it
    assert answer["model"] == late
    # nothing new since: no extension, a full build (which publishes the full fit)
    again = extension_plan(dst, "default", eid, Selection(), ROUTER)
    assert again == "no new labels since the base"


def test_an_extension_chain_stops_at_its_share_of_unmeasured_models(landed, tmp_path, monkeypatch):
    """The models added without a refit count over the whole chain of extensions: past
    ``MAX_UNMEASURED_SHARE`` of the last full build's models (one is always allowed) the plan
    asks for a full build."""
    from benchroute.artifacts import router_extend

    url, eid, late = landed
    dst = str(tmp_path / "store")
    shutil.copytree(url, dst)
    assert fit_and_publish(dst, "default", eid, Selection(), {}, ROUTER, incremental=True)["extended"]
    store = Store(dst)
    twin = lambda t: t.filter(pl.col("model") == late).with_columns(model=pl.lit(f"{late}-twin"))  # noqa: E731
    store.commit(append={"outcomes": twin(store.read("outcomes")), "labels": twin(store.read("labels"))})
    fitted = len(open_bundle(dst, "default").manifest["models"]) - 1
    plan = extension_plan(dst, "default", eid, Selection(), ROUTER)
    assert not isinstance(plan, str) and 2 <= router_extend.MAX_UNMEASURED_SHARE * fitted, plan
    monkeypatch.setattr(router_extend, "MAX_UNMEASURED_SHARE", 1.99 / fitted)  # the limit: 1.99 models
    why = extension_plan(dst, "default", eid, Selection(), ROUTER)
    assert isinstance(why, str) and "2 models added without a refit" in why and f"its {fitted}" in why
    monkeypatch.setattr(router_extend, "MAX_UNMEASURED_SHARE", 2.0 / fitted)  # exactly 2: allowed
    assert not isinstance(extension_plan(dst, "default", eid, Selection(), ROUTER), str)


def test_unmeasured_share_counts_the_chain_and_allows_one_model():
    from benchroute.artifacts.router_extend import _unmeasured_share, extension_chain

    chain = {"added_models": ["c"], "extends": {"added_models": ["a", "b"]}}
    assert [len(e["added_models"]) for e in extension_chain(chain)] == [1, 2]
    assert _unmeasured_share(chain, 33, 0) is None  # 3 of 30
    assert "4 models" in _unmeasured_share(chain, 33, 1)  # 4 of 30 > 3
    assert _unmeasured_share(None, 5, 1) is None  # one model on a tiny base
    assert "2 models" in _unmeasured_share(None, 5, 2)


def test_what_cannot_be_extended_says_why(landed, tmp_path):
    url, eid, late = landed
    copies = iter(range(10))

    def fresh() -> tuple[str, Store]:
        dst = str(tmp_path / f"store{next(copies)}")
        shutil.copytree(url, dst)
        return dst, Store(dst)

    dst, store = fresh()
    assert extension_plan(dst, "default", eid, Selection(models=("x*",)), ROUTER).startswith("the base was built with another")
    assert "cannot be extended" in extension_plan(dst, "default", eid, Selection(), RouterSpec(predictor="factorized"))
    labels = store.read("labels")
    # the record of the base's parts is missing, or does not verify: a full build
    import json as json_
    from benchroute.artifacts.router_extend import _built_from_path

    version = open_bundle(dst, "default").manifest["version"]
    path = _built_from_path(dst, "default", version)
    rec = json_.loads(open(path).read())
    rec["basis"]["labels"] = rec["basis"]["labels"][:-1]  # claims fewer parts: more would look new
    open(path, "w").write(json_.dumps(rec))
    assert "no verified record" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    dst, store = fresh()
    __import__("os").remove(_built_from_path(dst, "default", version))
    assert "no verified record" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    dst, store = fresh()
    # labels of a model the base holds landed too: a full build
    other = labels.filter(pl.col("model") != late)["model"][0]
    store.commit(append={"labels": labels.filter(pl.col("model") == other).head(3)})
    assert "models the base holds" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    # a relabel rewrote the labels: a full build
    dst, store = fresh()
    store.commit(replace={"labels": store.read("labels")})
    assert "rewritten" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    # the late model on an input the base does not index
    dst, store = fresh()
    row = labels.filter(pl.col("model") == late).head(1).with_columns(input_id=pl.lit("f" * 32))
    store.commit(append={"labels": row})
    assert "inputs the base does not index" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    # an indexed input joined another dataset: its member row changed
    dst, store = fresh()
    mem = store.read("memberships")
    first = mem["input_id"][0]
    elsewhere = sorted(set(mem["dataset"]) - set(mem.filter(pl.col("input_id") == first)["dataset"]))[0]
    moved = mem.head(1).with_columns(dataset=pl.lit(elsewhere))
    store.commit(append={"memberships": moved, "labels": labels.filter(pl.col("model") == late).head(2)})
    assert "memberships" in extension_plan(dst, "default", eid, Selection(), ROUTER)
    # outcomes of a model the base holds landed (with the late model's labels)
    dst, store = fresh()
    outcomes = store.read("outcomes")
    store.commit(append={"outcomes": outcomes.filter(pl.col("model") == other).head(2),
                         "labels": labels.filter(pl.col("model") == late).head(2)})
    assert "outcomes of models the base holds" in extension_plan(dst, "default", eid, Selection(), ROUTER)


KNN = RouterSpec(predictor="knn", k=5)


def test_a_knn_bundle_extended_equals_the_full_build_but_for_the_curve(embedded_sample_store, tmp_path):
    """With the kNN predictor nothing is refitted in either path: the extension's files equal a
    full build's byte for byte except the held-out curve. The late model's outcomes land before
    the base is built and its labels after (ingest commits, then relabels): its recorded output
    tokens are in a part the base was built from, and still found."""
    from benchroute.transforms import costs as costs_

    url = str(tmp_path / "store")
    shutil.copytree(embedded_sample_store, url)
    store = Store(url)
    labels, outcomes = store.read("labels"), store.read("outcomes")
    with_tokens = outcomes.filter(pl.col("metric").is_in(list(costs_.OUTPUT_METRICS)))["model"].unique()
    both = sorted(set(with_tokens) & set(labels["model"]))
    late = both[len(both) // 2]
    store.commit(replace={"labels": labels.filter(pl.col("model") != late)})
    eid = emb.embedders(store)[0]
    fit_and_publish(url, "default", eid, Selection(), {}, KNN)
    store.commit(append={"labels": labels.filter(pl.col("model") == late)})
    plan = extension_plan(url, "default", eid, Selection(), KNN)
    assert not isinstance(plan, str), plan
    ext = extend_content(url, "default", eid, Selection(), KNN, plan)
    full = bundle_content(url, "default", eid, Selection(), {}, KNN)
    assert ext.files.keys() == full.files.keys()
    differ = sorted(f for f in full.files if ext.files[f] != full.files[f])
    assert differ == ["routing/curve.parquet", "routing/summary.json"] or differ == ["routing/summary.json"], differ
    assert {k: v for k, v in ext.meta["parameters"].items() if k != "extension"} == full.meta["parameters"]
    assert ext.meta["models"] == full.meta["models"]
    tokens = pl.read_parquet(ext.files["models.parquet"]).filter(pl.col("model") == late)["expected_output_tokens"][0]
    assert tokens != costs_.DEFAULT_OUTPUT_TOKENS  # read from the part the base was built from
