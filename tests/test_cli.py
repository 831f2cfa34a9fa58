"""The ``benchroute`` command: its spec options are generated from the typed specs, bad values
are usage errors (exit code 2, a message naming the option) before anything runs. No flow runs
here: the flows are replaced by recorders."""

from __future__ import annotations

from typing import Optional

import pytest
import typer
from benchroute.artifacts.specs import EmbedSpec, RouterSpec, Selection
from benchroute.flows import cli
from benchroute.flows.spec_options import option_name, with_specs
from pydantic import Field


def _command(*path: str):
    cmd = cli.command()
    for p in path:
        cmd = cmd.commands[p]
    return cmd


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", ())}


def _paths(cmd, path=()):
    """Every command and group of the CLI, as argv prefixes."""
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _paths(sub, (*path, name))


SPEC_COMMANDS = {
    "publish": (RouterSpec, Selection),
    "refresh": (RouterSpec, EmbedSpec),
    "backfill": (RouterSpec, EmbedSpec, Selection),
    "embed": (EmbedSpec,),
}


@pytest.mark.parametrize("name", sorted(SPEC_COMMANDS))
def test_every_spec_field_is_an_option(name):
    options = _options(_command(name))
    for spec in SPEC_COMMANDS[name]:
        for field in spec.model_fields:
            assert option_name(field) in options, (name, spec.__name__, field)
    if Selection in SPEC_COMMANDS[name]:
        assert "--source" in options  # the hidden old spelling of --kind


def test_a_new_spec_field_is_a_new_option_without_editing_the_command():
    class Wider(RouterSpec):
        shrink: float = Field(0.5, ge=0, le=1, description="how much to shrink")
        tags: tuple[str, ...] = Field((), description="free tags")
        note: Optional[str] = Field(None, description="a note")
        calibrated: bool = Field(True, description="calibrate the predictor")

    seen = {}
    app = typer.Typer(add_completion=False)

    @app.command("fit")
    @with_specs(router=Wider)
    def fit(store: str = "s", router: Wider = Wider()) -> int:
        seen["router"] = router
        return 0

    @app.command("other")
    def other() -> int:
        return 0

    cmd = typer.main.get_command(app)
    assert {"--k", "--shrink", "--tags", "--note", "--index-dtype", "--calibrated"} <= _options(cmd.commands["fit"])
    args = ["fit", "--shrink", "0.25", "--tags", "a", "--tags", "b", "--k", "3", "--pair", "x,y", "--no-calibrated"]
    assert cmd.main(args=args, standalone_mode=False) == 0
    assert seen["router"] == Wider(shrink=0.25, tags=("a", "b"), k=3, pairs=[("x", "y")], calibrated=False)
    assert cmd.main(args=["fit"], standalone_mode=False) == 0 and seen["router"] == Wider()
    seen.clear()
    with pytest.raises(typer.BadParameter) as exc:
        cmd.main(args=["fit", "--shrink", "2"], standalone_mode=False)
    assert exc.value.format_message().startswith("Invalid value for '--shrink'") and not seen


@pytest.mark.parametrize("path", [p for p in _paths(cli.command()) if p], ids=" ".join)
def test_help_of_every_command(path, capsys):
    assert cli.main([*path, "--help"]) == 0
    assert f"Usage: benchroute {' '.join(path)}" in capsys.readouterr().out


def test_main_help_and_unknown_command(capsys):
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("ingest", "publish", "refresh", "backfill", "deploy", "bundles"))
    assert cli.main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


class Recorder:
    """Stands in for a flow (and its ``with_options``): records its call."""

    def __init__(self, result: dict):
        self.calls: list[dict] = []
        self.result = result

    def with_options(self, **_):
        return self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.result


@pytest.fixture
def flows(monkeypatch):
    from benchroute.flows import backfill, embed, publish, refresh

    rec = {
        "publish": Recorder({"created": True, "name": "n", "version": "v", "files": 1, "bytes": 1,
                             "url": "u"}),
        "refresh": Recorder({}),
        "backfill": Recorder({"dry_run": True, "plan": {}}),
        "embed": Recorder({}),
    }
    monkeypatch.setattr(publish, "publish_flow", rec["publish"])
    monkeypatch.setattr(refresh, "refresh_flow", rec["refresh"])
    monkeypatch.setattr(refresh, "print_summary", lambda summary, store: print("summary"))
    monkeypatch.setattr(backfill, "backfill_flow", rec["backfill"])
    monkeypatch.setattr(backfill, "plan_markdown", lambda plan: "planned")
    monkeypatch.setattr(embed, "embed_flow", rec["embed"])
    monkeypatch.setattr(embed, "format_summary", lambda summary: "embedded")
    return rec


ROUTER_ARGS = ["--k", "3", "--weights", "distance", "--predictor", "knn", "--index-dtype", "float32",
               "--index-search", "exact", "--pair", "a,b", "--pair-models", "m1", "--pair-models", "m2",
               "--stability-B", "7"]
ROUTER = RouterSpec(k=3, weights="distance", predictor="knn", index_dtype="float32", index_search="exact",
                    pairs=[("a", "b")], pair_models=["m1", "m2"], stability_B=7)
EMBED_ARGS = ["--embedder", "e", "--precision", "fp32", "--batch-size", "8"]
EMBED = EmbedSpec(embedder="e", precision="fp32", batch_size=8)


def test_spec_options_reach_the_flows(flows, capsys):
    assert cli.main(["publish", "--store", "s", "--kind", "mmlu_pro", "--exclude-model", "x",
                     "--no-evaluate", *ROUTER_ARGS]) == 0
    call = flows["publish"].calls[-1]
    assert call["router"] == ROUTER and not call["evaluate"] and call["embedder"] is None
    assert call["selection"] == Selection(sources=["mmlu_pro"], exclude_models=["x"])
    assert "published: n v" in capsys.readouterr().out

    assert cli.main(["refresh", "landing", "--store", "s", "--kind", "helm", "--partitions", "2",
                     *ROUTER_ARGS, *EMBED_ARGS]) == 0
    call = flows["refresh"].calls[-1]
    assert call["router"] == ROUTER and call["embed"] == EMBED
    assert call["kinds"] == ["helm"] and call["partitions"] == 2 and call["landing"] == "landing"

    assert cli.main(["backfill", "p1", "p2", "--store", "s", "--dataset", "mmlu_pro/*", "--model", "m",
                     "--models", "card.csv", "--dry-run", *ROUTER_ARGS, *EMBED_ARGS]) == 0
    call = flows["backfill"].calls[-1]
    assert call["router"] == ROUTER and call["embed"] == EMBED and call["paths"] == ["p1", "p2"]
    assert call["selection"] == Selection(datasets=["mmlu_pro/*"], models=["m"])
    assert call["model_cards"] == "card.csv" and call["dry_run"]

    assert cli.main(["embed", "--store", "s", *EMBED_ARGS]) == 0
    assert flows["embed"].calls[-1] == {"store": "s", "embed": EMBED}


def test_defaults_are_the_specs_defaults(flows):
    assert cli.main(["refresh", "landing", "--store", "s"]) == 0
    call = flows["refresh"].calls[-1]
    assert call["router"] == RouterSpec() and call["embed"] == EmbedSpec() and call["kinds"] is None


@pytest.mark.parametrize("command", ["publish", "refresh", "backfill"])
@pytest.mark.parametrize("bad, option", [
    (["--weights", "nope"], "--weights"),
    (["--k", "0"], "--k"),
    (["--k", "ten"], "--k"),
    (["--index-dtype", "int8"], "--index-dtype"),
    (["--pair", "a,a"], "--pair"),
    (["--kind", "not-a-reader"], "--kind"),
    (["--precision", "fp8"], "--precision"),
])
def test_a_bad_value_is_a_usage_error_and_nothing_runs(flows, capsys, command, bad, option):
    argv = {"publish": ["publish"], "refresh": ["refresh", "landing"], "backfill": ["backfill"]}[command]
    assert cli.main([*argv, "--store", "s", *bad]) == 2
    err = capsys.readouterr().err
    if option in _options(_command(command)):
        assert f"Invalid value for '{option}'" in err, err
    else:  # publish embeds nothing: no --precision at all
        assert f"No such option: {option}" in err, err
    assert not flows[command].calls


def test_route_usage_errors(tmp_path, capsys):
    assert cli.main(["route", "--bundle", str(tmp_path / "nowhere"), "a question"]) == 2
    assert "benchroute route:" in capsys.readouterr().err
    assert cli.main(["route", "--bundle", "b", "--lambda", "1", "--delta", "0.1", "q"]) == 2
    assert "not allowed with '--lambda'" in capsys.readouterr().err
    assert cli.main(["route", "q"]) == 2  # --bundle is required
    assert "--bundle" in capsys.readouterr().err


def test_module_mains_are_the_cli(capsys):
    from benchroute.flows import backfill, deploy, refresh

    for mod, name in ((refresh, "refresh"), (backfill, "backfill"), (deploy, "deploy")):
        assert mod.main(["--help"]) == 0
        assert f"Usage: benchroute {name}" in capsys.readouterr().out
