"""Every environment variable benchroute reads or sets, in one place.

Read (each has a default; none is required):

=================================  ================================================================
``BENCHROUTE_CACHE_KEY``           HMAC key of the Prefect cache records (else a key file under
                                   ``$XDG_CONFIG_HOME/benchroute``, created once, mode 0600)
``BENCHROUTE_CACHE``               where embedder weights are unpacked (else
                                   ``$XDG_CACHE_HOME/benchroute``)
``BENCHROUTE_CRASH_AT``            tests only: SIGKILL this process at the named step(s)
                                   (``benchroute.faults``)
``XDG_CONFIG_HOME``                default ``~/.config``
``XDG_CACHE_HOME``                 default ``~/.cache``
``PREFECT_API_URL``/``PREFECT_HOME``  Prefect's own (``flows.deploy`` reads and sets them)
=================================  ================================================================

Set as defaults for a command (``process_defaults``; a value the caller set wins):

- ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: never reach the hub; the weights come from
  installed packages;
- ``TOKENIZERS_PARALLELISM=false``: no fork warning from the fast tokenizer;
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``:
  the temporary Prefect server of a flow command starts quietly and has time to on a slow machine.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_KEY = "BENCHROUTE_CACHE_KEY"
WEIGHTS_CACHE = "BENCHROUTE_CACHE"
CRASH_AT = "BENCHROUTE_CRASH_AT"

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def offline() -> None:
    """No model hub at run time, whatever the caller's environment says (unless it set them)."""
    for k, v in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(k, v)


def process_defaults() -> None:
    """The defaults of a ``benchroute`` command (module doc); the caller's values win."""
    offline()
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)


def cache_key() -> str | None:
    return os.environ.get(CACHE_KEY) or None


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def weights_cache() -> Path:
    """Where embedder weight packages are unpacked."""
    env = os.environ.get(WEIGHTS_CACHE)
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "benchroute"


def crash_points() -> list[str]:
    at = os.environ.get(CRASH_AT)
    return at.split(",") if at else []
