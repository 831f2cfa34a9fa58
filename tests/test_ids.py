"""Input ids and model-name mapping."""

from __future__ import annotations

import polars as pl

from benchroute.transforms.ids import ModelNames, glob_expr, input_id, input_ids, normalize_text


def test_input_id_ignores_whitespace_layout_and_unicode_form():
    assert input_id("What is  2+2?\n") == input_id(" What is 2+2?")
    assert input_id("caf\u00e9") == input_id("cafe\u0301")  # NFC
    assert input_id("What is 2+2?") != input_id("What is 2+3?")
    assert len(input_id("x")) == 32


def test_input_ids_vectorised_matches_scalar():
    s = pl.Series("t", ["a", None, "b  c"])
    assert input_ids(s).to_list() == [input_id("a"), None, input_id("b c")]
    assert normalize_text("  a \t b ") == "a b"


def test_shipped_aliases_join_sources():
    names = ModelNames.default()
    # HELM, MMLU-Pro and RouteLLM spellings of the same models.
    assert names.canonical("together/llama-3-70b") == "meta/llama-3-70b"
    assert names.canonical("Meta-Llama-3-70B") == "meta/llama-3-70b"
    assert names.canonical("mistralai/Mixtral-8x7B-Instruct-v0.1") == names.canonical(
        "Mixtral-8x7B-Instruct-v0.1"
    )
    assert names.canonical("gpt4_1106_preview") == names.canonical("gpt-4-1106-preview")
    assert names.canonical("unknown-model") == "unknown-model"
    assert names.params_b["meta/llama-3-70b"] == 70


def test_user_aliases_extend_and_override(tmp_path):
    p = tmp_path / "aliases.csv"
    p.write_text("alias,model\nmy-llama,meta/llama-3-70b\nMeta-Llama-3-70B,mine/llama\n")
    names = ModelNames.load(str(p))
    assert names.canonical("my-llama") == "meta/llama-3-70b"
    assert names.canonical("Meta-Llama-3-70B") == "mine/llama"
    assert names.canonical("together/llama-3-8b") == "meta/llama-3-8b"


def test_glob_expr_matches_names_and_globs():
    df = pl.DataFrame({"dataset": ["mmlu_pro/law", "mmlu_pro/math", "gsm8k", "helm/bbq"]})
    assert df.filter(glob_expr("dataset", ["mmlu_pro/*", "gsm8k"]))["dataset"].to_list() == [
        "mmlu_pro/law", "mmlu_pro/math", "gsm8k"]
    assert df.filter(glob_expr("dataset", ["helm/bb?"])).height == 1
    assert df.filter(glob_expr("dataset", ["mmlu_pro/l.w"])).height == 0  # regex characters are literal
