"""Training-only router selection (issue 14): validation tasks are built inside the training pool,
so the held-out benchmark's labels can never pick the router."""

import numpy as np

from benchroute.transforms.pair_labels import WinData
from benchroute.transforms.pair_select import candidate_routers, hide_labels, select_router, validation_tasks

MODELS = ["strong", "weak", "best", "other"]
DATASETS = ["fa/x", "fa/y", "fa/z", "fb", "held"]
CANDIDATES = {
    "knn": ("diff", {"predictor": "knn_shrunk", "predictor_params": {"n_neighbors": 10}, "models": "all"}),
    "irt": ("irt", {"n_neighbors": 10}),
    "random": ("random", {}),
}


def world(n_per=150, d=12, seed=0):
    """Five datasets of n_per inputs. The pair ran together on fb and held only; 'best' (most
    accurate) and 'weak' ran on the fa family; a topic direction decides who is right."""
    rng = np.random.default_rng(seed)
    D = len(DATASETS)
    ds = np.repeat(np.arange(D), n_per)
    n = ds.size
    X = rng.standard_normal((n, d)).astype(np.float32)
    hard = X[:, 0] > 0
    Y = np.full((n, 4), np.nan)
    Y[:, 0] = rng.random(n) < np.where(hard, 0.8, 0.95)
    Y[:, 1] = rng.random(n) < np.where(hard, 0.2, 0.9)
    Y[:, 2] = rng.random(n) < np.where(hard, 0.9, 0.97)
    Y[:, 3] = rng.random(n) < 0.5
    fa = ds <= 2
    Y[fa, 0] = np.nan  # the strong model never ran on the fa family
    Y[~fa, 2] = np.nan
    member = np.zeros((n, D), bool)
    member[np.arange(n), ds] = True
    data = WinData([f"{i:064x}" for i in range(n)], list(MODELS), list(DATASETS), Y.copy(), Y.copy(), member)
    return X, data


def test_validation_tasks_stay_in_the_pool_and_use_a_proxy_where_the_pair_never_ran():
    _, data = world()
    pool = np.flatnonzero(~data.in_datasets(["held"]))
    tasks = {t["family"]: t for t in validation_tasks(data, pool, "strong", "weak", min_test=50)}
    assert set(tasks) == {"fa", "fb"}  # 'held' is outside the pool
    fa, fb = tasks["fa"], tasks["fb"]
    assert fa["heldout"] == ["fa/x", "fa/z"] and fa["family_datasets"] == ["fa/x", "fa/y", "fa/z"]
    assert fa["proxy"] and fa["strong"] == "best" and fa["hide"] == ["best"] and fa["n"] == 300
    assert not fb["proxy"] and fb["strong"] == "strong" and fb["hide"] == []
    # The proxy's labels are hidden on the family's training part, kept on its held-out part.
    sub = data.rows(pool)
    h = hide_labels(sub, fa)
    train_fa, test_fa = sub.in_datasets(["fa/y"]), sub.in_datasets(["fa/x", "fa/z"])
    assert np.isnan(h.Y[train_fa, 2]).all() and not np.isnan(h.Y[test_fa, 2]).any()
    assert np.array_equal(h.Y[:, 1], sub.Y[:, 1], equal_nan=True)
    assert hide_labels(sub, fb) is sub


def test_selection_never_reads_labels_outside_the_pool():
    X, data = world()
    held = data.in_datasets(["held"])
    pool = np.flatnonzero(~held)
    cands = candidate_routers(CANDIDATES)
    assert set(cands) == {"knn", "irt"}  # baselines are not candidates
    best, table = select_router(data, X, pool, "strong", "weak", cands, min_test=50, dedup=None)
    assert best in cands and set(table["task"]) == {"fa", "fb"} and set(table["router"]) == set(cands)
    assert table["apgr"].is_finite().all()
    # Scrambling every held-out label changes nothing: they are never read.
    Y = data.Y.copy()
    rng = np.random.default_rng(5)
    Y[held] = np.where(np.isnan(Y[held]), np.nan, rng.random(Y[held].shape) < 0.5)
    other = WinData(data.input_ids, data.models, data.datasets, Y.copy(), Y, data.member)
    best2, table2 = select_router(other, X, pool, "strong", "weak", cands, min_test=50, dedup=None)
    assert best2 == best and table2.equals(table)
    # Without any validation task there is nothing to select.
    assert select_router(data, X, pool, "strong", "weak", cands, min_test=10_000)[0] is None


def test_selection_picks_the_router_that_validates_better():
    X, data = world()
    pool = np.flatnonzero(~data.in_datasets(["held"]))
    cands = {"knn": CANDIDATES["knn"], "flat": ("diff", {"predictor": "knn_shrunk", "models": "all",
                                                         "predictor_params": {"n_neighbors": 10, "strength": 1e9}})}
    best, table = select_router(data, X, pool, "strong", "weak", cands, min_test=50, dedup=None)
    mean = {r: table.filter(table["router"] == r)["apgr"].mean() for r in cands}
    assert best == max(mean, key=mean.get) == "knn"
    # Baselines are recognised by their registry key, whatever their name in the table.
    assert candidate_routers({"a": ("random", {}), "b": ("oracle", {}), "c": ("irt", {})}) == {"c": ("irt", {})}
