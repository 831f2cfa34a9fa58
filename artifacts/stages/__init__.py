"""The pipeline's stages as plain modules (no Prefect): ingest -> embed -> evaluate -> fit -> publish.

Each module holds one stage's domain logic with a typed entry point; the Prefect flows in
``benchroute.flows`` only sequence tasks that call them (README.md#architecture).

- ``ingest``: run dumps -> committed canonical tables, labels and their staleness;
- ``embed``: which inputs need a vector, partitions of them, writing vectors in parts;
- ``evaluate``: which embedder, the leave-one-dataset-out evaluation per source group, its
  fingerprints (what a cached result is keyed by) and the report;
- ``fit``: what a bundle is built from (selection, embedder, evaluation) and its data key;
- ``publish``: fit and publish one bundle version (``artifacts.router_build`` builds it);
- ``backfill``: what a backfill would do (a dry run's plan).
"""


class PipelineError(RuntimeError):
    """A step failed; the message says which partitions or groups, what is kept and how to resume."""
