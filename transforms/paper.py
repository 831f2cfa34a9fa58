"""Reference numbers from the papers (docs/method.md#reference-numbers), printed beside ours in every report."""

from __future__ import annotations

# Shnitzer et al. 2023, Table 1 (HELM, 29 datasets × 18 models): metric -> method -> value.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "acc": {"S1": .662, "S2": .676, "S3": .694, "S3_true_p": .735, "LL": .684, "BMA": .688, "Oracle": .773},
    "ratio_to_best": {"S1": .855, "S2": .868, "S3": .898, "S3_true_p": .944, "LL": .869, "BMA": .884, "Oracle": 1.0},
    "pearson": {"S1": .685, "S2": .636, "S3": .727, "S3_true_p": .799, "LL": .714},
    "spearman": {"S1": .465, "S2": .468, "S3": .492, "S3_true_p": .596, "LL": .459},
    "pct_bma": {"S1": .17, "S2": .10, "S3": .48, "S3_true_p": .22, "LL": .10, "BMA": 1.0, "Oracle": .21},
    "params_b": {"S1": 40.3, "S2": 44.3, "S3": 49.8, "S3_true_p": 33.8, "BMA": 70.0},
    "rank": {"S1": 6.17, "S2": 5.90, "S3": 5.31, "S3_true_p": 3.80, "BMA": 6.07, "Oracle": 1.0},
}
PAPER_PREDICTOR_ACC = 0.59
PAPER_KERNEL_MAE = 0.116
PAPER_ALPHA_PRED_ACC = 0.65  # predictor accuracy with alpha = 0.05 in-task labels
# Table 2 (MixInstruct, BERTScore): per-input router vs oracle, and model calls per input.
PAPER_TABLE2 = {"router": 74.75, "oracle": 77.67, "router_mcpi": 2}

TABLE1_LABELS = {
    "acc": "Acc.",
    "ratio_to_best": "Ratio to best",
    "pearson": "Pearson",
    "spearman": "Spearman",
    "pct_bma": "%BMA",
    "params_b": "#Params (B)",
    "rank": "Rank",
}


def fmt(value, column: str) -> str:
    """A table cell: one decimal for sizes and ranks, three otherwise, '–' for none."""
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:.1f}" if column in ("params_b", "rank") else f"{value:.3f}"


def table1_beside_paper(rows: list[dict]) -> str:
    """Markdown: Table 1 metrics as rows, methods as columns, each cell 'ours / paper'."""
    methods = [r["method"] for r in rows]
    lines = [
        "| metric | " + " | ".join(f"{m} (ours / paper)" for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for col, label in TABLE1_LABELS.items():
        cells = []
        for r in rows:
            paper = PAPER_TABLE1[col].get(r["method"])
            cells.append(f"{fmt(r.get(col), col)} / {fmt(paper, col) if paper is not None else '–'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
