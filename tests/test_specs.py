"""The typed specs (artifacts/specs.py): frozen, validated, keyed whole."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from benchroute.artifacts.specs import PREDICTOR_NAMES, EmbedSpec, RouterSpec, Selection
from benchroute.transforms.predictors import PREDICTORS


def test_specs_are_frozen_and_refuse_unknown_fields():
    r = RouterSpec()
    with pytest.raises(ValidationError):
        r.k = 5
    with pytest.raises(ValidationError):
        RouterSpec(kk=5)
    with pytest.raises(ValidationError):
        RouterSpec.model_validate({**r.to_dict(), "extra": 1})  # a manifest's spec, tampered


@pytest.mark.parametrize("bad", [{"k": 0}, {"weights": "cosine"}, {"predictor": "nope"},
                                 {"index_dtype": "int8"}, {"index_search": "ivf"}, {"stability_B": -1},
                                 {"pairs": ["a"]}, {"pairs": ["a,a"]}, {"pairs": ["a,b,c"]}])
def test_router_spec_refuses_bad_values(bad):
    with pytest.raises(ValidationError):
        RouterSpec(**bad)


def test_pairs_and_names_normalise():
    r = RouterSpec(pairs=["openai/gpt-4 , mistral/7b", ("x", "y")], pair_models="m")
    assert r.pairs == (("openai/gpt-4", "mistral/7b"), ("x", "y")) and r.pair_models == ("m",)
    assert Selection(sources=[], models="a/*") == Selection(models=("a/*",))
    assert Selection().is_all and not Selection(exclude_models=["x"]).is_all
    with pytest.raises(ValidationError):
        Selection(sources=["not-a-reader"])
    with pytest.raises(ValidationError):
        EmbedSpec(batch_size=0)


def test_keys_follow_every_field_and_the_kind():
    base = RouterSpec()
    assert base.key == RouterSpec().key
    for change in ({"k": 11}, {"weights": "distance"}, {"pairs": ["a,b"]}, {"stability_B": 0},
                   {"index_search": "hnsw"}, {"pair_models": ["m"]}):
        assert RouterSpec(**change).key != base.key, change
    assert Selection().key != EmbedSpec().key
    assert RouterSpec.model_validate(base.to_dict()) == base  # the JSON form round-trips


def test_predictor_choices_are_the_registry():
    assert set(PREDICTOR_NAMES) == set(PREDICTORS)
