"""The pure parts of the embedding stage: what to embed, in which order, in which batches, at which
precision, and the identity the vectors are stored under.

Nothing here loads a model. The model runner (``benchroute.transforms.embedder``) turns a batch of
texts into vectors; the store side (``benchroute.artifacts.embeddings``) reads and writes them;
``benchroute.artifacts.stages.embed`` wires the three (the ``embed`` and ``refresh`` flows call it).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from benchroute.schemas.embeddings import EmbedderIdentity

PRECISIONS = ("auto", "bf16", "fp32")
# bf16 is kept only where its vectors agree with fp32 at least this well (cosine, every row).
MIN_BF16_COSINE = 0.995
# ... and where it is faster by at least this factor (a margin for timing noise).
MIN_BF16_SPEEDUP = 1.05

# Files of a model folder that do not change its vectors (left out of the weights hash).
_NOT_WEIGHTS = ("readme", "license", ".gitattributes", "desktop.ini", ".ds_store")


class EmbedInputError(ValueError):
    """Inputs that cannot be embedded (the message names them)."""


# --------------------------------------------------------------------------- identity
def weights_hash(folder: str | os.PathLike) -> str:
    """sha256 (hex) over a model folder: every file's relative path and bytes, in path order.

    Docs (README, LICENSE, ``*.md``) and OS litter are left out: they do not change a vector.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not _is_doc(p.relative_to(root).as_posix())
    )
    if not files:
        raise FileNotFoundError(f"model folder {root} holds no files")
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _is_doc(rel: str) -> bool:
    parts = rel.split("/")
    name = parts[-1].lower()
    return (
        any(p.startswith(".") for p in parts)  # hidden files: VCS, OS and install markers
        or name.endswith(".md")
        or any(name.startswith(x) for x in _NOT_WEIGHTS)
    )


def embedder_identity(name: str, dim: int, folder: str | os.PathLike) -> EmbedderIdentity:
    """The identity of the model in ``folder`` (hashes its files)."""
    return EmbedderIdentity(name=name, dim=int(dim), weights_hash=weights_hash(folder))


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class BadInput:
    input_id: str | None
    reason: str


def check_inputs(inputs: pl.DataFrame) -> tuple[pl.DataFrame, list[BadInput]]:
    """Split an ``inputs`` frame (input_id, text) into embeddable rows and bad ones.

    Bad: a text that is null, not a string, or empty after whitespace is stripped; a null id.
    A ``text`` column that is not a string column at all raises ``EmbedInputError``.
    """
    missing = [c for c in ("input_id", "text") if c not in inputs.columns]
    if missing:
        raise EmbedInputError(f"inputs table lacks columns {missing}")
    if inputs.schema["text"] != pl.String:
        raise EmbedInputError(
            f"inputs.text holds {inputs.schema['text']} values, not text; first rows: "
            + ", ".join(
                f"{r['input_id']}={r['text']!r}" for r in inputs.head(3).iter_rows(named=True)
            )
        )
    inputs = inputs.select("input_id", "text")
    blank = pl.col("text").is_null() | (pl.col("text").str.strip_chars().str.len_bytes() == 0)
    bad_mask = blank | pl.col("input_id").is_null()
    bad_rows = inputs.filter(bad_mask)
    bad = [
        BadInput(
            r["input_id"],
            "input id is null"
            if r["input_id"] is None
            else "text is null"
            if r["text"] is None
            else "text is empty",
        )
        for r in bad_rows.iter_rows(named=True)
    ]
    return inputs.filter(~bad_mask), bad


def describe_bad(bad: Sequence[BadInput], limit: int = 5) -> str:
    shown = "; ".join(f"input {b.input_id}: {b.reason}" for b in bad[:limit])
    more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
    return f"{len(bad)} input(s) cannot be embedded: {shown}{more}"


def check_texts(texts: Sequence[object], ids: Sequence[str] | None = None) -> list[str]:
    """The texts as ``str``, or ``EmbedInputError`` naming every non-text or empty one."""
    bad = []
    for i, t in enumerate(texts):
        name = ids[i] if ids is not None else f"#{i}"
        if not isinstance(t, str):
            bad.append(BadInput(name, f"value is {type(t).__name__}, not text"))
        elif not t.strip():
            bad.append(BadInput(name, "text is empty"))
    if bad:
        raise EmbedInputError(describe_bad(bad))
    return list(texts)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- order, batches
def length_order(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Indices that sort items longest first (stable), so each batch pads to near its own length
    and a batch too large for memory fails at the start, not at the end."""
    lengths = np.asarray(lengths)
    return np.argsort(-lengths, kind="stable")


def batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive slices of ``range(n)``, each ``batch_size`` long (the last may be shorter)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def padding_waste(lengths: Sequence[int], order: np.ndarray, batch_size: int) -> float:
    """Share of padded positions when ``lengths`` are batched in ``order`` (0 = none)."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for s in batches(len(order), batch_size):
        part = lengths[order[s]]
        real += int(part.sum())
        padded += int(part.max()) * len(part)
    return 0.0 if padded == 0 else 1.0 - real / padded


# --------------------------------------------------------------------------- vectors
def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as C-contiguous float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``."""
    a, b = l2_normalize(a), l2_normalize(b)
    return (a * b).sum(axis=1)


# --------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16" or "fp32"
    reason: str
    seconds: dict[str, float] = field(default_factory=dict)
    min_cosine: float | None = None


def choose_precision(
    requested: str,
    *,
    seconds: dict[str, float] | None = None,
    min_cosine: float | None = None,
    bf16_supported: bool = True,
) -> PrecisionChoice:
    """The precision to embed at.

    ``bf16`` / ``fp32`` are taken as asked (bf16 falls back to fp32 where the device cannot do it).
    ``auto`` decides from one timed batch each way (``seconds = {"fp32": s, "bf16": s}``) and the
    lowest row cosine between the two results: bf16 only where it is at least
    ``MIN_BF16_SPEEDUP`` faster and every cosine is at least ``MIN_BF16_COSINE``.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "asked for fp32")
    if not bf16_supported:
        return PrecisionChoice("fp32", "bf16 is not supported on this device")
    if requested == "bf16":
        return PrecisionChoice("bf16", "asked for bf16")
    if not seconds or "fp32" not in seconds or "bf16" not in seconds:
        return PrecisionChoice("fp32", "too few inputs to time both precisions")
    t32, t16 = seconds["fp32"], seconds["bf16"]
    speedup = t32 / t16 if t16 > 0 else math.inf
    timing = f"fp32 {t32:.3f}s, bf16 {t16:.3f}s on one batch ({speedup:.2f}x)"
    if min_cosine is None or not math.isfinite(min_cosine) or min_cosine < MIN_BF16_COSINE:
        return PrecisionChoice(
            "fp32",
            f"bf16 vectors disagree with fp32 (min cosine {min_cosine}); {timing}",
            dict(seconds),
            min_cosine,
        )
    if speedup < MIN_BF16_SPEEDUP:
        return PrecisionChoice("fp32", f"bf16 is not faster: {timing}", dict(seconds), min_cosine)
    return PrecisionChoice(
        "bf16",
        f"bf16 is faster and agrees (min cosine {min_cosine:.4f}): {timing}",
        dict(seconds),
        min_cosine,
    )


# --------------------------------------------------------------------------- progress
def eta_seconds(done_weight: float, total_weight: float, elapsed: float) -> float | None:
    """Seconds left if the rest goes at the rate so far, by weight (e.g. characters: the cost of a
    text grows with its length, so counting texts would misjudge a longest-first order)."""
    if done_weight <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total_weight - done_weight) * elapsed / done_weight)


CHARS_PER_TOKEN = 4  # about right for English text and wordpiece vocabularies
# What a text costs beyond its characters (special tokens, pooling, its share of a batch's fixed
# work), in characters; fitted roughly on a full run over ../shared/data.
PER_TEXT_CHARS = 256


def cost_weights(lengths: Sequence[int], max_tokens: int | None = None) -> np.ndarray:
    """A text's share of the work, for ETAs: a fixed part plus its characters, capped where the
    model cuts it (``max_tokens`` x ``CHARS_PER_TOKEN``: 5,000 characters cost what 1,024 do)."""
    w = np.asarray(lengths, dtype=np.int64)
    if max_tokens:
        w = np.minimum(w, max_tokens * CHARS_PER_TOKEN)
    return w + PER_TEXT_CHARS


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


# --------------------------------------------------------------------------- the loop
class Runner(Protocol):
    """What the loop needs from a model runner (``benchroute.transforms.embedder.Embedder``)."""

    bf16_supported: bool

    def encode(self, texts: list[str], precision: str) -> tuple[np.ndarray, int]: ...

    def time_precisions(self, texts: list[str]) -> tuple[PrecisionChoice, np.ndarray, int]: ...


Sink = Callable[[list[str], np.ndarray, str], None]


@dataclass
class EmbedProgress:
    """Running counts of one embedding run (what progress bars and logs show)."""

    total: int
    total_chars: int
    done: int = 0
    done_chars: int = 0
    truncated: int = 0
    elapsed: float = 0.0
    # where the steady state starts (after the precision probe, which runs a batch twice)
    base_chars: int = 0
    base_elapsed: float = 0.0

    def mark(self) -> None:
        self.base_chars, self.base_elapsed = self.done_chars, self.elapsed

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.done_chars > self.base_chars:
            return eta_seconds(
                self.done_chars - self.base_chars,
                self.total_chars - self.base_chars,
                self.elapsed - self.base_elapsed,
            )
        return eta_seconds(self.done_chars, self.total_chars, self.elapsed)

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"embedded {self.done:,}/{self.total:,} ({pct:.1f}%), {self.rate:.1f} inputs/s, "
            f"ETA {format_seconds(self.eta)}, truncated {self.truncated:,}"
        )


def plan_order(texts: Sequence[str]) -> np.ndarray:
    """Longest-first order of texts by character count (the cheap proxy used before tokenising;
    the runner re-sorts each chunk by token count)."""
    return length_order(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)))


@dataclass(frozen=True)
class EmbedRun:
    """What one pass of ``embed_all`` did."""

    embedded: int
    truncated: int
    seconds: float
    choice: PrecisionChoice


def embed_all(
    ids: Sequence[str],
    texts: Sequence[str],
    runner: Runner,
    sink: Sink,
    *,
    precision: str = "auto",
    batch_size: int = 64,
    probe_size: int = 16,
    on_progress: Callable[[EmbedProgress], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> EmbedRun:
    """Embed ``texts`` longest first in batches of ``batch_size`` and hand each batch's vectors to
    ``sink(ids, vectors, precision)`` as soon as they exist.

    With ``precision="auto"`` one probe batch (``probe_size`` texts of median length, from the
    middle of the length order) is embedded both ways first (``runner.time_precisions``); its
    chosen vectors are kept, and the rest runs at the chosen precision. The probe costs about one
    extra fp32 pass over ``probe_size`` texts. Fewer than two batches: fp32, nothing to gain.
    """
    if len(ids) != len(texts):
        raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
    texts = check_texts(texts, ids)
    start = clock()
    order = plan_order(texts)
    slices = batches(len(order), batch_size)
    weights = cost_weights([len(t) for t in texts], getattr(runner, "max_seq_length", None))
    progress = EmbedProgress(total=len(texts), total_chars=int(weights.sum()))

    def done(batch: np.ndarray, vectors: np.ndarray, n_cut: int, chosen: str) -> None:
        sink([ids[i] for i in batch], vectors, chosen)
        progress.done += len(batch)
        progress.done_chars += int(weights[batch].sum())
        progress.truncated += n_cut
        progress.elapsed = clock() - start
        if on_progress is not None:
            on_progress(progress)

    if precision == "auto" and len(slices) >= 2 and runner.bf16_supported:
        # the probe: the first ``probe_size`` texts of the middle batch (median lengths)
        mid = slices[len(slices) // 2]
        size = min(probe_size, mid.stop - mid.start)
        probe = order[mid.start : mid.start + size]
        choice, vectors, n_cut = runner.time_precisions([texts[i] for i in probe])
        done(probe, vectors, n_cut, choice.precision)
        progress.mark()
        rest = slice(mid.start + size, mid.stop)
        slices = [
            rest if s == mid else s for s in slices if not (s == mid and rest.start == rest.stop)
        ]
    else:
        choice = choose_precision(precision, bf16_supported=runner.bf16_supported)
    for s in slices:
        batch = order[s]
        vectors, n_cut = runner.encode([texts[i] for i in batch], choice.precision)
        done(batch, vectors, n_cut, choice.precision)
    return EmbedRun(progress.done, progress.truncated, clock() - start, choice)
