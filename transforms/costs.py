"""What a request costs on each model, from the model cards' prices and token counts (docs/method.md#request-costs).

cost(x, m) = in_tokens(x) · usd_per_1m_input(m) / 1e6 + out_tokens(x, m) · usd_per_1m_output(m) / 1e6

Token counts, stated assumptions where the data records none:

- ``in_tokens(x)``: the stored input text's characters / ``CHARS_PER_TOKEN`` (4, the usual
  English rule of thumb for BPE tokenizers), at least 1. Few-shot prompt scaffolding that the
  benchmark added around the text is not counted (it is the same for every model).
- ``out_tokens(x, m)``: what the benchmark recorded for that answer (``output_chars`` / 4, or
  HELM's ``num_output_tokens``) where it did; the decision at serving time cannot know it, so it
  uses the model's mean recorded output tokens (``expected_output_tokens``); a model with no
  recorded output uses ``DEFAULT_OUTPUT_TOKENS``.

Relative costs: a router's cost is reported as a share of the reference cost, the cost of the same
requests on the best single model (``reference_cost``); λ of the utility rule is in quality per
reference cost.
"""

from __future__ import annotations

import numpy as np

CHARS_PER_TOKEN = 4.0
DEFAULT_OUTPUT_TOKENS = 256.0
OUTPUT_METRICS = {"output_chars": 1.0 / CHARS_PER_TOKEN, "num_output_tokens": 1.0}


def input_tokens(texts) -> np.ndarray:
    """Estimated prompt tokens of each text (characters / 4, at least 1)."""
    return np.maximum(1.0, np.array([len(t) for t in texts], np.float64) / CHARS_PER_TOKEN)


def request_costs(in_tokens: np.ndarray, out_tokens: np.ndarray, price_in: np.ndarray,
                  price_out: np.ndarray) -> np.ndarray:
    """USD of each (request, model): ``in_tokens`` (n,), ``out_tokens`` (n × M or M,), prices
    (M,) in USD per 1M tokens (NaN = unknown, giving NaN costs)."""
    tin = np.asarray(in_tokens, np.float64)[:, None]
    tout = np.broadcast_to(np.asarray(out_tokens, np.float64), (tin.shape[0], len(price_in)))
    return (tin * np.asarray(price_in, np.float64)[None, :]
            + tout * np.asarray(price_out, np.float64)[None, :]) / 1e6


def expected_output_tokens(out_tokens: np.ndarray) -> np.ndarray:
    """(M,) each model's mean recorded output tokens over the rows where recorded (NaN = none),
    ``DEFAULT_OUTPUT_TOKENS`` for a model with no record."""
    return expected_output_tokens_of_rows(out_tokens, None)


def expected_output_tokens_of_rows(out_tokens: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``expected_output_tokens(out_tokens[rows])`` read a block of rows at a time (no copy of a
    leaderboard's n × M token matrix)."""
    from benchroute.transforms.label_matrix import column_means

    cnt, mean = column_means(out_tokens, rows)
    return np.where(cnt > 0, mean, DEFAULT_OUTPUT_TOKENS)


def reference_model(train_acc: np.ndarray, price_in: np.ndarray, price_out: np.ndarray,
                    support: np.ndarray | None = None) -> int | None:
    """The best single model with a known price (highest training accuracy) among those with at
    least half the training labels of the best-supported priced model (``support``: labels per
    model; a model seen on one input is no reference), or None when no model is priced."""
    priced = ~np.isnan(np.asarray(price_in, np.float64)) & ~np.isnan(np.asarray(price_out, np.float64))
    if support is not None:
        sup = np.asarray(support, np.float64)
        priced &= sup >= 0.5 * (sup[priced].max() if priced.any() else 0.0)
        priced &= sup > 0
    if not priced.any():
        return None
    idx = np.flatnonzero(priced)
    acc = np.nan_to_num(np.asarray(train_acc, np.float64)[idx], nan=-np.inf)
    return int(idx[np.argmax(acc)])


def reference_cost(typical_in_tokens: float, exp_out_tokens: np.ndarray, price_in: np.ndarray,
                   price_out: np.ndarray, ref: int | None) -> float:
    """USD of a typical request on the reference model (NaN when there is none)."""
    if ref is None:
        return float("nan")
    return float(request_costs(np.array([typical_in_tokens]), exp_out_tokens, price_in, price_out)[0, ref])
