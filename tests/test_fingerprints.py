"""Fingerprints behind the refresh flow's cache keys and partitions (``transforms.fingerprints``)."""

from __future__ import annotations

import hashlib

import polars as pl

from benchroute.transforms.fingerprints import (
    digest,
    frame_digest,
    group_fingerprint,
    labels_digest,
    partition_ids,
)


def _labels() -> pl.DataFrame:
    return pl.DataFrame({
        "input_id": ["a1", "a1", "b2", "b2", "c3", "c3"],
        "dataset": ["d1", "d1", "d1", "d1", "d2", "d2"],
        "model": ["m1", "m2"] * 3,
        "y": [1, 0, 1, 1, 0, 0],
        "value": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
    })


def test_frame_digest_ignores_row_order_and_sees_every_value():
    df = _labels()
    assert frame_digest(df) == frame_digest(df.reverse()) == frame_digest(df.sample(fraction=1.0, shuffle=True, seed=3))
    changed = df.with_columns(pl.when(pl.int_range(pl.len()) == 4).then(1).otherwise(pl.col("y")).alias("y"))
    assert frame_digest(changed) != frame_digest(df)
    assert frame_digest(df.cast({"y": pl.Int64})) != frame_digest(df.cast({"y": pl.Int32}))  # schema counts
    assert frame_digest(df.head(0)) != frame_digest(df)


def test_group_fingerprint_reads_only_the_groups_data():
    labels = _labels()
    mem = labels.select("input_id", "dataset").unique().with_columns(pl.lit("s").alias("source"))
    models = pl.DataFrame({"model": ["m1", "m2", "other"], "params_b": [7.0, None, 70.0]})
    fp = lambda lab, m=mem, mo=models, p=None: group_fingerprint(  # noqa: E731
        *labels_digest([lab]), m, mo, datasets=["d1", "d2"], model_names=["m1", "m2"], params=p or {"k": 10})
    base = fp(labels)
    # another model's size, another input's membership: not read by this group
    assert fp(labels, mo=models.with_columns(pl.when(pl.col("model") == "other").then(8.0)
                                               .otherwise(pl.col("params_b")).alias("params_b"))) == base
    assert fp(labels, m=pl.concat([mem, pl.DataFrame({"input_id": ["zz"], "dataset": ["d9"], "source": ["t"]})])) == base
    # its own inputs' memberships, sizes, labels and the parameters are
    assert fp(labels, m=pl.concat([mem, pl.DataFrame({"input_id": ["a1"], "dataset": ["d9"], "source": ["t"]})])) != base
    assert fp(labels, mo=models.with_columns(pl.lit(1.0).alias("params_b"))) != base
    assert fp(labels.with_columns(pl.col("y").reverse())) != base
    assert fp(labels, p={"k": 5}) != base


def test_labels_digest_streams_batches_as_a_set_of_row_sets():
    labels = _labels()
    one, ids = labels_digest([labels.head(4), labels.tail(2)])
    assert sorted(ids.to_list()) == ["a1", "b2", "c3"]
    # batches in any order, rows in any order within one, empty batches and other columns: equal
    assert labels_digest([labels.tail(2).reverse(), labels.head(0), labels.head(4)])[0] == one
    assert labels_digest([labels.head(4).with_columns(metric=pl.lit("em")), labels.tail(2)])[0] == one
    # a changed value, a dropped row, the rows cut into other batches: not equal
    assert labels_digest([labels.head(4), labels.tail(2).with_columns(value=pl.lit(0.5))])[0] != one
    assert labels_digest([labels.head(4), labels.tail(1)])[0] != one
    assert labels_digest([labels.head(3), labels.tail(3)])[0] != one
    assert labels_digest([])[0] != one


def test_partitions_are_stable_complete_and_disjoint():
    ids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(1500)] + ["not-hex-id"]
    parts = partition_ids(ids, 4)
    assert sorted(i for p in parts for i in p) == sorted(ids)
    assert len(parts) == 4 and min(map(len, parts)) > len(ids) / 8
    # an id lands in the same partition whatever else is pending
    again = partition_ids(ids[::3], 4)
    where = {i: n for n, p in enumerate(parts) for i in p}
    for p in again:
        assert len({where[i] for i in p}) == 1
    assert partition_ids([], 3) == []


def test_digest_is_order_insensitive_for_dicts_only():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest([1, 2]) != digest([2, 1])

