"""Model cards: reading user cards, pricing by rule, merging, the card in the store and its
fingerprint, and the output-length outcomes that never make labels."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import polars as pl
import pytest
from benchroute.artifacts.model_cards import UNIT_KEY, build_store_cards, sync_cards
from benchroute.artifacts.specs import RouterSpec
from benchroute.artifacts.store import Store
from benchroute.flows.cli import main as cli
from benchroute.transforms import binarize as bz
from benchroute.transforms.ids import ModelNames
from benchroute.transforms.ingest import alpaca_eval, discover, find_cards, mmlu_pro
from benchroute.transforms.model_cards import (
    CardError,
    build_cards,
    cards_for,
    default_cards,
    load_facts,
    merge_cards,
    read_card,
    read_prices,
)
from conftest import FIXTURES, REPO, SAMPLE

PRICES = REPO.parent / "shared" / "data" / "prices"

CSV_CARD = """model,display_name,params_b,open_weights,architecture,usd_per_1m_input,usd_per_1m_output,price_rule,price_source,price_as_of
openai/gpt-4o-2024-05-13,GPT-4o,,false,,2.50,10.00,api_list_price,OpenAI pricing page,2024-08-06
my-org/my-model-7b,My Model 7B,7,true,dense,0.15,0.15,,,
my-org/unpriced,,,,,,,,,
"""

YAML_CARD = """models:
  - model: openai/gpt-4o-2024-05-13
    display_name: GPT-4o
    open_weights: false
    usd_per_1m_input: 2.50
    usd_per_1m_output: 10
    price_rule: api_list_price
    price_source: OpenAI pricing page
    price_as_of: 2024-08-06
  - model: my-org/my-model-7b
    display_name: My Model 7B
    params_b: 7
    open_weights: yes
    architecture: dense
    usd_per_1m_input: 0.15
    usd_per_1m_output: 0.15
  - model: my-org/unpriced
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def prices():
    if not PRICES.is_dir():
        pytest.skip(f"price lists not found at {PRICES}")
    return read_prices(str(PRICES))


# ---------------------------------------------------------------------------- reading cards
def test_csv_and_yaml_cards_read_alike(tmp_path):
    csv = read_card(write(tmp_path, "c.csv", CSV_CARD))
    yml = read_card(write(tmp_path, "c.yaml", YAML_CARD))
    as_list = read_card(write(tmp_path, "l.yml", textwrap.dedent(YAML_CARD.split("\n", 1)[1])))
    assert csv.equals(yml) and yml.equals(as_list)
    gpt, mine, bare = csv.to_dicts()
    assert gpt["usd_per_1m_input"] == 2.5 and gpt["price_rule"] == "api_list_price"
    assert gpt["price_as_of"] == "2024-08-06" and gpt["open_weights"] is False
    # a price without a source is the user's word: rule "card"
    assert mine["price_rule"] == "card" and mine["params_b"] == 7.0 and mine["open_weights"] is True
    assert bare["price_rule"] is None and bare["usd_per_1m_input"] is None  # changes no price


@pytest.mark.parametrize(
    "row, field, words",
    [
        ("my-org/x,-1,0.1,,", "usd_per_1m_input", "negative"),
        ("my-org/x,abc,0.1,,", "usd_per_1m_input", "not a number"),
        ("my-org/x,NaN,0.1,,", "usd_per_1m_input", "not a finite number"),
        ("my-org/x,0.1,inf,,", "usd_per_1m_output", "not a finite number"),
        ("my-org/x,0.1,0.1,0,", "params_b", "not positive"),
        ("my-org/x,0.1,0.1,,Some pricing page", "price_rule", "missing"),
        ("openai/gpt-4o-2024-05-13,1,1,,", "model", "repeats row 1"),
        ("my-org/x,0.5,,,", "usd_per_1m_output", "needs both"),
        ("my-org/x,,0.5,,", "usd_per_1m_input", "needs both"),
    ],
)
def test_a_bad_card_is_refused_naming_file_row_model_and_field(tmp_path, row, field, words):
    text = ("model,usd_per_1m_input,usd_per_1m_output,params_b,price_source\n"
            "openai/gpt-4o-2024-05-13,5,15,,\n" + row + "\n")
    path = write(tmp_path, "model_cards.csv", text)
    with pytest.raises(CardError) as err:
        read_card(path)
    message = str(err.value)
    model = row.split(",")[0]
    assert f"{path}: row 2 (model '{model}'): {field}: " in message and words in message
    assert "row 1" not in message.replace("repeats row 1", "")  # the good row is not blamed


def test_bad_yaml_card_and_unknown_columns_are_refused(tmp_path):
    path = write(tmp_path, "m.yaml", "- model: a\n  usd_per_1m_output: .nan\n- model: b\n  price: 3\n")
    with pytest.raises(CardError) as err:
        read_card(path)
    assert f"{path}: row 1 (model 'a'): usd_per_1m_output: " in str(err.value)
    assert f"{path}: row 2 (model 'b'): price: unknown field" in str(err.value)
    path = write(tmp_path, "m.csv", "model,price\na,3\n")
    with pytest.raises(CardError, match="unknown column.*price"):
        read_card(path)


# ---------------------------------------------------------------------------- pricing rules
def test_build_cards_prices_by_the_rules(prices):
    api, tiers = prices
    facts = pl.concat([load_facts(), pl.DataFrame(
        [{"model": "x/open-size-unknown", "open_weights": True}], schema=load_facts().schema)])
    models = ["openai/gpt-4o-2024-05-13", "meta/llama-2-70b", "mistralai/mixtral-8x7b-v0.1",
              "writer/palmyra-x-v2", "x/open-size-unknown", "x/never-heard-of"]
    cards = {c["model"]: c for c in build_cards(models, api, tiers, facts).to_dicts()}
    gpt = cards["openai/gpt-4o-2024-05-13"]  # api_prices.csv: 5.00 / 15.00, 2024-05
    assert (gpt["usd_per_1m_input"], gpt["usd_per_1m_output"]) == (5.0, 15.0)
    assert (gpt["price_rule"], gpt["price_source"], gpt["price_as_of"]) == (
        "api_list_price", "OpenAI API pricing page", "2024-05")
    llama = cards["meta/llama-2-70b"]  # open, dense 70B: the 41-80B tier, 0.90 in and out
    assert llama["price_rule"] == "open_weights_tier:dense:41-80B"
    assert (llama["usd_per_1m_input"], llama["usd_per_1m_output"]) == (0.9, 0.9)
    mixtral = cards["mistralai/mixtral-8x7b-v0.1"]  # moe by total size 46.7B: 0-56B, 0.60
    assert (mixtral["architecture"], mixtral["params_b"], mixtral["active_params_b"]) == ("moe", 46.7, 12.9)
    assert mixtral["price_rule"] == "open_weights_tier:moe:0-56B" and mixtral["usd_per_1m_input"] == 0.6
    for model, why in [("writer/palmyra-x-v2", "closed model absent from api_prices.csv"),
                       ("x/open-size-unknown", "open weights but size unknown"),
                       ("x/never-heard-of", "not in model_facts.csv")]:
        card = cards[model]
        assert card["usd_per_1m_input"] is None and card["usd_per_1m_output"] is None
        assert card["price_rule"].startswith("unknown: ") and why in card["price_rule"]


def test_shipped_card_is_the_build_of_the_shipped_facts_and_prices(prices):
    """The packaged defaults are up to date (else: rebuild, see transforms/model_cards.py)."""
    built = build_store_cards(str(PRICES))
    assert built.equals(default_cards())
    assert set(ModelNames.default().aliases.values()) <= set(built["model"])


def test_merge_user_cards_over_built_ones_field_by_field(tmp_path):
    built = default_cards()
    user = read_card(write(tmp_path, "c.csv", CSV_CARD))
    store_models = pl.DataFrame(
        {"model": ["openai/gpt-4o-2024-05-13", "meta/llama-2-70b", "store/only"],
         "display_name": ["GPT-4o (store)", "Llama 2 70B", "Store Only"],
         "params_b": [None, 70.0, 3.0]},
    ).with_columns(cost_per_1k_tokens=pl.lit(None, pl.Float64), source=pl.lit("x"))
    cards = {c["model"]: c for c in merge_cards(store_models, built, user).to_dicts()}
    gpt = cards["openai/gpt-4o-2024-05-13"]
    assert (gpt["usd_per_1m_input"], gpt["price_source"], gpt["price_as_of"]) == (
        2.5, "OpenAI pricing page", "2024-08-06")
    assert gpt["display_name"] == "GPT-4o" and gpt["context_window"] == 128000  # kept from built
    assert cards["my-org/my-model-7b"]["price_rule"] == "card"  # a model the store lacks is kept
    assert cards["my-org/unpriced"]["price_rule"] == "unknown: no price in any model card"
    assert cards["meta/llama-2-70b"]["display_name"] == "Llama 2 70B"  # from the store
    assert cards["store/only"]["price_rule"] == "unknown: not in any model card"
    assert cards["store/only"]["params_b"] == 3.0


# ---------------------------------------------------------------------------- in the store
@pytest.fixture(scope="module")
def carded_store(tmp_path_factory):
    """The sample ingested with ``--models`` (the CLI), plus the card it was given."""
    root = tmp_path_factory.mktemp("cards")
    card = write(root, "my_cards.csv", CSV_CARD)
    store = str(root / "store")
    assert cli(["ingest", str(SAMPLE), "--store", store, "--models", card, "--no-progress"]) == 0
    return store, card


def _copy(store: str, tmp_path: Path) -> str:
    dst = tmp_path / "store"
    shutil.copytree(store, dst)
    return str(dst)


def test_ingest_with_a_card_puts_it_in_the_store_with_its_fingerprint(carded_store):
    store, _ = carded_store
    s = Store(store)
    cards = s.read("model_cards")
    models = s.read("models")["model"]
    assert set(models) <= set(cards["model"])
    assert UNIT_KEY in s.units() and len(s.units()[UNIT_KEY]) == 64
    (gpt,) = cards_for(s, ["openai/gpt-4o-2024-05-13"])
    assert gpt["usd_per_1m_input"] == 2.5 and gpt["display_name"] == "GPT-4o"
    llama, unknown = cards_for(s, ["meta/llama-3-70b", "nowhere/model"])
    assert llama["price_rule"] == "open_weights_tier:dense:41-80B"
    assert unknown["price_rule"] == "unknown: not in any model card"


def test_a_changed_price_changes_the_fingerprint_and_the_data_key(carded_store, tmp_path):
    from benchroute.artifacts.specs import Selection
    from benchroute.artifacts.stages.fit import data_key

    store, card = carded_store
    store = _copy(store, tmp_path)
    s = Store(store)
    eid = "all-minilm-l6-v2-384d-0123456789ab"
    key = lambda: data_key(s, eid, Selection(), RouterSpec())  # noqa: E731
    before, fp, n = key(), s.units()[UNIT_KEY], len(s.commits())
    same = sync_cards(store, [], card)  # the same card again: nothing changes, nothing written
    assert not same["changed"] and not same["written"] and len(s.commits()) == n and key() == before
    changed = write(tmp_path, "cheaper.csv", CSV_CARD.replace("2.50,10.00", "2.00,10.00"))
    result = sync_cards(store, [], changed)
    assert result["changed"] and result["written"] and len(s.commits()) == n + 1
    assert s.units()[UNIT_KEY] != fp and key() != before
    assert cards_for(s, ["openai/gpt-4o-2024-05-13"])[0]["usd_per_1m_input"] == 2.0
    assert s.commits()[-1].replace == {"model_cards": s.parts("model_cards")}


def test_landing_card_is_found_and_ranks_between_defaults_and_models(carded_store, tmp_path):
    store, card = carded_store
    store = _copy(store, tmp_path)
    landing = tmp_path / "landing"
    landing.mkdir()
    write(landing, "model_cards.yaml", "- model: openai/gpt-4o-2024-05-13\n  usd_per_1m_input: 1\n"
                                       "  usd_per_1m_output: 4\n- model: meta/llama-3-70b\n"
                                       "  usd_per_1m_input: 0.5\n  usd_per_1m_output: 0.5\n")
    assert discover([str(landing)]) == []  # only a card: no units, and not an unknown layout
    found = find_cards([str(landing)])
    assert found == [str(landing / "model_cards.yaml")]
    sync_cards(store, found, card)
    gpt, llama, mixtral = cards_for(Store(store), ["openai/gpt-4o-2024-05-13", "meta/llama-3-70b",
                                                   "mistralai/mixtral-8x7b-v0.1"])
    assert gpt["usd_per_1m_input"] == 2.5  # --models wins over the landing card
    assert (llama["usd_per_1m_input"], llama["price_rule"]) == (0.5, "card")  # landing over defaults
    assert mixtral["price_rule"] == "open_weights_tier:moe:0-56B"  # defaults
    # a later run that names no card keeps both (recorded in the store)
    again = sync_cards(store, [], None)
    assert not again["changed"] and again["files"] == [*found, card]


def test_a_bad_card_fails_the_ingest_before_anything_is_written(tmp_path):
    bad = write(tmp_path, "bad.csv", "model,usd_per_1m_input\nx,-3\n")
    store = str(tmp_path / "store")
    with pytest.raises(CardError, match=r"bad.csv: row 1 \(model 'x'\): usd_per_1m_input"):
        cli(["ingest", str(SAMPLE / "routellm"), "--store", store, "--models", bad, "--no-progress"])
    assert Store(store).commits() == []


def test_cards_for_a_store_without_a_card_table_uses_the_defaults(tmp_path):
    s = Store(str(tmp_path / "empty"))
    (llama,) = cards_for(s, ["meta/llama-2-70b"])
    assert llama["price_rule"] == "open_weights_tier:dense:41-80B"


def test_cards_build_cli_prices_a_store(carded_store, tmp_path, prices):
    store, _ = carded_store
    out = tmp_path / "built.csv"
    assert cli(["cards", "build", "--store", store, "--prices", str(PRICES), "--out", str(out)]) == 0
    built = read_card(str(out))
    assert set(built["model"]) == set(Store(store).read("models")["model"])
    assert built.filter(pl.col("model") == "openai/gpt-4o-2024-05-13")["usd_per_1m_input"].item() == 5.0


# ---------------------------------------------------------------------------- output lengths
def test_output_lengths_are_outcomes_and_leave_labels_unchanged():
    names = ModelNames()
    outcomes = pl.concat([
        mmlu_pro.read(str(FIXTURES / "mmlu_pro"), names=names).outcomes,
        alpaca_eval.read(str(FIXTURES / "alpaca_eval" / "annotations_long.parquet"), names=names).outcomes,
    ])
    lengths = outcomes.filter(pl.col("metric") == "output_chars")
    assert set(lengths["source"]) == {"mmlu_pro", "alpaca_eval"} and (lengths["value"] >= 0).all()
    with_lengths = bz.binarize(outcomes)
    without = bz.binarize(outcomes.filter(~pl.col("metric").is_in(bz.USAGE_METRICS)))
    assert with_lengths.height == without.height > 0
    assert with_lengths.equals(without)
    assert not set(with_lengths["metric"]) & set(bz.USAGE_METRICS)
    # not even a rule declared for it makes a usage measure the primary metric or range-checks it
    mine = (bz.Rule("output_chars", "threshold", t=500, lo=0, hi=1), *bz.DEFAULT_RULES)
    assert not set(bz.primary_metrics(outcomes, mine)["metric"]) & set(bz.USAGE_METRICS)
    assert bz.binarize(outcomes, mine).equals(without)
    kept, bad = bz.check_ranges(lengths, mine)
    assert kept.height == lengths.height and bad.height == 0


def test_ingested_sample_labels_equal_those_without_usage_metrics(carded_store):
    store, _ = carded_store
    s = Store(store)
    outcomes = s.read("outcomes")
    usage = outcomes.filter(pl.col("metric").is_in(bz.USAGE_METRICS))
    assert set(usage["source"]) >= {"mmlu_pro", "alpaca_eval", "helm"}
    relabelled = bz.binarize(outcomes.filter(~pl.col("metric").is_in(bz.USAGE_METRICS)))
    cols = ["input_id", "dataset", "model"]
    assert s.read("labels").sort(cols).equals(relabelled.sort(cols))
