"""A bundle round trip of pair routers: fit + calibrate → files (JSON/.npy/Parquet) → load →
the same decisions; route by strong share or threshold; recalibration on a user's queries."""

import io

import numpy as np
import pytest

from benchroute.transforms.pair_labels import PairError
from benchroute.transforms.pair_serving import PairRouting, build_pair_routing, pair_files

from test_pair_routers import synthetic

ROUTERS = {
    "mf": ("mf", {"dim": 8, "max_epochs": 10, "patience": 2, "lr": 1e-2}),
    "sw_ranking": ("sw_ranking", {}),
    "diff": ("diff", {"predictor": "knn_shrunk", "models": "all"}),
}


@pytest.fixture(scope="module")
def built():
    X, data, cl = synthetic(500)
    routing = build_pair_routing(X, data, [("strong", "weak"), ("mid", "weak")], routers=ROUTERS)
    return X, data, cl, routing


def test_bundle_round_trip_gives_the_same_decisions(built):
    X, data, cl, routing = built
    files = pair_files(routing)
    assert all(not rel.endswith((".pkl", ".pickle")) for rel in files)
    for rel, blob in files.items():
        if rel.endswith(".npy"):
            np.load(io.BytesIO(blob), allow_pickle=False)  # no object arrays
    loaded = PairRouting.from_files(files.__getitem__, list(files))
    assert set(loaded.routers) == set(ROUTERS) and loaded.default_router == "mf"
    assert loaded.calibration == routing.calibration
    for name in ROUTERS:
        for i in range(0, 500, 37):
            a = routing.route(X[i], "strong", "weak", strong_share=0.3, router=name)
            b = loaded.route(X[i], "strong", "weak", strong_share=0.3, router=name)
            assert a == b
    # Without their index: the bundle passes X, Q back.
    slim = pair_files(routing, shared_index=["sw_ranking"])
    assert not any(rel.startswith("pairs/sw_ranking/X_") for rel in slim)
    assert "pairs/fit_rows.npy" in slim
    # The bundle holds the whole index (every row, fitted or calibration); the routers' rows are
    # picked from it.
    again = PairRouting.from_files(slim.__getitem__, list(slim), index={"sw_ranking": (X, data.Q)})
    assert again.route(X[3], "strong", "weak", threshold=0.5, router="sw_ranking") == \
        routing.route(X[3], "strong", "weak", threshold=0.5, router="sw_ranking")


def test_route_answers_the_decision_and_the_win_probability(built):
    X, data, cl, routing = built
    out = routing.route(X[0], "strong", "weak", strong_share=0.5)
    assert set(out) == {"model", "decision", "win_probability", "threshold", "tau", "strong_share",
                        "router", "strong", "weak"}
    assert out["model"] == ("strong" if out["decision"] == "strong" else "weak")
    assert 0 <= out["win_probability"] <= 1
    # A threshold: p ≥ α is strong.
    p = out["win_probability"]
    assert routing.route(X[0], "strong", "weak", threshold=p)["decision"] == "strong"
    assert routing.route(X[0], "strong", "weak", threshold=np.nextafter(p, 2))["decision"] == "weak"
    # The stored thresholds give about their share on queries like the training mix.
    decisions = [routing.route(x, "strong", "weak", strong_share=0.3)["decision"] == "strong" for x in X[:300]]
    assert abs(np.mean(decisions) - 0.3) < 0.1
    # And the strong model is asked where it is needed (cluster 0).
    strong_rate = [np.mean([d for d, c in zip(decisions, cl[:300]) if c == k]) for k in range(3)]
    assert strong_rate[0] > strong_rate[1] and strong_rate[0] > strong_rate[2]
    with pytest.raises(PairError):
        routing.route(X[0], "strong", "weak")
    with pytest.raises(PairError):
        routing.route(X[0], "weak", "strong", strong_share=0.5)  # no calibration stored for that order
    with pytest.raises(PairError):
        routing.route(X[0], "strong", "weak", strong_share=0.5, router="bert")
    with pytest.raises(PairError):
        routing.route(X[:2], "strong", "weak", threshold=0.5)


def test_calibrate_on_user_queries(built):
    X, data, cl, routing = built
    user = X[cl == 0]  # a user whose queries all need the strong model more than usual
    rows = routing.calibrate(user, "strong", "weak", shares=[0.2, 0.5])
    assert [r["target_share"] for r in rows] == [0.2, 0.5]
    for r in rows:
        assert abs(r["share"] - r["target_share"]) <= 0.02
        assert r["stored_share"] is not None and r["stored_share"] > r["target_share"]
    # A pair with no stored calibration: the user's own thresholds only.
    own = routing.calibrate(user, "strong", "mid", shares=[0.5])
    assert own[0]["stored_share"] is None and abs(own[0]["share"] - 0.5) <= 0.02
