"""Pair routers as bundle files, and the decision-only API over them (issue 14, item 5).

``build_pair_routing(X, data, pairs)`` fits the routers on all but a seeded ``calib_fraction`` of
the inputs and calibrates every (router, pair) on that calibration set; ``pair_files(routing)``
turns the result into bundle files (JSON, ``.npy``, Parquet — never pickles) under ``pairs/``::

    pairs/settings.json              routers (name → class), default router, pairs, shares, key rule
    pairs/<router>/params.json       ``to_state()`` params of each router
    pairs/<router>/<array>.npy       its arrays (the SW router's index only when not shared)
    pairs/fit_rows.npy               with a shared index: the index rows the routers were fitted on
    pairs/calibration.parquet        router, strong, weak, target_share, alpha, tau, share, n

``PairRouting.from_files(get)`` (``get(rel) -> bytes``) loads them back; then

- ``route(X, strong, weak, strong_share=… | threshold=…, router=None)``: the decision for one
  query embedding: ``{"model", "decision", "win_probability", "threshold", "tau", "strong_share",
  "router", "strong", "weak"}``; ``strong_share`` reads (α, τ) from the stored calibration of
  that pair (``pair_calibration.threshold_for``), ``threshold`` is α itself (τ = 1);
- ``calibrate(X, strong, weak, shares=None, router=None)``: on a user's own unlabelled query
  embeddings: per target share the user's (α, τ) and the share the stored threshold gives them
  (``pair_calibration.recalibrate``).

Ties at α are split by ``pair_routers.query_keys`` of the query (the same query, the same answer).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchroute.io import npy_bytes
import pyarrow as pa
import pyarrow.parquet as pq

from benchroute.transforms import pair_calibration as calib
from benchroute.transforms.pair_labels import PairError, WinData
from benchroute.transforms.pair_routers import (
    PairRouter,
    make_pair_router,
    pair_router_from_state,
    query_keys,
)

FORMAT = 1
DEFAULT_SERVED: dict[str, tuple[str, dict]] = {
    "mf": ("mf", {}),
    "sw_ranking": ("sw_ranking", {}),
    "diff": ("diff", {"predictor": "mlp", "models": "all"}),
}
CAL_COLUMNS = [("router", pa.string()), ("strong", pa.string()), ("weak", pa.string()),
               ("target_share", pa.float64()), ("alpha", pa.float64()), ("tau", pa.float64()),
               ("share", pa.float64()), ("n", pa.int64())]


@dataclass
class PairRouting:
    """Fitted pair routers and their calibration (see module doc)."""

    routers: dict[str, PairRouter]
    calibration: list[dict]
    default_router: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    shares: tuple[float, ...] = calib.DEFAULT_SHARES
    fit_rows: np.ndarray | None = None  # the rows of the training data the routers were fitted on

    def _router(self, name: str | None) -> tuple[str, PairRouter]:
        name = name or self.default_router
        if name not in self.routers:
            raise PairError(f"unknown pair router {name!r}; this bundle has {sorted(self.routers)}")
        return name, self.routers[name]

    def _table(self, name: str, strong: str, weak: str) -> list[dict]:
        return [r for r in self.calibration if r["router"] == name and r["strong"] == strong and r["weak"] == weak]

    def scores(self, X, strong: str, weak: str, router: str | None = None) -> np.ndarray:
        _, r = self._router(router)
        return r.predict_proba(np.atleast_2d(np.asarray(X, np.float32)), strong=strong, weak=weak)

    def route(self, X, strong: str, weak: str, *, strong_share: float | None = None,
              threshold: float | None = None, router: str | None = None) -> dict:
        """The decision for one query embedding (module doc)."""
        if (strong_share is None) == (threshold is None):
            raise PairError("give exactly one of strong_share and threshold")
        name, r = self._router(router)
        X = np.atleast_2d(np.asarray(X, np.float32))
        if X.shape[0] != 1:
            raise PairError(f"route takes one query, got {X.shape[0]}")
        p = float(r.predict_proba(X, strong=strong, weak=weak)[0])
        if threshold is not None:
            alpha, tau = float(threshold), 1.0
            if not np.isfinite(alpha):
                raise PairError("threshold must be a finite number")
        else:
            table = self._table(name, strong, weak)
            if not table:
                raise PairError(f"no stored calibration for {strong} / {weak} with {name}: pass threshold, "
                                "or calibrate on your queries")
            alpha, tau = calib.threshold_for(table, strong_share)
        go = bool(calib.decide(np.array([p]), alpha, tau, query_keys(X))[0])
        return {"model": strong if go else weak, "decision": "strong" if go else "weak", "win_probability": p,
                "threshold": alpha, "tau": tau, "strong_share": strong_share, "router": name,
                "strong": strong, "weak": weak}

    def calibrate(self, X, strong: str, weak: str, *, shares: Sequence[float] | None = None,
                  router: str | None = None) -> list[dict]:
        """Thresholds recomputed on a user's query embeddings, with the stored ones' share there."""
        name, r = self._router(router)
        X = np.atleast_2d(np.asarray(X, np.float32))
        p = r.predict_proba(X, strong=strong, weak=weak)
        table = self._table(name, strong, weak)
        return calib.recalibrate(p, table or None, keys=query_keys(X),
                                 shares=shares if shares is not None or table else self.shares)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_files(cls, get: Callable[[str], bytes], names: Sequence[str],
                   index: Mapping[str, tuple] | None = None) -> PairRouting:
        """Rebuild from bundle files: ``get(rel)`` returns a file's bytes, ``names`` lists the
        bundle's relative paths; ``index``: router name → the whole training data's arrays, e.g.
        (X, Q) (for routers stored without their index; ``pairs/fit_rows.npy`` selects the rows
        they were fitted on)."""
        settings = json.loads(get("pairs/settings.json"))
        if settings.get("format") != FORMAT:
            raise ValueError(f"pairs/settings.json format {settings.get('format')!r}; this code reads {FORMAT}")
        rows = np.load(io.BytesIO(get("pairs/fit_rows.npy")), allow_pickle=False) \
            if "pairs/fit_rows.npy" in names else None
        routers = {}
        for name in settings["routers"]:
            prefix = f"pairs/{name}/"
            arrays = {rel[len(prefix):-4]: np.load(io.BytesIO(get(rel)), allow_pickle=False)
                      for rel in names if rel.startswith(prefix) and rel.endswith(".npy")}
            params = json.loads(get(prefix + "params.json"))
            idx = (index or {}).get(name)
            if idx is not None and rows is not None:
                idx = tuple(np.asarray(a)[rows] for a in idx)
            routers[name] = pair_router_from_state(params, arrays, idx)
        cal = pq.read_table(io.BytesIO(get("pairs/calibration.parquet"))).to_pylist()
        return cls(routers, cal, settings["default_router"], [tuple(p) for p in settings["pairs"]],
                   tuple(settings["shares"]), rows)


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()




def pair_files(routing: PairRouting, *, shared_index: Sequence[str] = ()) -> dict[str, bytes]:
    """The ``pairs/`` files of a bundle; routers named in ``shared_index`` are stored without
    their index (the bundle passes its whole (X, Q) back to ``from_files``; the rows they were
    fitted on go to ``pairs/fit_rows.npy``)."""
    files: dict[str, bytes] = {}
    if shared_index:
        if routing.fit_rows is None:
            raise ValueError("a shared index needs the routing's fit_rows")
        files["pairs/fit_rows.npy"] = npy_bytes(np.asarray(routing.fit_rows, np.int64))
    for name, r in routing.routers.items():
        params, arrays = r.to_state(include_index=name not in shared_index)
        files[f"pairs/{name}/params.json"] = _json(params)
        for k, v in arrays.items():
            files[f"pairs/{name}/{k}.npy"] = npy_bytes(v)
    files["pairs/settings.json"] = _json({
        "format": FORMAT,
        "routers": {n: type(r).__name__ for n, r in routing.routers.items()},
        "default_router": routing.default_router,
        "pairs": [list(p) for p in routing.pairs],
        "shares": list(routing.shares),
        "decision": "strong when p > alpha, or p == alpha and key < tau; key = blake2b of the "
                    "L2-normalised embedding in float16 (pair_routers.query_keys)",
    })
    table = pa.Table.from_pylist([{c: r[c] for c, _ in CAL_COLUMNS} for r in routing.calibration],
                                 schema=pa.schema(CAL_COLUMNS))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    files["pairs/calibration.parquet"] = buf.getvalue()
    return files


def build_pair_routing(
    X: np.ndarray,
    data: WinData,
    pairs: Sequence[tuple[str, str]],
    *,
    routers: Mapping[str, tuple[str, Mapping]] | None = None,
    default_router: str | None = None,
    calib_fraction: float = 0.1,
    shares: Sequence[float] = calib.DEFAULT_SHARES,
    seed: int = 0,
) -> PairRouting:
    """Fit the routers on all but a seeded ``calib_fraction`` of the inputs, then calibrate every
    (router, pair) on the rest (its queries' scores; no labels needed)."""
    routers = dict(routers or DEFAULT_SERVED)
    if not pairs:
        raise PairError("no pairs to serve")
    for s, w in pairs:
        data.model_index(s), data.model_index(w)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(data.input_ids))
    n_cal = int(round(calib_fraction * perm.size))
    cal, fit = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    fit_data = data.rows(fit)
    fitted: dict[str, PairRouter] = {}
    for name, (key, params) in routers.items():
        fitted[name] = make_pair_router(key, **dict(params)).fit(X[fit], fit_data, pair=tuple(pairs[0]))
    keys = query_keys(X[cal])
    rows = []
    for name, r in fitted.items():
        for s, w in pairs:
            p = r.predict_proba(X[cal], strong=s, weak=w)
            for row in calib.calibrate(p, shares, keys=keys):
                rows.append({"router": name, "strong": s, "weak": w, **row})
    return PairRouting(fitted, rows, default_router or next(iter(routers)), [tuple(p) for p in pairs],
                       tuple(float(x) for x in shares), fit)
