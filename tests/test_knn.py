"""The shared kNN search and g_m: hand-checked values, brute force, and scikit-learn's reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from benchroute.transforms.knn import (
    KNNCorrectness,
    Neighbors,
    aggregate_labels,
    cosine_topk,
    grouped_topk,
    normalize_rows,
    topk_of_rows,
)


def _data(n=120, nq=30, dim=8, M=4, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    Q = rng.normal(size=(nq, dim)).astype(np.float32)
    Y = (rng.random((n, M)) < np.linspace(0.2, 0.8, M)).astype(np.float64)
    if missing:
        Y[rng.random((n, M)) < missing] = np.nan
    return X, Q, Y


def _brute(Q, X, k, exclude=None):
    S = normalize_rows(Q).astype(np.float64) @ normalize_rows(X).T.astype(np.float64)
    if exclude is not None:
        S[:, exclude] = -np.inf
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def test_normalize_rows_unit_norm_and_zero_row():
    X = np.array([[3.0, 4.0], [0.0, 0.0]])
    N = normalize_rows(X)
    assert N.dtype == np.float32
    np.testing.assert_allclose(N, [[0.6, 0.8], [0.0, 0.0]])


def test_topk_of_rows_orders_by_value_then_column_and_marks_missing():
    S = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, -np.inf, -np.inf, -np.inf]], np.float32)
    idx, val = topk_of_rows(S, 3)
    assert idx.tolist() == [[1, 3, 2], [0, -1, -1]]
    np.testing.assert_allclose(val[0], [0.9, 0.9, 0.5])
    idx, val = topk_of_rows(S[:, :2], 3)  # fewer columns than k: padded
    assert idx.tolist() == [[1, 0, -1], [0, -1, -1]]


def test_topk_ties_at_the_cut_go_to_the_lower_column():
    S = np.array([[0.5, 0.9, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], np.float32)
    assert topk_of_rows(S, 2)[0].tolist() == [[1, 0], [0, 1]]
    assert topk_of_rows(S, 3)[0].tolist() == [[1, 0, 2], [0, 1, 2]]


def test_cosine_topk_matches_brute_force_across_blocks_with_exclusions():
    X, Q, _ = _data()
    Xn, Qn = normalize_rows(X), normalize_rows(Q)
    exclude = np.zeros(len(X), bool)
    exclude[::7] = True
    got = cosine_topk(Qn, Xn, 6, exclude=exclude, max_block_bytes=4 * len(X) * 4)  # 4 rows/block
    np.testing.assert_array_equal(got.indices, _brute(Q, X, 6, exclude))
    assert not np.isin(got.indices, np.flatnonzero(exclude)).any()
    sims = np.sum(Qn[:, None, :] * Xn[got.indices], axis=2)
    np.testing.assert_allclose(got.similarities, sims, atol=1e-5)


def test_cosine_topk_self_rows_leave_one_out():
    X, _, _ = _data(n=50)
    Xn = normalize_rows(X)
    got = cosine_topk(Xn, Xn, 3, self_rows=np.arange(50))
    assert not (got.indices == np.arange(50)[:, None]).any()
    plain = cosine_topk(Xn, Xn, 1)
    assert (plain.indices[:, 0] == np.arange(50)).all()


def test_aggregate_labels_skips_missing_and_falls_back():
    nb = Neighbors(np.array([[0, 1, 2], [2, -1, -1]]), np.array([[0.9, 0.8, 0.7], [0.5, -np.inf, -np.inf]], np.float32))
    Y = np.array([[1.0, np.nan, np.nan], [0.0, 1.0, np.nan], [1.0, np.nan, np.nan]])
    G = aggregate_labels(nb, Y)
    # model 0: (1 + 0 + 1) / 3; model 1: only row 1 has a label -> 1; model 2: none -> NaN
    np.testing.assert_allclose(G[0], [2 / 3, 1.0, np.nan])
    np.testing.assert_allclose(G[1], [1.0, np.nan, np.nan])  # a missing label is not a 0
    G = aggregate_labels(nb, Y, fallback=np.array([0.1, 0.2, 0.3]))
    np.testing.assert_allclose(G[1], [1.0, 0.2, 0.3])


def test_aggregate_labels_distance_weights_by_hand():
    nb = Neighbors(np.array([[0, 1]]), np.array([[0.9, 0.5]], np.float32))
    Y = np.array([[1.0], [0.0]])
    # distances 0.1 and 0.5 -> weights 10 and 2 -> 10 / 12
    np.testing.assert_allclose(aggregate_labels(nb, Y, weights="distance"), [[10 / 12]], rtol=1e-5)


def test_aggregate_labels_zero_distance_takes_all_weight_among_labelled():
    nb = Neighbors(np.array([[0, 1, 2]]), np.array([[1.0, 0.9, 0.5]], np.float32))
    Y = np.array([[1.0, np.nan], [0.0, 0.0], [0.0, 1.0]])
    G = aggregate_labels(nb, Y, weights="distance")
    # model 0: the exact match decides; model 1: it has no label, so 1/d weights of the others
    np.testing.assert_allclose(G, [[1.0, 2.0 / 12.0]], rtol=1e-5)


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_equals_scikit_learn_kneighbors_classifier(weights):
    X, Q, Y = _data(n=150, nq=40, M=5, seed=3)
    k = 7
    ours = KNNCorrectness(k, weights=weights).fit(X, Y)
    G = ours.predict_proba(Q)
    for m in range(Y.shape[1]):
        ref = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=weights)
        ref.fit(X, Y[:, m].astype(int))
        proba = ref.predict_proba(Q)
        p1 = proba[:, list(ref.classes_).index(1)] if 1 in ref.classes_ else np.zeros(len(Q))
        np.testing.assert_allclose(G[:, m], p1, atol=1e-5)
        # same neighbours, in the same order (the data has no distance ties)
        np.testing.assert_array_equal(ours.kneighbors(Q).indices, ref.kneighbors(Q, return_distance=False))


def test_missing_labels_match_a_shared_reference_search():
    X, Q, Y = _data(n=150, nq=40, M=5, seed=4, missing=0.3)
    k = 6
    G = KNNCorrectness(k, fallback="nan").fit(X, Y).predict_proba(Q)
    ref = KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(X, np.zeros(len(X), int))
    idx = ref.kneighbors(Q, return_distance=False)
    with np.errstate(invalid="ignore"):
        expected = np.nanmean(Y[idx], axis=1)  # mean of the available labels of the k neighbours
    np.testing.assert_allclose(G, expected, atol=1e-12)


def test_estimator_habits_and_fallback():
    X, Q, Y = _data(n=40, M=3)
    Y[:, 2] = np.nan
    Y[:5, 2] = 1.0
    est = KNNCorrectness(3)
    assert est.fit(X, Y) is est
    assert est.n_features_in_ == 8 and est.n_outputs_ == 3
    np.testing.assert_allclose(est.train_mean_[2], 1.0)
    G = est.predict_proba(Q)
    assert not np.isnan(G).any()  # no labelled neighbour -> the training mean
    assert set(np.unique(est.predict(Q))) <= {0, 1}
    with pytest.raises(ValueError):
        KNNCorrectness(3, weights="cosine").fit(X, Y)
    with pytest.raises(ValueError):
        KNNCorrectness(3).fit(X, Y[:10])


def test_grouped_merge_is_exact_for_every_union_of_groups():
    X, _, _ = _data(n=200, seed=5)
    Xn = normalize_rows(X)
    groups = np.random.default_rng(1).integers(0, 5, len(X))
    grouped = grouped_topk(Xn, Xn, groups, 4, self_rows=np.arange(len(X)), max_block_bytes=30 * 200 * 4)
    for allowed in ([1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 0, 0]):
        allowed = np.array(allowed, bool)
        got = grouped.merge(allowed, rows=np.arange(0, 200, 3))
        ref = cosine_topk(Xn[::3], Xn, 4, exclude=~allowed[groups], self_rows=np.arange(0, 200, 3))
        np.testing.assert_array_equal(got.indices, ref.indices)
        np.testing.assert_allclose(got.similarities, ref.similarities, atol=1e-6)


def test_grouped_merge_equals_one_search_with_duplicate_vectors():
    rng = np.random.default_rng(7)
    base = normalize_rows(rng.normal(size=(30, 6)))
    X = np.vstack([base, base, base[:10]])  # every vector at least twice: exact ties everywhere
    groups = np.repeat([2, 0, 1], [30, 30, 10])
    grouped = grouped_topk(X, X, groups, 5)
    for allowed in ([1, 1, 1], [0, 1, 1], [1, 0, 1]):
        allowed = np.array(allowed, bool)
        got = grouped.merge(allowed)
        ref = cosine_topk(X, X, 5, exclude=~allowed[groups])
        np.testing.assert_allclose(got.similarities, ref.similarities, atol=1e-6)
        # bitwise-equal vectors have equal canonical similarities: the tie goes to the lower row
        np.testing.assert_array_equal(got.indices, ref.indices)


def test_searched_neighbors_answer_every_merge_as_the_stored_lists():
    """Above ``GROUPED_MAX_BYTES`` the per-group lists are not kept: each merge searches, with the
    groups that are not allowed and the query's own row excluded, and finds the same rows."""
    from benchroute.transforms.knn import SearchedNeighbors, self_neighbors

    X, _, _ = _data(n=200, seed=5)
    Xn = normalize_rows(X)
    groups = np.random.default_rng(1).integers(0, 5, len(X))
    kept = self_neighbors(Xn, groups, 4)
    searched = self_neighbors(Xn, groups, 4, max_bytes=200 * 5 * 4 * 12 - 1)
    assert not isinstance(kept, SearchedNeighbors) and isinstance(searched, SearchedNeighbors)
    for allowed in ([1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 0, 0]):
        allowed = np.array(allowed, bool)
        for rows in (None, np.arange(0, 200, 3)):
            for k in (None, 3):
                a, b = kept.merge(allowed, rows=rows, k=k), searched.merge(allowed, rows=rows, k=k)
                np.testing.assert_array_equal(a.indices, b.indices)
                np.testing.assert_allclose(a.similarities, b.similarities, atol=1e-6)
    with pytest.raises(ValueError, match="cannot merge"):
        searched.merge(np.ones(5, bool), k=5)


def test_covered_marks_models_with_a_labelled_neighbour():
    from benchroute.transforms.knn import Neighbors, covered

    nan = np.nan
    Y = np.array([[1.0, nan, nan], [nan, 0.0, nan], [0.0, nan, nan]])
    neigh = Neighbors(np.array([[0, 2], [1, -1], [2, -1]]), np.zeros((3, 2), np.float32))
    # Query 0 sees rows 0 and 2 (model 0 only); query 1 row 1 (model 1); -1 is no neighbour.
    assert covered(neigh, Y).tolist() == [[True, False, False], [False, True, False], [True, False, False]]


def test_narrowed_lists_search_again_only_where_a_neighbour_is_now_left_out():
    """``narrowed``: the top-k among fewer rows from the top-k among more, searching again only
    the queries whose list held a row now left out; equal to searching every query anew."""
    from benchroute.transforms.knn import cosine_topk, narrowed

    X, _, _ = _data(n=120, seed=7)
    Xn = normalize_rows(X)
    Q = np.arange(0, 120, 4)
    base = cosine_topk(Xn[Q], Xn, 5, self_rows=Q)
    allowed = np.ones(120, bool)
    allowed[np.r_[10:40]] = False
    asked = []

    def search(at):
        asked.append(at)
        return cosine_topk(Xn[Q[at]], Xn, 5, exclude=~allowed, self_rows=Q[at])

    got = narrowed(base, allowed, search)
    ref = cosine_topk(Xn[Q], Xn, 5, exclude=~allowed, self_rows=Q)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.similarities, ref.similarities, atol=1e-6)
    stale = (~allowed[base.indices]).any(axis=1)
    assert 0 < stale.sum() < len(Q)  # both kinds of query are exercised
    np.testing.assert_array_equal(np.concatenate(asked), np.flatnonzero(stale))
    assert narrowed(base, np.ones(120, bool), search) is base


def _near_duplicates(n_base=30, copies=8, d=384, seed=0):
    """Inputs in clusters of near-identical embeddings: each copy of a vector nudged by a few
    ulps in three coordinates, so its similarities differ from its twins' by about the float32
    rounding of a matrix product (on this data, ordering by the products themselves gives
    another top 5 for ~a third of the rows when the queries are cut into other blocks)."""
    rng = np.random.default_rng(seed)
    X = np.repeat(normalize_rows(rng.normal(size=(n_base, d))), copies, axis=0)
    j = rng.integers(0, d, (len(X), 3))
    np.put_along_axis(X, j, np.take_along_axis(X, j, 1) * np.float32(1 + 2**-22), 1)
    return np.ascontiguousarray(X[rng.permutation(len(X))])


def _canonical_reference(Q, X, k, exclude=None, self_rows=None):
    """Top k by (canonical similarity desc, row asc) from every pair scored one by one."""
    from benchroute.transforms.knn import canonical_similarity

    n, m = len(Q), len(X)
    qi, xi = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
    C = canonical_similarity(Q, X, qi.ravel(), xi.ravel()).reshape(n, m)
    if exclude is not None:
        C[:, exclude] = -np.inf
    if self_rows is not None:
        C[np.arange(n), self_rows] = -np.inf
    return np.lexsort((np.broadcast_to(np.arange(m), (n, m)), -C), axis=-1)[:, :k]


def test_canonical_similarity_of_a_pair_does_not_depend_on_the_other_pairs():
    from benchroute.transforms.knn import canonical_similarity

    X = _near_duplicates(n_base=5, copies=4)
    q, x = np.repeat(np.arange(20), 20), np.tile(np.arange(20), 20)
    together = canonical_similarity(X, X, q, x)
    alone = np.array([canonical_similarity(X, X, q[i : i + 1], x[i : i + 1])[0] for i in range(0, 400, 37)])
    np.testing.assert_array_equal(together[::37], alone)
    np.testing.assert_allclose(together, np.einsum("ij,ij->i", X[q].astype(np.float64), X[x]), atol=1e-6)


def test_neighbours_of_near_duplicates_do_not_depend_on_how_the_search_is_blocked():
    """The order is the canonical similarity's, not the matrix product's: whole, in blocks of 7
    queries, or one query at a time, the same rows as scoring every pair alone."""
    X = _near_duplicates()
    n = len(X)
    ref = _canonical_reference(X, X, 5, self_rows=np.arange(n))
    whole = cosine_topk(X, X, 5, self_rows=np.arange(n))
    blocks = cosine_topk(X, X, 5, self_rows=np.arange(n), max_block_bytes=7 * n * 4)
    single = np.vstack([cosine_topk(X[i : i + 1], X, 5, self_rows=np.array([i])).indices for i in range(n)])
    for got in (whole.indices, blocks.indices, single):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(whole.similarities, blocks.similarities, atol=1e-6)


def test_more_near_equal_rows_than_spare_candidates_are_all_scored_again():
    """Twenty bitwise-equal copies around the k-th place (more than ``SPARE``): the tie goes to
    the lowest rows; with clusters of 40 near-equal rows every row that close is scored again."""
    from benchroute.transforms.knn import SPARE

    rng = np.random.default_rng(3)
    base = normalize_rows(rng.normal(size=(6, 16)))
    X = np.vstack([base[1:], np.repeat(base[:1], SPARE + 12, axis=0)])
    got = cosine_topk(base[:1], X, 4)
    np.testing.assert_array_equal(got.indices[0], [5, 6, 7, 8])
    np.testing.assert_array_equal(got.indices, _canonical_reference(base[:1], X, 4))
    # clusters of 40 near-equal rows: the first k + SPARE products miss canonical members
    X = _near_duplicates(n_base=6, copies=40)
    got = cosine_topk(X, X, 5, self_rows=np.arange(len(X)), max_block_bytes=7 * len(X) * 4)
    np.testing.assert_array_equal(got.indices, _canonical_reference(X, X, 5, self_rows=np.arange(len(X))))


def test_grouped_searched_and_narrowed_lists_agree_on_near_duplicates():
    """Stored per-group lists merged, a search per merge, and lists narrowed from a wider fold
    give the same neighbours where rows are closer than float32 rounding."""
    from benchroute.transforms.knn import narrowed, self_neighbors

    X = _near_duplicates(seed=2)
    n = len(X)
    groups = np.random.default_rng(4).integers(0, 6, n)
    kept = self_neighbors(X, groups, 5)
    searched = self_neighbors(X, groups, 5, max_bytes=0)
    wide = np.array([1, 1, 1, 1, 1, 1], bool)
    base = kept.merge(wide)
    for allowed in ([1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 1]):
        allowed = np.array(allowed, bool)
        ref = _canonical_reference(X, X, 5, exclude=~allowed[groups], self_rows=np.arange(n))
        nar = narrowed(base, allowed[groups], lambda at: searched.merge(allowed, rows=at))
        for got in (kept.merge(allowed), searched.merge(allowed), nar):
            np.testing.assert_array_equal(got.indices, ref)


def test_keys_within_twice_the_tolerance_are_scored_again_across_binades():
    """The gap between two keys is taken in float64: 1.0 and -(2^-24 + 2^-26) are within 2 tol,
    but their float32 difference rounds past it (found by review): both are scored again."""
    from benchroute.transforms.knn import exact_order

    a, b = np.float32(1.0), np.float32(-(2.0**-24 + 2.0**-26))
    scored = []

    def score(r, cols):
        scored.extend(cols.tolist())
        return np.full(len(cols), 0.5, np.float32)

    i, _ = exact_order(np.array([[0, 1]]), np.array([[a, b]], np.float32), np.array([0.50000005]), 1,
                       score, presorted=True)
    assert sorted(scored) == [0, 1] and i.tolist() == [[0]]  # equal canonical values: the lower row


def test_a_zero_query_takes_the_lowest_allowed_rows_without_scoring_the_index_again():
    from benchroute.transforms import knn

    X = _near_duplicates(n_base=4, copies=10, d=16)
    exclude = np.zeros(len(X), bool)
    exclude[[0, 2]] = True
    scored = []
    real = knn.canonical_similarity
    knn.canonical_similarity = lambda *a: scored.append(len(a[2])) or real(*a)
    try:
        got = cosine_topk(np.zeros((1, 16), np.float32), X, 3, exclude=exclude)
    finally:
        knn.canonical_similarity = real
    assert got.indices.tolist() == [[1, 3, 4]] and (got.similarities == 0).all()
    assert sum(scored) <= 3 + knn.SPARE  # the spare candidates at most, never all 40 rows


def test_stored_group_lists_take_every_near_equal_row_of_a_group():
    """Per-group lists where one group holds more near-equal rows than spare candidates: merged,
    they equal the canonical reference (each group's list is cut by the short path too)."""
    X = _near_duplicates(n_base=4, copies=90, seed=5)
    n = len(X)
    groups = np.random.default_rng(6).integers(0, 3, n)
    grouped = grouped_topk(X, X, groups, 5, self_rows=np.arange(n), max_block_bytes=13 * n * 4)
    for allowed in ([1, 1, 1], [0, 1, 1], [1, 0, 0]):
        allowed = np.array(allowed, bool)
        ref = _canonical_reference(X, X, 5, exclude=~allowed[groups], self_rows=np.arange(n))
        np.testing.assert_array_equal(grouped.merge(allowed).indices, ref)
