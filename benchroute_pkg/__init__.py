"""benchroute: LLM benchmark outputs -> model-router bundles.

The code lives in the root folders ``flows/``, ``transforms/``, ``schemas/`` and ``artifacts/``,
installed as ``benchroute.flows``, ``benchroute.transforms``, ...
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("benchroute")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
