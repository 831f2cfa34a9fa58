"""benchroute: LLM benchmark outputs -> model-router bundles.

The code lives in the root folders ``flows/``, ``transforms/``, ``schemas/`` and ``artifacts/``,
installed as ``benchroute.flows``, ``benchroute.transforms``, ...
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("benchroute")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def code_version() -> str:
    """``<version>+<12 hex>``: the package version plus a hash of the source of everything that
    computes results (``transforms``, ``artifacts``, ``schemas``), so an edited checkout (an
    editable install keeps its version number) never reuses a cached evaluation or fit, and a
    bundle's manifest names the code that built it."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import hashlib
        from importlib import resources

        h = hashlib.sha256()
        for package in ("benchroute.transforms", "benchroute.artifacts", "benchroute.schemas"):
            root = resources.files(package)
            stack = [root]
            files = []
            while stack:
                node = stack.pop()
                for child in node.iterdir():
                    if child.is_dir() and child.name != "__pycache__":
                        stack.append(child)
                    elif child.name.endswith((".py", ".csv", ".json")):
                        files.append(child)
            for f in sorted(files, key=lambda f: str(f)):
                h.update(str(f).split(package.rsplit(".", 1)[1], 1)[-1].encode())
                h.update(f.read_bytes())
        _CODE_VERSION = f"{__version__}+{h.hexdigest()[:12]}"
    return _CODE_VERSION


_CODE_VERSION: str | None = None
