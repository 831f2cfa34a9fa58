"""A bundle consumer needs numpy, pyarrow and fsspec (and jsonschema for the manifest): loading
and routing with embeddings imports no polars, dataframely, Prefect or torch."""

from __future__ import annotations

import json
import subprocess
import sys

from benchroute.artifacts.stages.fit import FitOptions


def test_router_import_is_light(embedded_sample_store, tmp_path):
    from benchroute.flows.publish import publish_store

    publish_store(embedded_sample_store, "light", FitOptions(evaluate=False))
    code = f"""
import json, sys
import numpy as np
from benchroute.artifacts.router import load_router
r = load_router({embedded_sample_store!r}, "light")
q = np.ones(r.knn.n_features_in_, dtype=np.float32)
choice = r.route(q / np.linalg.norm(q))
heavy = sorted(m for m in ("polars", "dataframely", "prefect", "torch", "sentence_transformers") if m in sys.modules)
print(json.dumps({{"model": choice["model"], "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] and result["heavy"] == []
