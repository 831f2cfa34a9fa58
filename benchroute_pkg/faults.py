"""Test-only fault injection: die at a named step of a multi-step write, as ``kill -9`` would.

``crash_point(name)`` sends this process SIGKILL when the environment variable
``BENCHROUTE_CRASH_AT`` holds ``name`` (several names: comma-separated); without the variable it
does nothing. ``tests/test_crash_recovery.py`` runs the real CLI with it set, then without, and
checks that the rerun finishes (or rolls back) what the killed run left half-done.

The points, in the order a run reaches them:

- ``ingest.appended``: an ingest batch is committed, labels are not recomputed yet;
- ``ingest.labelled``: the labels commit landed, the model card is not synced yet;
- ``bundle.intent``: a publish recorded its intent, no data file written yet;
- ``bundle.files``: the data files are written and verified, no manifest yet;
- ``bundle.manifest``: the manifest is committed, ``latest`` has not moved yet;
- ``bundle.ref``: ``latest`` moved, the intent is not cleared yet;
- ``gc.manifest_removed``: gc removed a version's manifest, not its folder yet;
- ``rollback.cleared``: rollback cleared pending publishes, ``latest`` has not moved yet.
"""

from __future__ import annotations

import os
import signal

ENV = "BENCHROUTE_CRASH_AT"  # benchroute.settings.CRASH_AT


def crash_point(name: str) -> None:
    """SIGKILL this process if ``BENCHROUTE_CRASH_AT`` names ``name`` (no-op otherwise)."""
    from benchroute import settings

    if name in settings.crash_points():
        os.kill(os.getpid(), signal.SIGKILL)
