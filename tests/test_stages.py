"""The stage modules stand alone (no Prefect), flows do not import each other in a cycle, and the
flows' choices derive from their registries."""

from __future__ import annotations

import subprocess
import sys
import typing

from benchroute.artifacts.stages.embed import MIN_PARTITION, n_partitions
from benchroute.flows.params import READER_KINDS, Kind
from benchroute.transforms.ingest import READER_MODULES


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_stages_import_no_prefect():
    mods = _modules_after("import benchroute.artifacts.stages.ingest, benchroute.artifacts.stages.embed, "
                          "benchroute.artifacts.stages.evaluate, benchroute.artifacts.stages.fit, "
                          "benchroute.artifacts.stages.publish, benchroute.artifacts.stages.backfill")
    assert not {m for m in mods if m == "prefect" or m.startswith("prefect.")}
    assert not {m for m in mods if m.startswith("benchroute.flows")}


def test_refresh_and_backfill_do_not_import_the_cli():
    mods = _modules_after("import benchroute.flows.refresh, benchroute.flows.backfill")
    assert "benchroute.flows.cli" not in mods


def test_kinds_are_the_reader_registry():
    assert READER_KINDS == READER_MODULES
    assert typing.get_args(Kind) == READER_MODULES


def test_one_partition_formula():
    assert n_partitions(0, 4) == 0
    assert n_partitions(1, 4) == 1
    assert n_partitions(MIN_PARTITION * 2, 4) == 2
    assert n_partitions(MIN_PARTITION * 100, 4) == 4


def test_backfill_cli_spells_kind_once_and_passes_aliases_and_k(monkeypatch, capsys):
    from benchroute.flows import backfill

    seen = {}

    class Recorder:
        def with_options(self, **_):
            return self

        def __call__(self, **kwargs):
            seen.update(kwargs)
            return {"dry_run": True, "plan": {}}

    monkeypatch.setattr(backfill, "backfill_flow", Recorder())
    monkeypatch.setattr(backfill, "plan_markdown", lambda plan: "planned")
    assert backfill.main(["--store", "s", "--kind", "mmlu_pro", "--source", "routellm",
                          "--aliases", "a.csv", "--k", "5", "--index-dtype", "float32", "--dry-run"]) == 0
    assert seen["selection"].sources == ("mmlu_pro", "routellm")  # --source: the hidden old spelling
    assert seen["aliases"] == "a.csv" and seen["dry_run"]
    assert seen["router"].k == 5 and seen["router"].index_dtype == "float32"
    seen.clear()
    assert backfill.main(["--store", "s", "--kind", "not-a-reader"]) == 2
    assert "Invalid value for '--kind'" in capsys.readouterr().err and not seen
