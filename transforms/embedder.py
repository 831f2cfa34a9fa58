"""The model runner: texts in, L2-normalised float32 vectors out. Thin on purpose.

It loads a sentence-transformers model from an installed weight package (``weights.locate``;
never a hub name, ``HF_HUB_OFFLINE=1``), sets torch's threads from the cores this process may use,
runs on the GPU when there is one, tokenises a batch once (counting inputs cut at the model's
limit) and runs the forward pass at fp32 or under bf16 autocast. Ordering, batching and the
precision decision are in ``benchroute.transforms.embed``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchroute import settings

import numpy as np

from benchroute.schemas.embeddings import EmbedderIdentity
from benchroute.transforms.embed import (
    PrecisionChoice,
    choose_precision,
    embedder_identity,
    l2_normalize,
    row_cosines,
)
from benchroute.transforms.embedder_packages import DEFAULT_EMBEDDER, Located, WeightsError, locate

_LOCK = threading.Lock()
# fp32/bf16 time ratios too close to call from one timing each (a busy machine can shift one
# timing by this much): the probe is timed a second time, in the other order.
AMBIGUOUS = (0.67, 1.5)


def _offline() -> None:
    """No hub at run time, whatever the caller's environment says."""
    settings.offline()


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


# --------------------------------------------------------------------------- identity
@functools.lru_cache(maxsize=16)
def _identity_cached(name: str, dim: int, folder: str, stamp: tuple) -> EmbedderIdentity:
    return embedder_identity(name, dim, folder)


def _stamp(folder: Path) -> tuple:
    return tuple(
        sorted(
            (str(p), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()
        )
    )


def resolve(name: str = DEFAULT_EMBEDDER) -> tuple[Located, EmbedderIdentity]:
    """Where ``name``'s weights are and the identity its vectors are stored under, without loading
    the model where the width is known (a no-op refresh never imports torch)."""
    located = locate(name)
    dim = located.dim
    if dim is None:  # a user's folder: the width comes from the model itself
        dim = load(name).dim
    try:
        identity = _identity_cached(located.name, dim, str(located.folder), _stamp(located.folder))
    except OSError as exc:
        raise WeightsError(
            f"{located.source}: cannot read the weights in {located.folder}: {exc}"
        ) from exc
    return located, identity


# --------------------------------------------------------------------------- loading
_MODELS: dict[tuple[str, str], Embedder] = {}


def load(
    name: str = DEFAULT_EMBEDDER, *, device: str | None = None, threads: int | None = None
) -> Embedder:
    """A loaded embedder (cached per folder and device within the process)."""
    _offline()
    import torch

    located = locate(name)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads or available_cores())
    key = (str(located.folder), device)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        model = _load_model(located, device)
        dim = int(model.get_embedding_dimension())
        if located.dim is not None and dim != located.dim:
            raise WeightsError(
                f"{located.source}: the model in {located.folder} gives {dim}-d vectors, "
                f"expected {located.dim}: the package is not the one benchroute knows"
            )
        identity = _identity_cached(located.name, dim, str(located.folder), _stamp(located.folder))
        emb = Embedder(located=located, identity=identity, model=model, device=device)
        emb._check_tokenizer()
        _MODELS[key] = emb
        return emb


def _load_model(located: Located, device: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a dependency of benchroute
        raise WeightsError(f"sentence-transformers is not installed ({exc})") from exc
    try:
        return SentenceTransformer(str(located.folder), device=device, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, json, torch: any of them can fail
        raise WeightsError(
            f"{located.source}: cannot load the model in {located.folder} "
            f"({type(exc).__name__}: {exc}); the weight package is damaged or incomplete: reinstall it"
        ) from exc


# --------------------------------------------------------------------------- running
@dataclass
class Embedder:
    """A loaded model and how to run it. Build with ``load``."""

    located: Located
    identity: EmbedderIdentity
    model: object
    device: str
    _fast_tokenize: bool = True
    _extra: dict | None = None

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    @property
    def bf16_supported(self) -> bool:
        import torch

        if self.device.startswith("cuda"):
            return bool(torch.cuda.is_bf16_supported())
        return True  # CPU autocast always runs bf16; whether it is *faster* is measured

    # ---------------------------------------------------------------- tokens
    def features(self, texts: list[str]) -> tuple[dict, int]:
        """Model inputs for ``texts`` (padded to the batch's longest, cut at the model's limit) and
        how many texts were cut."""
        if self._fast_tokenize:
            arrays, n_cut = self._tokenize(texts)
            feats = self._to_tensors(arrays)
        else:  # the model's own preprocessing (any sentence-transformers model)
            feats = self.model.preprocess(texts)
            lengths = self.model.tokenizer(texts, truncation=False)["input_ids"]
            n_cut = sum(len(x) > self.max_seq_length for x in lengths)
        return feats, n_cut

    def _tokenize(self, texts: list[str]) -> tuple[dict[str, np.ndarray], int]:
        """One tokenizer call that also tells which texts are over the limit: texts are cut at
        ``limit + 1`` tokens, so a row that long was cut; only those rows are tokenised again at
        the limit (rare), with the tokenizer's own truncation rules."""
        tok, limit = self.model.tokenizer, self.max_seq_length
        enc = tok(texts, padding=True, truncation=True, max_length=limit + 1, return_tensors="np")
        arrays = {k: np.asarray(v) for k, v in enc.items() if k in tok.model_input_names}
        cut = np.flatnonzero(arrays["attention_mask"].sum(axis=1) > limit)
        if cut.size:
            fixed = tok(
                [texts[i] for i in cut],
                padding="max_length",
                truncation=True,
                max_length=limit,
                return_tensors="np",
            )
            arrays = {k: np.ascontiguousarray(v[:, :limit]) for k, v in arrays.items()}
            for k in arrays:
                arrays[k][cut] = fixed[k]
        return arrays, int(cut.size)

    def _to_tensors(self, arrays: dict[str, np.ndarray]) -> dict:
        import torch

        feats = {k: torch.from_numpy(v.astype(np.int64, copy=False)) for k, v in arrays.items()}
        if self.device != "cpu":
            feats = {k: v.to(self.device, non_blocking=True) for k, v in feats.items()}
        return {**feats, **(self._extra or {})}

    def _check_tokenizer(self) -> None:
        """Use the one-call tokenisation only where it gives exactly the model's own features."""
        probe = [
            "A short one.",
            "Word " * (self.max_seq_length + 40),
            "Mixed CASE, punctuation; ünïcode 数字 123.",
        ]
        try:
            own = self.model.preprocess(probe)
            arrays, n_cut = self._tokenize(probe)
        except Exception:  # noqa: BLE001 - any tokenizer quirk: use the model's own path
            self._fast_tokenize = False
            return
        self._extra = {k: v for k, v in own.items() if not hasattr(v, "shape")}  # e.g. modality
        same = (
            n_cut == 1
            and all(
                k in own and np.array_equal(np.asarray(own[k].cpu()), arrays[k]) for k in arrays
            )
            and all(k in arrays for k, v in own.items() if hasattr(v, "shape"))
        )
        self._fast_tokenize = bool(same)

    # ---------------------------------------------------------------- forward
    def forward(self, feats: dict, precision: str) -> np.ndarray:
        """L2-normalised float32 vectors for prepared features."""
        import torch

        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with (
            torch.inference_mode(),
            torch.autocast(device_type, dtype=torch.bfloat16, enabled=(precision == "bf16")),
        ):
            out = self.model(dict(feats))["sentence_embedding"]
        return l2_normalize(out.float().cpu().numpy())

    def encode(self, texts: list[str], precision: str = "fp32") -> tuple[np.ndarray, int]:
        """Vectors of ``texts`` (one batch) and the number of texts cut at the model's limit."""
        feats, n_cut = self.features(texts)
        return self.forward(feats, precision), n_cut

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def probe_key(self) -> str:
        """What the fp32/bf16 probe's answer depends on: this machine's CPU (or GPU), the cores
        this process may use, the torch version, the device and the embedder."""
        import platform

        import torch

        if self.device.startswith("cuda"):
            hw = torch.cuda.get_device_name(torch.device(self.device))
        else:
            hw = _cpu_model()
        return "|".join([platform.node(), platform.machine(), hw, f"{available_cores()} cores",
                         f"torch {torch.__version__}", self.device, self.identity.id])

    def time_precisions(self, texts: list[str]) -> tuple[PrecisionChoice, np.ndarray, int]:
        """The probe's choice remembered for this ``probe_key`` (``remembered_precision``), else
        ``measure_precisions`` and remember it. Returns the choice, the chosen vectors, the
        cut count."""
        known = remembered_precision(self.probe_key())
        if known is not None:
            vecs, n_cut = self.encode(texts, known.precision)
            return known, vecs, n_cut
        choice, vecs, n_cut = self.measure_precisions(texts)
        if choice.seconds:  # a measured choice (not "bf16 unsupported"): worth remembering
            remember_precision(self.probe_key(), choice)
        return choice, vecs, n_cut

    def measure_precisions(self, texts: list[str]) -> tuple[PrecisionChoice, np.ndarray, int]:
        """Embed one batch at fp32 and under bf16, timed (after a small warm-up of each), and
        choose (``embed.choose_precision``); a close call is timed once more in the other order.

        On the CPU the timings are this process's CPU seconds, not wall seconds: another process
        taking a core for a moment stretches wall time by any amount, CPU time far less. On a GPU
        they are wall seconds. Returns the choice, the chosen vectors, the cut count."""
        if not self.bf16_supported:
            vecs, n_cut = self.encode(texts, "fp32")
            return choose_precision("auto", bf16_supported=False), vecs, n_cut
        feats, n_cut = self.features(texts)
        warm = {
            k: (v[: min(2, len(texts))] if hasattr(v, "shape") else v) for k, v in feats.items()
        }
        for p in ("fp32", "bf16"):
            self.forward(warm, p)
        clock = time.perf_counter if self.device.startswith("cuda") else time.process_time
        out: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}

        def timed(p: str) -> None:
            self._sync()
            t0 = clock()
            out[p] = self.forward(feats, p)
            self._sync()
            seconds[p] = min(seconds.get(p, float("inf")), clock() - t0)

        timed("fp32")
        timed("bf16")
        ratio = seconds["fp32"] / max(seconds["bf16"], 1e-9)
        if AMBIGUOUS[0] < ratio < AMBIGUOUS[1]:  # too close to call on a busy machine: once more,
            timed("bf16")  # in the other order, keeping each precision's best time
            timed("fp32")
        cos = float(row_cosines(out["fp32"], out["bf16"]).min())
        choice = choose_precision("auto", seconds=seconds, min_cosine=cos)
        return choice, out[choice.precision], n_cut


# --------------------------------------------------------------------------- the probe, remembered
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown cpu"


def probe_file() -> Path:
    """Where measured fp32/bf16 choices are kept (beside the unpacked weights)."""
    return settings.weights_cache() / "precision_probe.json"


def _probe_records() -> dict:
    import json

    try:
        data = json.loads(probe_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remembered_precision(key: str) -> PrecisionChoice | None:
    """The choice a probe measured for ``key`` earlier (``Embedder.probe_key``), or None. A record
    that is not a well-formed choice is ignored (the probe runs again)."""
    rec = _probe_records().get(key)
    if not isinstance(rec, dict) or rec.get("precision") not in ("fp32", "bf16"):
        return None
    seconds = rec.get("seconds") if isinstance(rec.get("seconds"), dict) else {}
    cos = rec.get("min_cosine")
    return PrecisionChoice(rec["precision"], f"remembered: {rec.get('reason', '')}",
                           {k: float(v) for k, v in seconds.items() if isinstance(v, (int, float))},
                           float(cos) if isinstance(cos, (int, float)) else None)


def remember_precision(key: str, choice: PrecisionChoice) -> None:
    """Keep ``choice`` for ``key`` (atomic replace of the file; a failure to write only costs a
    probe next time)."""
    import json

    import fsspec

    from benchroute.io import atomic_put

    records = _probe_records()
    records[key] = {"precision": choice.precision, "reason": choice.reason, "seconds": choice.seconds,
                    "min_cosine": choice.min_cosine, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_put(fsspec.filesystem("file"), str(probe_file()), json.dumps(records, indent=1, sort_keys=True).encode())
    except OSError as exc:
        import logging

        logging.getLogger("benchroute.embed").warning("could not remember the precision probe: %s", exc)

