"""What a backfill would do (its dry run): the dumps to ingest, the inputs without a vector, the
datasets and models the bundle would hold, and which of the names asked for match nothing; read
from the dumps' fingerprints and the store as it is now, writing nothing.
"""

from __future__ import annotations

from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.bundle import BundleStore
from benchroute.artifacts.router_build import SelectedLabels
from benchroute.artifacts.specs import Selection
from benchroute.artifacts.stages.embed import n_partitions
from benchroute.artifacts.store import Store
from benchroute.transforms.ids import glob_expr
from benchroute.transforms.ingest import discover
from benchroute.transforms.lodo_groups import group_shapes


def backfill_plan(
    store_url: str, paths: list[str], sel: Selection, embedder: str, *, kinds=None,
    partitions: int = 4, relabel: bool = False, name: str = "default",
) -> dict:
    """What a backfill would do, from the dumps' fingerprints and the store as it is now."""
    from benchroute.transforms.embedder import resolve

    store = Store(store_url)
    units = discover(paths, kinds) if paths else []  # a path with no known layout is an error
    known = set(store.units().values())
    new = [u.key for u in units if u.fingerprint not in known]
    _, identity = resolve(embedder)
    labels = SelectedLabels(store, sel, max_labels=0)  # its coverage and inputs: nothing held
    memberships = labels.memberships
    # the inputs the bundle is built from (``stages.embed.selected_ids``): the selection's, or all
    ids = (store.read("inputs", columns=["input_id"])["input_id"].unique() if sel.is_all
           else labels.input_ids)
    present = emb_store.present_ids(store, identity)
    missing = int((~ids.is_in(present.implode())).sum() or 0)
    # every stored (dataset, model) pair, to name the patterns that match nothing at all
    all_labels = SelectedLabels(store, Selection(), memberships, max_labels=0).coverage
    unmatched = {}
    for what, col in (("datasets", "dataset"), ("models", "model"), ("exclude_models", "model")):
        for pattern in getattr(sel, what) or ():
            if all_labels.filter(glob_expr(col, [pattern])).height == 0:
                unmatched.setdefault(what, []).append(pattern)
    have = set(memberships["source"].unique().to_list())
    if [s for s in sel.sources or () if s not in have]:
        unmatched["sources"] = [s for s in sel.sources if s not in have]
    groups = group_shapes(labels.coverage, memberships, exclude_models=list(sel.exclude_models or []))
    return {
        "store": store_url,
        "ingest": {"dumps": len(units), "new": new, "already_in_store": len(units) - len(new)},
        "relabel": relabel,
        "embed": {
            "embedder_id": identity.id,
            "inputs_without_vector_now": missing,
            "partitions": n_partitions(missing, partitions),
            "note": "inputs of new dumps are counted once they are read" if new else None,
        },
        "bundle": {
            "name": name,
            "versions_now": len(BundleStore(store_url).versions(name)),
            "selection": sel.to_dict(),
            "datasets": sorted(labels.coverage["dataset"].unique().to_list()),
            "models": sorted(labels.coverage["model"].unique().to_list()),
            "inputs": labels.input_ids.len(),
            "groups": {g.name: g.skipped or f"{len(g.datasets)} datasets x {len(g.models)} models"
                       for g in groups},
        },
        "unmatched": unmatched,
    }


def plan_markdown(plan: dict) -> str:
    """The dry run's plan for people (the ``backfill-plan`` artifact, the CLI's output)."""
    b = plan["bundle"]
    lines = [
        "# backfill: dry run (nothing written)", "",
        f"- store `{plan['store']}`",
        f"- ingest: {len(plan['ingest']['new'])} new run dumps of {plan['ingest']['dumps']}"
        + "".join(f"\n  - `{k}`" for k in plan["ingest"]["new"][:50]),
        f"- relabel: {plan['relabel']}",
        *([f"- model cards: {'would change' if plan['cards']['changed'] else 'unchanged'} "
           f"(card files: {', '.join(plan['cards']['files']) or 'the shipped defaults only'})"]
          if plan.get("cards") else []),
        f"- embed with `{plan['embed']['embedder_id']}`: {plan['embed']['inputs_without_vector_now']:,} "
        f"inputs without a vector now, in {plan['embed']['partitions']} partitions"
        + (f" ({plan['embed']['note']})" if plan["embed"]["note"] else ""),
        f"- bundle **{b['name']}** ({b['versions_now']} versions now): {len(b['models'])} models, "
        f"{len(b['datasets'])} datasets, {b['inputs']:,} inputs (from the store as it is now)",
        *[f"  - group {g}: {v}" for g, v in sorted(b["groups"].items())],
    ]
    if plan["unmatched"]:
        lines.append(f"- **match nothing**: {plan['unmatched']}")
    return "\n".join(lines)
