"""The model cards of a store: table ``model_cards``, one card per model, with its fingerprint.
(Reading them: ``transforms.model_cards.cards_for``, also importable from here.)

The card is made from, in increasing precedence: the cards shipped with benchroute
(``transforms/model_cards.csv``), the card files found in the landing zone
(``model_cards.csv|yaml|yml``) and the card given with ``--models``. ``sync_cards`` writes it
with ``replace`` in one commit that records its content fingerprint as the unit
``model_cards``, so a changed price changes the store's data key (a refit and a new bundle
version) and an unchanged card writes nothing. The card files used are recorded in that commit
and used again by later runs while they exist, so a run that names no card keeps them.
"""

from __future__ import annotations

import os

import polars as pl
from benchroute.artifacts.store import Store
from benchroute.transforms.model_cards import (  # noqa: F401 - cards_for, store_cards: here too
    build_cards,
    card_fingerprint,
    cards_for,
    default_cards,
    load_facts,
    merge_cards,
    read_card,
    read_prices,
    rule_counts,
    store_cards,
)
from fsspec.core import url_to_fs

UNIT_KEY = "model_cards"
TABLE = "model_cards"


def sync_cards(store_url: str, found: list[str], models: str | None = None, *,
               write: bool = True) -> dict:
    """Make the store's card from the defaults, the landing-zone card files ``found`` (and those
    an earlier run recorded, while they exist) and the ``models`` card (else the one recorded),
    and commit it if its content or its files changed.

    Raises ``CardError`` for a bad card (nothing is written). ``write=False`` only reports.
    Returns ``changed`` (the content), ``written``, the fingerprint, the card files and counts.
    """
    store = Store(store_url)
    last = _last_card_info(store)
    landing = sorted({_absolute(u) for u in found}
                     | {u for u in last.get("landing", []) if _exists(u)})
    user = _absolute(models) if models else last.get("models")
    if user and not models and not _exists(user):
        user = None
    files = landing + ([user] if user else [])
    cards = merge_cards(store.read("models"), default_cards(), *(read_card(u) for u in files))
    fingerprint = card_fingerprint(cards)
    changed = store.units().get(UNIT_KEY) != fingerprint
    files_changed = (landing, user) != (last.get("landing", []), last.get("models"))
    written = write and (changed or files_changed) and bool(store.parts("models"))
    if written:
        from benchroute import code_version

        store.commit(
            replace={TABLE: cards},
            units={UNIT_KEY: fingerprint},
            info={"kind": "model_cards", "landing": landing, "models": user,
                  "code_version": code_version()},
        )
    return {
        "changed": changed,
        "files_changed": files_changed,
        "written": written,
        "fingerprint": fingerprint,
        "files": files,
        "models": cards.height,
        "rules": rule_counts(cards.with_columns(pl.col("price_rule").str.extract(r"^([a-z_]+)"))),
    }


def _last_card_info(store: Store) -> dict:
    for c in reversed(store.commits()):
        if TABLE in c.replace:
            return c.info
    return {}


def _absolute(url: str) -> str:
    """A local path made absolute (a later run may start elsewhere); URLs as given."""
    return url if "://" in str(url) else os.path.abspath(url)


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def build_store_cards(prices: str, store_url: str | None = None,
                      facts: str | None = None) -> pl.DataFrame:
    """Cards priced from a prices folder (``api_prices.csv``, ``open_weights_tiers.csv``) for
    every model of a store (display names and sizes from its ``models`` table), or, without a
    store, for every model of the facts and of ``api_prices.csv`` (the shipped defaults).
    ``facts``: a facts CSV whose rows replace the shipped ``model_facts.csv``'s."""
    api, tiers = read_prices(prices)
    known = load_facts(facts)
    if store_url:
        store_models = Store(store_url).read("models")
        return merge_cards(store_models, build_cards(store_models["model"], api, tiers, known))
    models = sorted(set(known["model"]) | set(api["model"]))
    return build_cards(models, api, tiers, known)
