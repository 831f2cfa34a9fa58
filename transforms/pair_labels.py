"""Win labels for strong/weak model pairs (docs/method.md#win-labels-and-ties, RouteLLM), from the store's labels.

Every benchmark in the store yields training pairs for every model pair: on an input where both
models have a result, model a *wins* over b when its quality is higher, *loses* when lower and
*ties* when equal (within ``tie_eps``). Quality is the correctness label y(x, m) (golden labels:
y(strong) vs y(weak)) or, for judge-graded data (MT-Bench, metrics ``judge_score*``), the judge's
score (1–10, the mean of the two turns), as RouteLLM compares MT-Bench answers by score.

Ties are handled as RouteLLM does, per consumer (``TIES``):

- ``"half"``: a tie counts as half a win for each side. RouteLLM's Bradley–Terry fit
  (``compute_elo_mle_with_tie``) duplicates every battle and turns one copy of a tie into an a-win
  and the other into a b-win; the similarity-weighted ranking router uses it.
- ``"drop"``: ties are left out. RouteLLM's matrix factorisation trains only on battles with a
  winner (``winner in ["model_a", "model_b"]``).
- ``"weak"``: a tie means the strong model is *not needed* (label 0). RouteLLM's classifier
  routers (BERT, causal LLM) return 1 − P(tie or weak wins) as the strong win rate.

``WinData`` holds the arrays every pair router trains on: ``Q`` (n × M) the quality that decides
wins and that the evaluation averages (r(α)), ``Y`` (n × M) the binary correctness our
predictors ĝ_m learn, both NaN where the model has no result; an input in several datasets gets
the mean over them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

Ties = Literal["half", "drop", "weak"]
TIES: tuple[Ties, ...] = ("half", "drop", "weak")
SCORE_METRICS = r"^judge_score"  # metrics whose value (not y) is the quality compared


class PairError(ValueError):
    """A pair or model the data cannot answer for (message says which)."""


@dataclass(frozen=True)
class WinData:
    """Qualities and correctness of M models on n inputs, aligned to ``input_ids``.

    ``Q`` (n × M float64): the quality compared between models (y, or a judge score), NaN = no
    result; ``Y`` (n × M float64): binary correctness y (mean over datasets), NaN = none;
    ``member`` (n × D bool): the datasets of each input; ``score_datasets``: the datasets whose
    quality is a score rather than y."""

    input_ids: list[str]
    models: list[str]
    datasets: list[str]
    Q: np.ndarray
    Y: np.ndarray
    member: np.ndarray
    score_datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, M = len(self.input_ids), len(self.models)
        for name in ("Q", "Y"):
            a = getattr(self, name)
            if a.shape != (n, M):
                raise ValueError(f"{name} has shape {a.shape}, expected ({n}, {M})")
        if self.member.shape != (n, len(self.datasets)):
            raise ValueError(f"member has shape {self.member.shape}, expected ({n}, {len(self.datasets)})")

    def model_index(self, model: str | int) -> int:
        if isinstance(model, (int, np.integer)):
            if not 0 <= int(model) < len(self.models):
                raise PairError(f"model index {model} out of range (M = {len(self.models)})")
            return int(model)
        try:
            return self.models.index(model)
        except ValueError:
            raise PairError(f"unknown model {model!r}; the data holds {len(self.models)} models") from None

    def rows(self, rows: np.ndarray) -> WinData:
        """The same data on a subset of rows (indices or a boolean mask)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return WinData([self.input_ids[i] for i in rows], list(self.models), list(self.datasets),
                       self.Q[rows], self.Y[rows], self.member[rows], self.score_datasets)

    def columns(self, models: Sequence[str]) -> WinData:
        """The same rows restricted to ``models`` (in that order)."""
        idx = [self.model_index(m) for m in models]
        return WinData(list(self.input_ids), [self.models[j] for j in idx], list(self.datasets),
                       self.Q[:, idx], self.Y[:, idx], self.member, self.score_datasets)

    def in_datasets(self, patterns: Sequence[str]) -> np.ndarray:
        """(n,) bool: the inputs that belong to a dataset matching any of ``patterns`` (fnmatch,
        or a regex when it starts with '^'); an input in a held-out and a training dataset
        counts as held out."""
        return held_out_mask(self.datasets, self.member, patterns)

    def quality_range(self) -> float:
        """max − min of the finite qualities (1 for 0/1 labels): the oracle's score scale."""
        q = self.Q[np.isfinite(self.Q)]
        return float(q.max() - q.min()) if q.size and q.max() > q.min() else 1.0


def win_data_from_frames(
    labels: pl.DataFrame,
    memberships: pl.DataFrame | None = None,
    *,
    models: Sequence[str] | None = None,
    score_metrics: str = SCORE_METRICS,
    input_ids: Sequence[str] | None = None,
) -> WinData:
    """``WinData`` from the store's ``labels`` (input_id, dataset, model, metric, value, y) and
    ``memberships`` (input_id, dataset). A label whose metric matches ``score_metrics`` contributes
    its ``value`` to Q, every other its ``y``. Rows: ``input_ids`` (in that order; inputs with no
    label get all-NaN rows) or every labelled input, sorted."""
    lab = labels
    if models is not None:
        lab = lab.filter(pl.col("model").is_in(list(models)))
    lab = lab.select("input_id", "dataset", "model", "metric", "value", "y")
    is_score = lab["metric"].str.contains(score_metrics).fill_null(False)
    lab = lab.with_columns(
        q=pl.when(is_score).then(pl.col("value")).otherwise(pl.col("y").cast(pl.Float64)),
        is_score=is_score,
    )
    score_datasets = tuple(sorted(lab.filter(pl.col("is_score"))["dataset"].unique().to_list()))
    ids = list(input_ids) if input_ids is not None else sorted(lab["input_id"].unique().to_list())
    model_names = list(models) if models is not None else sorted(lab["model"].unique().to_list())
    mem = lab.select("input_id", "dataset")
    if memberships is not None:
        mem = pl.concat([memberships.select("input_id", "dataset"), mem])
    id_set = set(ids)
    mem = mem.filter(pl.col("input_id").is_in(list(id_set))).unique()
    dataset_names = sorted(mem["dataset"].unique().to_list())
    row_of = {iid: r for r, iid in enumerate(ids)}
    d_of = {d: j for j, d in enumerate(dataset_names)}
    m_of = {m: j for j, m in enumerate(model_names)}
    n, M, D = len(ids), len(model_names), len(dataset_names)
    member = np.zeros((n, D), bool)
    if mem.height:
        member[[row_of[i] for i in mem["input_id"]], [d_of[d] for d in mem["dataset"]]] = True
    lab = lab.filter(pl.col("input_id").is_in(list(id_set)))
    rows = np.array([row_of[i] for i in lab["input_id"]], np.int64)
    cols = np.array([m_of[m] for m in lab["model"]], np.int64)
    Q = _mean_into((n, M), rows, cols, lab["q"].to_numpy().astype(np.float64))
    Y = _mean_into((n, M), rows, cols, lab["y"].cast(pl.Float64).to_numpy())
    return WinData(ids, model_names, dataset_names, Q, Y, member, score_datasets)


def _mean_into(shape, rows, cols, values) -> np.ndarray:
    s = np.zeros(shape)
    c = np.zeros(shape)
    ok = np.isfinite(values)
    np.add.at(s, (rows[ok], cols[ok]), values[ok])
    np.add.at(c, (rows[ok], cols[ok]), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1.0), np.nan)


# ------------------------------------------------------------------------------ outcomes
def outcomes(q_a, q_b, tie_eps: float = 0.0) -> np.ndarray:
    """Per input: 1.0 when a wins (q_a > q_b + eps), 0.0 when b wins, 0.5 for a tie; NaN where
    either has no result."""
    a = np.asarray(q_a, np.float64)
    b = np.asarray(q_b, np.float64)
    d = a - b
    out = np.where(d > tie_eps, 1.0, np.where(d < -tie_eps, 0.0, 0.5))
    return np.where(np.isnan(a) | np.isnan(b), np.nan, out)


def apply_ties(outcome: np.ndarray, ties: Ties) -> np.ndarray:
    """Outcomes (1 / 0 / 0.5 / NaN) as training targets under a tie policy (see module doc):
    ``half`` keeps 0.5, ``drop`` makes ties NaN (left out), ``weak`` makes them 0."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    o = np.asarray(outcome, np.float64)
    if ties == "half":
        return o.copy()
    tie = o == 0.5
    return np.where(tie, np.nan if ties == "drop" else 0.0, o)


@dataclass(frozen=True)
class PairWins:
    """Win labels of one pair on the inputs where both have a result: ``rows`` (indices into the
    data), ``outcome`` (1 strong wins, 0 weak wins, 0.5 tie), ``strong_needed`` (1 only when the
    strong model is strictly better: RouteLLM's classifier label), and the counts."""

    strong: str
    weak: str
    rows: np.ndarray
    outcome: np.ndarray

    @property
    def strong_needed(self) -> np.ndarray:
        return (self.outcome == 1.0).astype(np.float64)

    def counts(self) -> dict:
        o = self.outcome
        return {"strong": self.strong, "weak": self.weak, "n": int(o.size),
                "strong_wins": int((o == 1).sum()), "weak_wins": int((o == 0).sum()),
                "ties": int((o == 0.5).sum())}


def pair_wins(data: WinData, strong: str | int, weak: str | int, tie_eps: float = 0.0) -> PairWins:
    """The win labels of ``strong`` against ``weak`` (see ``PairWins``)."""
    s, w = data.model_index(strong), data.model_index(weak)
    if s == w:
        raise PairError("strong and weak must be two different models")
    o = outcomes(data.Q[:, s], data.Q[:, w], tie_eps)
    rows = np.flatnonzero(~np.isnan(o))
    return PairWins(data.models[s], data.models[w], rows, o[rows])


@dataclass(frozen=True)
class Battles:
    """Every pairwise comparison in the data, long form: input ``rows``, models ``a`` < ``b``
    (column indices), ``outcome`` of a against b after the tie policy (NaN rows are dropped)."""

    rows: np.ndarray
    a: np.ndarray
    b: np.ndarray
    outcome: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.size)


def battles(data: WinData, models: Sequence[str | int] | None = None, *, ties: Ties = "half",
            tie_eps: float = 0.0) -> Battles:
    """All comparisons among ``models`` (default: every model) on every input where both have a
    result."""
    idx = list(range(len(data.models))) if models is None else [data.model_index(m) for m in models]
    parts = []
    for i, a in enumerate(idx):
        for b in idx[i + 1:]:
            o = apply_ties(outcomes(data.Q[:, a], data.Q[:, b], tie_eps), ties)
            r = np.flatnonzero(~np.isnan(o))
            if r.size:
                parts.append((r, np.full(r.size, a), np.full(r.size, b), o[r]))
    if not parts:
        e = np.empty(0, np.int64)
        return Battles(e, e, e, np.empty(0))
    return Battles(*(np.concatenate([p[k] for p in parts]) for k in range(4)))


def colabel_counts(Q: np.ndarray) -> np.ndarray:
    """(M × M) number of inputs on which both models have a result."""
    L = (~np.isnan(Q)).astype(np.float32)
    return (L.T @ L).astype(np.int64)


def bridge_models(Q: np.ndarray, strong: int, weak: int, n_bridge: int, min_colabels: int = 1,
                  counts: np.ndarray | None = None, link: str = "both") -> list[int]:
    """The pair followed by up to ``n_bridge`` other models that link it: ranked by
    min(co-labels with strong, co-labels with weak) (``link="both"``: models that ran with each;
    ``"either"``: the max, models that ran with one of them), at least ``min_colabels``, ties to
    the lower column (deterministic). ``counts``: ``colabel_counts(Q)`` if already computed."""
    C = colabel_counts(Q) if counts is None else counts
    if link not in ("both", "either"):
        raise ValueError(f"link must be 'both' or 'either', got {link!r}")
    link = (np.minimum if link == "both" else np.maximum)(C[strong], C[weak]).astype(np.float64)
    link[[strong, weak]] = -1
    order = np.lexsort((np.arange(link.size), -link))
    chosen = [int(j) for j in order[:max(0, int(n_bridge))] if link[j] >= max(1, min_colabels)]
    return [int(strong), int(weak)] + chosen


def held_out_mask(datasets: Sequence[str], member: np.ndarray, patterns: Sequence[str]) -> np.ndarray:
    """(n,) bool: rows in a dataset matching any fnmatch pattern (a regex if it starts with '^')."""
    hit = np.array([any(re.search(p, d) if p.startswith("^") else fnmatch.fnmatchcase(d, p)
                        for p in patterns) for d in datasets], bool)
    return member[:, hit].any(axis=1) if hit.any() else np.zeros(member.shape[0], bool)
