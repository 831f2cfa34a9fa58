"""The ``embed`` flow (docs/operations.md#prefect-flows): the refresh's embed step over one
partition: every input of a store without a vector for the chosen embedder.

Invalid texts (null, not text, blank) are skipped with a warning naming them, as in ``refresh``
and ``backfill`` (the plain ``embed_store`` refuses them unless ``skip_invalid=True``). The work
lives in ``artifacts.stages.embed``; ``embed_store`` and ``plan_embedding`` are re-exported here
for scripts.
"""

from __future__ import annotations

from benchroute.artifacts.specs import EmbedSpec
from benchroute.artifacts.stages.embed import (
    embed_store,
    format_summary,
    plan_embedding,
)
from benchroute.flows.pipeline import embed_step
from benchroute.flows.runtime import cache_storage
from prefect import flow, get_run_logger

__all__ = ["embed_flow", "embed_store", "format_summary", "plan_embedding"]


@flow(name="embed", log_prints=False)
def embed_flow(store: str, embed: EmbedSpec = EmbedSpec()) -> dict:
    """Embed every input of the store at ``store`` that has no vector for ``embed.embedder`` yet;
    returns ``{new, already_present, total, skipped, seconds, embedder_id, precision, truncated,
    inputs_per_s}`` (``precision`` is ``None`` when nothing needed embedding)."""
    log = get_run_logger()
    step = embed_step(store, embed, partitions=1, concurrency=1, threads=None,
                      storage=cache_storage(store), log=log)
    summary = {
        "new": step["new"], "already_present": step["already_present"], "total": step["total"],
        "skipped": step["invalid"], "seconds": step["seconds"], "embedder_id": step["embedder_id"],
        "precision": step["precision"][0] if step["precision"] else None,
        "truncated": step["truncated"], "inputs_per_s": step["inputs_per_s"],
    }
    log.info(format_summary(summary))
    return summary
