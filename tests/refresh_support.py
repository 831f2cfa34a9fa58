"""Helpers for the refresh/backfill tests: a landing zone made of real sample dumps, and stores
seeded with vectors the session's embedded sample store already computed (so a test embeds only
the few inputs it leaves out, with the real model, instead of all of them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from benchroute.artifacts import embeddings as emb_store
from benchroute.artifacts.store import Store
from benchroute.schemas.embeddings import table_name

from conftest import SAMPLE

LANDING_SOURCES = ("mmlu_pro", "routellm")


def make_landing(root: Path, hold_back: int = 2) -> tuple[Path, list[str], pl.DataFrame]:
    """sample/mmlu_pro (without ``hold_back`` models' results) and sample/routellm under
    ``root/landing``; returns the folder, the held-back models and the full results table."""
    landing = root / "landing"
    for src in LANDING_SOURCES:
        shutil.copytree(SAMPLE / src, landing / src)
    results = pl.read_parquet(landing / "mmlu_pro" / "results.parquet")
    held = sorted(results["model"].unique().to_list())[:hold_back]
    results.filter(~pl.col("model").is_in(held)).write_parquet(landing / "mmlu_pro" / "results.parquet")
    return landing, held, results


def land_held_back(landing: Path, results: pl.DataFrame) -> None:
    """The held-back models' results land: the MMLU-Pro dump is replaced by the full one."""
    results.write_parquet(landing / "mmlu_pro" / "results.parquet")


def seed_vectors(src_url: str, dst_url: str, leave_out: int) -> tuple[int, list[str]]:
    """Copy the vectors of the landing's inputs from ``src_url`` into ``dst_url`` (one committed
    part), all but ``leave_out`` of them; returns (vectors copied, ids left out)."""
    src = Store(src_url)
    eid = emb_store.embedders(src)[0]
    ids = (
        src.read("memberships")
        .filter(pl.col("source").is_in(LANDING_SOURCES))["input_id"]
        .unique()
        .sort()
    )
    left_out = ids.head(leave_out).to_list()
    frame = emb_store.read_table(src, eid).filter(
        pl.col("input_id").is_in(ids.implode()) & ~pl.col("input_id").is_in(left_out)
    )
    identity, precision = emb_store.read_part_identity(src, src.parts(table_name(eid))[0])
    emb_store.write_part(Store(dst_url), identity, frame, precision=precision)
    return frame.height, left_out
