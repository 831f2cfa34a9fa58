"""The paper's leave-one-dataset-out (LODO) evaluation: Table 1 (task-level model choice) and
Table 2 (per-input routing) of Shnitzer et al. 2023 (docs/method.md#leave-one-dataset-out-evaluation).

Inputs are plain: an embedding matrix aligned to input ids, the labels frame (input_id, dataset,
model, y, value), the memberships frame (input_id, dataset) and optionally the models frame
(model, params_b) and a log-likelihood frame (input_id, dataset, model, value). No store access.

Protocol, for every dataset d' with at least ``min_inputs`` *complete* inputs (inputs on which
every model has a label in d' — models are only compared on data where they all have labels):

1. The index is every other labelled input: an input that belongs to d' (by input id, per the
   memberships) is never a neighbour, even if it also sits in a training dataset. d' is held out
   with its family (``lodo_groups.dataset_family``: all HELM MMLU subjects together), and the
   nested estimates below hold each training dataset's family out the same way. A training
   input's label for a model is the mean of its y over its datasets.
2. g_m on d''s complete inputs from the shared k neighbours; the true accuracy A(d', m) is the
   mean of y on them.
3. Nested LODO on the training datasets: p(d, m) and u(d) for every d ≠ d' with neighbours from
   datasets other than d and d' (inputs of d that also sit in d' are left out); a Gaussian kernel (bandwidth by leave-one-out) gives p̂(d', m)
   from u(d'). S1, S2, S3 (p̂), S3 with the true p(d', m), LL (where given), BMA (best mean
   per-dataset accuracy over the training datasets), Oracle, Random (in expectation); and, ours,
   S3_nbr_p: S3 with p from ``kernel.neighbor_share_estimate`` instead of the kernel.
4. Each method picks a model under both tie rules of ``selection`` ("expectation" and
   "train_acc": ties broken by that training accuracy); Table 1 averages the metrics over d'.
5. α curve: a seeded random fraction α of d''s complete inputs (at least one when α > 0) is
   labelled; it joins the index and p(d', m) is measured on it (``scores.score_task``); the other
   inputs are scored; the selected model's accuracy is on all of d''s complete inputs. Rows:
   S1, S2, S3 (measured p), S3_kernel_p (the enlarged index's S2 with the kernel's p̂), with the
   predictor accuracy on the unlabelled inputs and the MAE of the p used by S3.
6. Table 2 (per input, over all complete inputs of all d' pooled): each model alone, random
   (expected), the task-level BMA, argmax_m g_m(x) per input (both tie rules), oracle
   (max over models); quality is the label's ``value`` (the metric, e.g. 0/1 correctness).
   Model calls per input: 1 for a single model, random or the router (the kNN lookup calls no
   model), M for the oracle (it needs every model's output).
7. Stability of each choice (``stability_B`` > 0; issue 15): ``flip_task`` in ``per_task``, the
   probability that the model chosen on B bootstrap resamples of d''s complete inputs differs
   from the full-data choice (the resampled task scores; p̂ re-read at the resampled u(d'); the
   oracle on the resampled accuracies; BMA does not depend on d''s inputs). The training-index
   resample and the format variants are in ``stability_router``, which shares this module's
   per-task setup (``held_out_tasks``).

Everything is deterministic given ``EvalConfig.seed``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from benchroute.transforms.kernel import (
    NadarayaWatson,
    fallback_totals,
    fold_counts_sums,
    lodo_accuracies,
    lodo_base,
    mean_knn_distance,
    neighbor_share_estimate,
    train_mean,
)
from benchroute.transforms.knn import (
    Fallback,
    KNNCorrectness,
    Neighbors,
    SearchedNeighbors,
    Weights,
    aggregate_labels,
    narrowed,
    normalize_rows,
    self_neighbors,
)
from benchroute.transforms.label_matrix import RowsOf, column_means, means_of
from benchroute.transforms.lodo_groups import same_family
from benchroute.transforms.scores import binarized_accuracy, s3, score_task, task_scores
from benchroute.transforms.selection import TIE_RULES, choice_metrics, choose, choose_rows

@dataclass(frozen=True)
class EvalConfig:
    """Hyper-parameters of the evaluation."""

    k: int = 10
    weights: Weights = "uniform"
    fallback: Fallback = "train_mean"
    k_descriptor: int | None = None  # neighbours for u(d); None = k
    alphas: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)
    seed: int = 0
    min_inputs: int = 10


# Label matrices up to this many cells (n inputs × M models) are float64; larger ones float32
# (a leaderboard's 100k × 4,000 labels: 1.6 GB a matrix instead of 3.2 GB). y is 0/1 or a mean
# of a few of them, so float32 changes what a router answers only in the last bits of a score.
DENSE_FLOAT64_CELLS = 64_000_000


def dense_dtype(n: int, M: int):
    """The float type of an n × M label matrix (see ``DENSE_FLOAT64_CELLS``)."""
    return np.float64 if n * M <= DENSE_FLOAT64_CELLS else np.float32


def _positions(column: pl.Series, names: list[str]) -> np.ndarray:
    """Each value's position in ``names`` (all present), vectorised: a Python loop over a
    leaderboard's labels would hold a list of hundreds of millions of ints."""
    return column.replace_strict(names, range(len(names)), return_dtype=pl.Int64).to_numpy()


def model_sizes(models: pl.DataFrame | None, names: list[str]) -> np.ndarray:
    """(len(names),) each model's ``params_b`` from the models frame, NaN where unknown."""
    sizes = {}
    if models is not None and "params_b" in models.columns:
        sizes = {m: s for m, s in models.select("model", "params_b").iter_rows() if s is not None}
    return np.array([float(sizes[m]) if m in sizes else np.nan for m in names], np.float64)


def _y_and_value(batch: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A label frame's y and value as float64 vectors."""
    return batch["y"].cast(pl.Float64).to_numpy(), batch["value"].cast(pl.Float64).to_numpy()


class LabelScatter:
    """Label rows scattered, a batch at a time, into the label matrices of given index rows
    (``ids``), datasets and models: ``Y`` (n × M, the mean y over a row's labels of each model;
    NaN = none), and per dataset d its rows' y and value (``d_rows[d]``: d's index rows, sorted;
    the last label of a cell wins), stored, or with ``derive`` taken from Y's rows
    (``DatasetRows``). Counts are uint8 until a cell needs more."""

    def __init__(self, ids: list[str], datasets: list[str], models: list[str],
                 d_rows: list[np.ndarray], dtype, *, derive: bool = False) -> None:
        self.ids, self.datasets, self.models, self.d_rows = ids, datasets, models, d_rows
        n, M = len(ids), len(models)
        self.dtype = np.dtype(dtype)
        self.ysum = np.zeros((n, M), self.dtype)
        self.ycnt = np.zeros((n, M), np.uint8)
        # ``derive``: the caller saw every row in one dataset and every value equal its y, so
        # each dataset's y may be Y's rows (``DatasetRows``), not a second copy of every label;
        # ``finish`` checks the one thing left, one label per cell.
        self.derive = derive
        self.d_y = [] if derive else [np.full((r.size, M), np.nan, self.dtype) for r in d_rows]
        self.d_v: list[np.ndarray] | None = None  # stays d_y while every value equals its y

    def add(self, batch: pl.DataFrame) -> None:
        """Scatter one frame (input_id, dataset, model, y, value; every name known)."""
        if batch.height == 0:
            return
        M = len(self.models)
        rows = _positions(batch["input_id"], self.ids)
        mcol = _positions(batch["model"], self.models)
        y, v = _y_and_value(batch)
        cells, inv = np.unique(rows * M + mcol, return_inverse=True)
        add_n = np.bincount(inv, minlength=cells.size)
        need = int((self.ycnt.ravel()[cells] + add_n).max())
        if need > np.iinfo(self.ycnt.dtype).max:
            self.ycnt = self.ycnt.astype(np.uint16 if need < 2**16 else np.uint32)
        self.ysum.ravel()[cells] += np.bincount(inv, weights=y, minlength=cells.size).astype(self.dtype)
        self.ycnt.ravel()[cells] += add_n.astype(self.ycnt.dtype)
        del cells, inv, add_n
        if self.derive:
            return
        if self.d_v is None and not np.array_equal(y, v, equal_nan=True):
            self.d_v = [a.copy() for a in self.d_y]
        dcol = _positions(batch["dataset"], self.datasets)
        order = np.argsort(dcol, kind="stable")  # by dataset, batch order kept within one
        bounds = np.searchsorted(dcol[order], np.arange(len(self.datasets) + 1))
        for d in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[d]:bounds[d + 1]]
            at = np.searchsorted(self.d_rows[d], rows[sel])  # the rows' positions within d
            self.d_y[d][at, mcol[sel]] = y[sel]
            if self.d_v is not None:
                self.d_v[d][at, mcol[sel]] = v[sel]

    def finish(self) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]] | None:
        """(Y, each dataset's y, each dataset's value: the same list when all values equal y).
        With ``derive``: None when each dataset's y is not Y's rows (a cell with two labels): the
        caller scatters again without ``derive``."""
        if self.derive and int(self.ycnt.max(initial=0)) > 1:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            Y = np.divide(self.ysum, self.ycnt, out=self.ysum)  # NaN where a row has no label
        self.ycnt = None
        if self.derive:
            rows = DatasetRows(Y, self.d_rows)
            return Y, rows, rows
        return Y, self.d_y, self.d_y if self.d_v is None else self.d_v


class DatasetRows(Sequence):
    """Each dataset's labels as the rows of ``Y`` (``dataset_rows[d]``), made when asked for (a
    copy of one dataset's rows), not stored: what ``dataset_y`` is when every index row is in one
    dataset with at most one label per model (a leaderboard), where it equals Y's rows exactly and
    a second copy of every label would cost as much as Y (1.6 GB at 100k × 4,000)."""

    def __init__(self, Y: np.ndarray, d_rows: list[np.ndarray]) -> None:
        self.Y, self.d_rows = Y, d_rows

    def __len__(self) -> int:
        return len(self.d_rows)

    def __getitem__(self, d):
        if isinstance(d, slice):
            return [self[i] for i in range(*d.indices(len(self)))]
        return self.Y[self.d_rows[d]]

    def take(self, d: int, keep: np.ndarray) -> np.ndarray:
        """``self[d][keep]`` in one copy (not all of d's rows, then the kept ones)."""
        return self.Y[self.d_rows[d][keep]]


@dataclass(frozen=True)
class BenchmarkArrays:
    """The benchmark as arrays: one index row per labelled input (n), M models, D datasets.

    ``Y`` (n × M): training label of each row (mean y over its datasets; NaN = none);
    ``member`` (n × D): the row's datasets (from memberships and labels); ``row_groups``: rows with
    the same set of datasets share a group; ``group_members`` (G × D); per dataset d,
    ``dataset_rows[d]`` (its rows), ``dataset_y[d]`` and ``dataset_value[d]`` (their y and value
    in d, NaN = none). ``params_b`` (M,): sizes, NaN where unknown.
    """

    input_ids: list[str]
    X: np.ndarray
    models: list[str]
    datasets: list[str]
    Y: np.ndarray
    member: np.ndarray
    row_groups: np.ndarray
    group_members: np.ndarray
    dataset_rows: list[np.ndarray]
    dataset_y: Sequence[np.ndarray]
    dataset_value: Sequence[np.ndarray]
    params_b: np.ndarray

    @classmethod
    def from_frames(
        cls,
        embeddings: np.ndarray,
        input_ids: list[str],
        labels: pl.DataFrame,
        memberships: pl.DataFrame,
        models: pl.DataFrame | None = None,
        *,
        dtype=np.float64,
    ) -> BenchmarkArrays:
        """Assemble from the canonical frames; ``embeddings[i]`` belongs to ``input_ids[i]``."""
        if len(input_ids) != len(embeddings):
            raise ValueError(f"{len(embeddings)} embeddings for {len(input_ids)} input ids")
        pos = {iid: i for i, iid in enumerate(input_ids)}

        def rows_of(ids: list[str]) -> np.ndarray:
            missing = [i for i in ids if i not in pos]
            if missing:
                raise ValueError(f"no embedding for {len(missing)} labelled inputs, e.g. {missing[:3]}")
            return np.asarray(embeddings)[[pos[i] for i in ids]]

        return cls.from_batches(rows_of, lambda: [labels], memberships, models, dtype=dtype)

    @classmethod
    def from_batches(
        cls,
        embeddings: Callable[[list[str]], np.ndarray],
        batches: Callable[[], Iterable[pl.DataFrame]],
        memberships: pl.DataFrame,
        models: pl.DataFrame | None = None,
        *,
        dtype=None,
    ) -> BenchmarkArrays:
        """Assemble from labels given a batch at a time: ``batches()`` yields frames with the
        columns input_id, dataset, model, y and value, the same rows in the same order on each
        call; it is called twice (names, then values; a third time when each dataset's labels
        cannot be Y's rows after all), so no frame of all labels is ever held.
        ``embeddings(ids)``: the embedding rows of the labelled input ids (sorted), aligned.

        The label arrays are ``dtype`` (None: ``dense_dtype(n, M)``, float64 unless the matrix
        is leaderboard-sized); ``dataset_value`` is ``dataset_y`` itself (not a copy) when
        every label's value equals its y, and ``dataset_y`` is ``Y``'s rows (``DatasetRows``, not
        stored) when besides every row is in one dataset with one label per cell. Equal to
        ``from_frames`` of the concatenated batches with the same ``dtype``."""
        # Pass 1: the names (inputs, models, each input's datasets).
        id_parts, model_parts, pair_parts = [], [], []
        values_are_y = True
        for batch in batches():
            id_parts.append(batch["input_id"].unique())
            model_parts.append(batch["model"].unique())
            pair_parts.append(batch.select("input_id", "dataset").unique())
            values_are_y = values_are_y and bool(np.array_equal(*_y_and_value(batch), equal_nan=True))
        ids = sorted(pl.concat(id_parts).unique().to_list()) if id_parts else []
        X = normalize_rows(embeddings(ids))
        model_names = sorted(pl.concat(model_parts).unique().to_list()) if model_parts else []
        mem = pl.concat([memberships.select("input_id", "dataset"), *pair_parts])
        mem = mem.filter(pl.col("input_id").is_in(ids)).unique()
        dataset_names = sorted(mem["dataset"].unique().to_list())
        row_of = {iid: r for r, iid in enumerate(ids)}
        d_of = {d: j for j, d in enumerate(dataset_names)}
        n, D, M = len(ids), len(dataset_names), len(model_names)
        dtype = np.dtype(dense_dtype(n, M) if dtype is None else dtype)
        member = np.zeros((n, D), bool)
        member[[row_of[i] for i in mem["input_id"]], [d_of[d] for d in mem["dataset"]]] = True
        d_rows = [np.flatnonzero(member[:, d]) for d in range(D)]
        # Pass 2: Y (mean y over the row's labels of each model) and each dataset's y and value;
        # each dataset's y as Y's rows where every row is in one dataset (``DatasetRows``), else
        # (or where a cell turns out to hold two labels) scattered separately, by a third pass.
        single = values_are_y and bool(n) and bool((member.sum(axis=1) == 1).all())
        for derive in (True, False)[0 if single else 1:]:
            scatter = LabelScatter(ids, dataset_names, model_names, d_rows, dtype, derive=derive)
            for batch in batches():
                scatter.add(batch)
            done = scatter.finish()
            del scatter
            if done is not None:
                break
        Y, d_y, d_v = done
        signatures, row_groups = np.unique(member, axis=0, return_inverse=True)
        params = model_sizes(models, model_names)
        return cls(
            ids, X, model_names, dataset_names, Y, member, row_groups.ravel().astype(np.int64),
            signatures.astype(bool), d_rows, d_y, d_v, params,
        )

    def families(self) -> np.ndarray:
        """(D × D bool): datasets held out together (``lodo_groups.dataset_family``)."""
        return same_family(self.datasets)

    def complete_rows(self, d: int) -> np.ndarray:
        """Positions (within ``dataset_rows[d]``) of d's inputs labelled for every model."""
        return np.flatnonzero(~np.isnan(self.dataset_y[d]).any(axis=1))

    def dataset_accuracy(self, exclude_rows: np.ndarray | None = None) -> np.ndarray:
        """Accuracy of each model on each dataset over its labelled inputs (D × M, NaN = none),
        leaving out the index rows where ``exclude_rows`` (n bool) is true."""
        keep = (None if exclude_rows is None
                else [~exclude_rows[rows] for rows in self.dataset_rows])
        return dataset_accuracies(self.dataset_y, len(self.models), keep)


def dataset_accuracies(dataset_y: Sequence[np.ndarray], n_models: int,
                       keep: list[np.ndarray] | None = None) -> np.ndarray:
    """(D × M) each model's accuracy on each dataset over its labelled inputs (NaN = none) from
    the per-dataset labels ``dataset_y`` (each n_d × M), over the rows ``keep[d]`` if given."""
    out = np.full((len(dataset_y), n_models), np.nan)
    for d, yd in enumerate(dataset_y):
        out[d] = column_means(yd, None if keep is None else keep[d])[1]
    return out


def mean_over_datasets(acc: np.ndarray) -> np.ndarray:
    """(M,) each model's mean per-dataset accuracy (``dataset_accuracies``), NaN where it has none:
    the training accuracy of the tie-break, the BMA order and the reference model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model labelled on no dataset
        return np.nanmean(acc, axis=0)


@dataclass(frozen=True)
class HeldOutTask:
    """Steps 1-3 of the protocol for one held-out dataset d' (module docstring): ``local`` (its
    complete inputs, positions within ``dataset_rows[d]``), ``rows`` (their index rows), ``Yt``
    and ``Vt`` (their labels and values in d'), ``held`` (D bool: d''s family), ``train_rows``
    (n bool: the rows that may be neighbours), ``fb`` (the fallback), ``neigh`` (each input's
    nearest allowed rows, as many as the search asked for), ``kernel`` / ``P`` / ``u`` /
    ``fit_on`` (the nested estimates and the smoother fitted on them), ``train_acc`` (M,: mean
    per-dataset accuracy over the training datasets, the BMA scores and the tie-break),
    ``train_stats`` (the training rows' label counts and sums, where Y is large enough to keep
    fold totals: ``kernel.fallback_totals``; else None)."""

    d: int
    name: str
    local: np.ndarray
    rows: np.ndarray
    Yt: np.ndarray
    Vt: np.ndarray
    held: np.ndarray
    train_rows: np.ndarray
    fb: np.ndarray | None
    neigh: Neighbors
    kernel: NadarayaWatson
    P: np.ndarray
    u: np.ndarray
    fit_on: np.ndarray
    train_acc: np.ndarray
    train_stats: tuple[np.ndarray, np.ndarray] | None = None


def held_out_tasks(bench: BenchmarkArrays, cfg: EvalConfig, grouped) -> Iterator[HeldOutTask]:
    """The held-out tasks of ``bench`` in dataset order (datasets with ``cfg.min_inputs``
    complete inputs), with neighbours from ``grouped`` (``knn.self_neighbors`` of the index).
    Where that searches per merge (a leaderboard), every dataset's lists without its family
    are searched once with their p and u (``kernel.lodo_base``) and each task narrows them
    (``knn.narrowed``): a search of the rows a task changes, not of every row per task, and a
    new p only where something changed."""
    M = len(bench.models)
    families = bench.families()
    totals = fallback_totals(bench.Y, bench.Y.nbytes)  # a leaderboard's fallbacks: no copy of Y
    base = (lodo_base(grouped, bench.group_members, bench.row_groups, bench.Y, bench.dataset_rows,
                      bench.dataset_y, k=cfg.k, weights=cfg.weights, fallback=cfg.fallback,
                      k_descriptor=cfg.k_descriptor or cfg.k, families=families)
            if isinstance(grouped, SearchedNeighbors) else None)
    for d in range(len(bench.datasets)):
        local = bench.complete_rows(d)
        if local.size < cfg.min_inputs or M < 2:
            continue
        rows = bench.dataset_rows[d][local]
        held = families[d]  # d and the other parts of its benchmark (lodo_groups)
        allowed = ~bench.group_members[:, held].any(axis=1)
        train_rows = allowed[bench.row_groups]
        # the training rows' label counts and sums, where fold totals are kept (large Y)
        stats = fold_counts_sums(bench.Y, train_rows, totals) if totals is not None else None
        fb = ((means_of(*stats) if stats is not None else train_mean(bench.Y, train_rows))
              if cfg.fallback == "train_mean" else None)
        kernel, P, u, fit_on = task_kernel(bench, cfg, grouped, held, bench.Y, bench.dataset_y,
                                           base=base, totals=totals)
        d_acc = bench.dataset_accuracy(exclude_rows=~train_rows)  # no input of d' counts
        neigh = (grouped.merge(allowed, rows=rows) if base is None else
                 narrowed(base.neighbours[d].take(local), train_rows,
                          lambda at: grouped.merge(allowed, rows=rows[at])))
        yield HeldOutTask(
            d, bench.datasets[d], local, rows, bench.dataset_y[d][local],
            bench.dataset_value[d][local], held, train_rows, fb, neigh,
            kernel, P, u, fit_on, mean_over_datasets(np.where(held[:, None], np.nan, d_acc)),
            stats,
        )


def task_kernel(bench: BenchmarkArrays, cfg: EvalConfig, grouped, held: np.ndarray,
                Y: np.ndarray, dataset_y: Sequence[np.ndarray], *, base=None, totals=None):
    """(kernel, P, u, fit_on): nested LODO p(d, m), u(d) on the training datasets (``held``
    left out, each training dataset with its family) from the labels ``Y`` / ``dataset_y``, and
    the Gaussian smoother fitted on the datasets with a descriptor and some p. ``base``: the
    folds nested LODO narrows (``kernel.lodo_base``; None: merged from ``grouped``);
    ``totals``: the fold totals of ``Y`` (``kernel.fallback_totals``) when already made."""
    P, u = lodo_accuracies(
        grouped, bench.group_members, bench.row_groups, Y, bench.dataset_rows, dataset_y,
        k=cfg.k, weights=cfg.weights, fallback=cfg.fallback,
        k_descriptor=cfg.k_descriptor or cfg.k, held_out=held, families=bench.families(), base=base,
        totals=totals,
    )
    fit_on = np.isfinite(u) & ~np.all(np.isnan(P), axis=1)
    return NadarayaWatson().fit(u[fit_on], P[fit_on]), P, u, fit_on


@dataclass(frozen=True)
class Evaluation:
    """The evaluation's tables (see module docstring).

    ``table1``: method, ties, acc, ratio_to_best, pearson, spearman, pct_bma, params_b, rank,
    n_tasks (means over held-out tasks; pearson/spearman over tasks where defined).
    ``per_task``: the same per task, with the most likely chosen ``model`` (and ``flip_task``,
    its instability under resampling of the task's inputs, when asked for).
    ``predictor``: per task and model, the true accuracy ``acc``, ``p_true``, the kernel's
    ``p_hat``, the constant ``p_const`` (mean over training datasets), ``p_share``, ``u``.
    ``alpha``: alpha, method, ties, acc, predictor_accuracy, p_mae.
    ``table2``: router, ties, quality, mcpi, n_inputs.
    ``summary``: predictor accuracy, kernel MAE (and of the constant and neighbour-share
    estimates), counts.
    """

    table1: pl.DataFrame
    per_task: pl.DataFrame
    predictor: pl.DataFrame
    alpha: pl.DataFrame
    table2: pl.DataFrame
    summary: dict = field(default_factory=dict)


def evaluate_lodo(
    bench: BenchmarkArrays,
    config: EvalConfig = EvalConfig(),
    *,
    loglik: pl.DataFrame | None = None,
    stability_B: int = 0,
) -> Evaluation:
    """Run the LODO protocol over every eligible dataset of ``bench``; ``stability_B`` > 0 adds
    each choice's ``flip_task`` (step 7) from that many resamples."""
    cfg = config
    k_desc = cfg.k_descriptor or cfg.k
    k_search = max(cfg.k, k_desc)
    M = len(bench.models)
    # per-group lists where they fit, else a search per merge (a leaderboard's would be GBs)
    grouped = self_neighbors(bench.X, bench.row_groups, k_search)
    ll = _loglik_matrix(loglik, bench) if loglik is not None else None
    tasks = []
    per_task, pred_rows, alpha_rows, route = [], [], [], _RouteTotals(M)
    for t in held_out_tasks(bench, cfg, grouped):
        d, name, local, rows, Yt, Vt = t.d, t.name, t.local, t.rows, t.Yt, t.Vt
        tasks.append(d)
        A = Yt.mean(axis=0)
        neigh, P, kern, fit_on, train_acc = t.neigh, t.P, t.kernel, t.fit_on, t.train_acc
        G = aggregate_labels(_first(neigh, cfg.k), bench.Y, weights=cfg.weights, fallback=t.fb)
        p_true = binarized_accuracy(G, Yt)
        u_new = mean_knn_distance(neigh, k_desc)
        p_hat = kern.predict(u_new)[0]
        p_const = np.nanmean(P[fit_on], axis=0)
        p_share = neighbor_share_estimate(_first(neigh, cfg.k), bench.member, P)
        ts = task_scores(G, p_hat)
        scores = {"S1": ts.s1, "S2": ts.s2, "S3": ts.s3, "S3_true_p": s3(ts.s2, p_true)}
        if ll is not None:
            scores["LL"] = np.nanmean(ll[d][local], axis=0)
        scores["S3_nbr_p"] = s3(ts.s2, p_share)
        resampled = (_task_resamples(G, Yt, neigh, k_desc, kern, stability_B, [cfg.seed, d])
                     if stability_B > 0 else {})
        for ties in TIE_RULES:
            w_bma = choose(train_acc, ties)
            choices = {m: (choose(s, ties, train_acc), s) for m, s in scores.items()}
            choices["BMA"] = (w_bma, None)
            choices["Oracle"] = (choose(A, ties, train_acc), None)
            choices["Random"] = (np.full(M, 1.0 / M), None)
            for method, (w, s) in choices.items():
                met = choice_metrics(w, A, w_bma=w_bma, params_b=bench.params_b, scores=s)
                row = {"dataset": name, "method": method, "ties": ties, **met,
                       "model": bench.models[int(np.argmax(w))]}
                if stability_B > 0:
                    row["flip_task"] = _flip(w, resampled.get(method), ties, train_acc, method)
                per_task.append(row)
        for m in range(M):
            pred_rows.append({"dataset": name, "model": bench.models[m], "acc": A[m],
                              "p_true": p_true[m], "p_hat": p_hat[m], "p_const": p_const[m],
                              "p_share": p_share[m],
                              "u": u_new, "bandwidth": kern.bandwidth_})
        alpha_rows += _alpha_curve(bench, cfg, d, rows, Yt, A, t.train_rows, p_hat, train_acc,
                                   G, p_true, name, t.train_stats)
        route.add(G, Vt, train_acc, choose(train_acc, "expectation"))
    per_task_df = pl.DataFrame(per_task) if per_task else pl.DataFrame()
    predictor = pl.DataFrame(pred_rows) if pred_rows else pl.DataFrame()
    return Evaluation(
        table1=_table1(per_task_df),
        per_task=per_task_df,
        predictor=predictor,
        alpha=_alpha_table(alpha_rows),
        table2=route.table(bench.models),
        summary=_summary(bench, cfg, tasks, predictor),
    )


def _task_resamples(G, Yt, neigh: Neighbors, k_desc: int, kern, B: int, seed) -> dict:
    """Per method, its (B × M) scores on B bootstrap resamples of the task's inputs (step 7)."""
    from benchroute.transforms.stability import bootstrap_counts, weighted_means

    Wt = bootstrap_counts(Yt.shape[0], B, np.random.default_rng(seed)).astype(np.float64)
    dd = neigh.distances[:, :k_desc]
    ok = ~np.isnan(dd)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.where(ok, dd, 0.0).sum(axis=1) / ok.sum(axis=1)  # per input; NaN = none
    have = ~np.isnan(dist)
    u_b = (Wt[:, have] @ dist[have]) / np.maximum(Wt[:, have].sum(axis=1), 1e-12)
    hits = np.where(np.isnan(G), np.nan, (G > 0.5).astype(np.float64))
    s2 = weighted_means(hits, Wt)
    return {"S1": weighted_means(G, Wt), "S2": s2, "S3": s3(s2, kern.predict(u_b)),
            "Oracle": weighted_means(Yt, Wt)}


def _flip(w: np.ndarray, S_b: np.ndarray | None, ties: str, train_acc: np.ndarray,
          method: str) -> float:
    """P(the choice on a resample differs from ``w``, the full-data choice): 1 − mean_b w·w_b
    (the flip rate for a deterministic choice). BMA: 0 (no input of the task counts); methods
    not resampled: NaN."""
    if S_b is None:
        return 0.0 if method == "BMA" else float("nan")
    W = choose_rows(S_b, ties, train_acc)
    return float(1.0 - (W @ w).mean())


def _first(neigh: Neighbors, k: int) -> Neighbors:
    return Neighbors(neigh.indices[:, :k], neigh.similarities[:, :k])


def _alpha_curve(bench, cfg, d, rows, Yt, A, train_rows, p_hat, train_acc, G0, p_true0, name,
                 train_stats=None):
    """Rows of the α curve for one task (α = 0 reuses the main path)."""
    out = []
    knn = None
    for alpha in cfg.alphas:
        if alpha <= 0:
            ts, acc_pred = task_scores(G0, p_hat), float(np.nanmean(p_true0))
            p_mae = float(np.nanmean(np.abs(p_hat - p_true0)))
        else:
            if knn is None:
                # the training rows' labels as a view (``RowsOf``), not a copy of Y's rows
                knn = KNNCorrectness(cfg.k, weights=cfg.weights, fallback=cfg.fallback).fit(
                    bench.X[train_rows], RowsOf(bench.Y, train_rows, stats=train_stats))
            rng = np.random.default_rng([cfg.seed, d, int(round(alpha * 1e6))])
            n_lab = min(len(rows) - 1, max(1, int(round(alpha * len(rows)))))
            lab = np.zeros(len(rows), bool)
            lab[rng.choice(len(rows), n_lab, replace=False)] = True
            ts = score_task(knn, bench.X[rows[~lab]], p_hat,
                            X_labelled=bench.X[rows[lab]], Y_labelled=Yt[lab])
            p_unl = binarized_accuracy(ts.g, Yt[~lab])
            acc_pred = float(np.nanmean(p_unl))
            p_mae = float(np.nanmean(np.abs(ts.p - p_unl)))
        for ties in TIE_RULES:
            for method, s in (("S1", ts.s1), ("S2", ts.s2), ("S3", ts.s3),
                              ("S3_kernel_p", s3(ts.s2, p_hat))):
                w = choose(s, ties, train_acc)
                out.append({"dataset": name, "alpha": alpha, "method": method, "ties": ties,
                            "acc": float(w @ A), "predictor_accuracy": acc_pred, "p_mae": p_mae})
    return out


class _RouteTotals:
    """Sums for Table 2 over all held-out inputs."""

    def __init__(self, M: int):
        self.M = M
        self.n = 0
        self.model = np.zeros(M)
        self.oracle = 0.0
        self.random = 0.0
        self.bma = 0.0
        self.router = dict.fromkeys(TIE_RULES, 0.0)

    def add(self, G: np.ndarray, V: np.ndarray, train_acc: np.ndarray, w_bma: np.ndarray) -> None:
        self.n += V.shape[0]
        self.model += V.sum(axis=0)
        self.oracle += V.max(axis=1).sum()
        self.random += V.mean(axis=1).sum()
        self.bma += float((V @ w_bma).sum())
        for ties in TIE_RULES:
            W = choose_rows(G, ties, train_acc)
            self.router[ties] += float((W * V).sum())

    def table(self, models: list[str]) -> pl.DataFrame:
        n = max(self.n, 1)
        rows = [{"router": f"model:{m}", "ties": "-", "quality": self.model[i] / n, "mcpi": 1.0}
                for i, m in enumerate(models)]
        rows.append({"router": "random", "ties": "expectation", "quality": self.random / n,
                     "mcpi": 1.0})
        rows.append({"router": "bma (task level)", "ties": "expectation", "quality": self.bma / n,
                     "mcpi": 1.0})
        for ties in TIE_RULES:
            rows.append({"router": "argmax g_m(x)", "ties": ties,
                         "quality": self.router[ties] / n, "mcpi": 1.0})
        rows.append({"router": "oracle", "ties": "-", "quality": self.oracle / n,
                     "mcpi": float(self.M)})
        return pl.DataFrame(rows).with_columns(n_inputs=pl.lit(self.n))


def _table1(per_task: pl.DataFrame) -> pl.DataFrame:
    if per_task.height == 0:
        return pl.DataFrame()
    order = ["S1", "S2", "S3", "S3_true_p", "LL", "BMA", "Oracle", "Random", "S3_nbr_p"]
    metrics = ["acc", "ratio_to_best", "pearson", "spearman", "pct_bma", "params_b", "rank"]
    return (
        per_task.group_by("method", "ties")
        .agg([pl.col(c).fill_nan(None).mean() for c in metrics] + [pl.len().alias("n_tasks")])
        .with_columns(_o=pl.col("method").replace_strict(
            {m: i for i, m in enumerate(order)}, default=len(order)))
        .sort("ties", "_o")
        .drop("_o")
    )


def _alpha_table(rows: list[dict]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame()
    return (
        pl.DataFrame(rows)
        .group_by("alpha", "method", "ties")
        .agg(pl.col("acc").mean(), pl.col("predictor_accuracy").mean(), pl.col("p_mae").mean(),
             pl.len().alias("n_tasks"))
        .sort("ties", "method", "alpha")
    )


def _summary(bench, cfg, tasks, predictor: pl.DataFrame) -> dict:
    out = {"config": asdict(cfg), "n_inputs": len(bench.input_ids), "n_models": len(bench.models),
           "n_datasets": len(bench.datasets), "n_tasks": len(tasks),
           "tasks": [bench.datasets[d] for d in tasks]}
    if predictor.height:
        p = predictor
        out["predictor_accuracy"] = float(p["p_true"].fill_nan(None).mean())
        out["kernel_mae"] = float((p["p_hat"] - p["p_true"]).abs().fill_nan(None).mean())
        out["constant_mae"] = float((p["p_const"] - p["p_true"]).abs().fill_nan(None).mean())
        out["neighbor_share_mae"] = float((p["p_share"] - p["p_true"]).abs().fill_nan(None).mean())
    return out


def _loglik_matrix(loglik: pl.DataFrame, bench: BenchmarkArrays) -> list[np.ndarray]:
    """Per dataset, the log-likelihood of each of its rows for each model (NaN = none)."""
    row_of = {iid: r for r, iid in enumerate(bench.input_ids)}
    m_of = {m: j for j, m in enumerate(bench.models)}
    out = []
    for d, name in enumerate(bench.datasets):
        local = np.full(len(bench.input_ids), -1, np.int64)
        local[bench.dataset_rows[d]] = np.arange(bench.dataset_rows[d].size)
        mat = np.full((bench.dataset_rows[d].size, len(bench.models)), np.nan)
        part = loglik.filter(pl.col("dataset") == name)
        for iid, model, val in part.select("input_id", "model", "value").iter_rows():
            if iid in row_of and model in m_of and local[row_of[iid]] >= 0:
                mat[local[row_of[iid]], m_of[model]] = val
        out.append(mat)
    return out


def format_table1(table1: pl.DataFrame, ties: str = "expectation") -> str:
    """Table 1 as Markdown: metrics as rows, methods as columns (the paper's layout)."""
    t = table1.filter(pl.col("ties") == ties)
    methods = t["method"].to_list()
    metrics = [("acc", "Acc."), ("ratio_to_best", "Ratio to best"), ("pearson", "Pearson"),
               ("spearman", "Spearman"), ("pct_bma", "%BMA"), ("params_b", "#Params (B)"),
               ("rank", "Rank")]
    lines = ["| metric | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for col, label in metrics:
        vals = t[col].to_list()
        cells = ["–" if v is None or (isinstance(v, float) and np.isnan(v)) else
                 (f"{v:.1f}" if col in ("params_b", "rank") else f"{v:.3f}") for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
