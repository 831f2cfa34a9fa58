"""Deployments: the scheduled refresh and the manual backfill, as ``prefect.serve`` serves them."""

from __future__ import annotations

from benchroute.artifacts.specs import EmbedSpec, RouterSpec
from benchroute.flows.deploy import DEFAULT_CRON, deployments


def test_deployments_schedule_the_refresh_and_offer_the_backfill(tmp_path):
    refresh, backfill = deployments(str(tmp_path / "landing"), str(tmp_path / "store"))
    assert (refresh.flow_name, refresh.name) == ("refresh", "scheduled")
    assert [s.schedule.cron for s in refresh.schedules] == [DEFAULT_CRON] == ["0 * * * *"]
    assert refresh.parameters["landing"].endswith("landing") and refresh.parameters["store"].endswith("store")
    assert refresh.concurrency_limit == 1 and refresh.parameters["incremental"] is False
    assert (backfill.flow_name, backfill.name) == ("backfill", "manual")
    assert not backfill.schedules and backfill.parameters["paths"] == [str(tmp_path / "landing")]
    # the parameter schemas carry the flows' types (the UI validates runs against them)
    # and the specs whole, field by field
    schema = refresh._parameter_openapi_schema
    assert schema.properties["embed"]["$ref"] == "#/definitions/EmbedSpec"
    assert schema.properties["router"]["$ref"] == "#/definitions/RouterSpec"
    embed, router = (schema.definitions[d]["properties"] for d in ("EmbedSpec", "RouterSpec"))
    assert embed["precision"]["enum"] == ["auto", "bf16", "fp32"] and router["k"]["minimum"] == 1
    assert set(router) == set(RouterSpec.model_fields) and set(embed) == set(EmbedSpec.model_fields)


def test_deployments_on_dask(tmp_path):
    refresh, _ = deployments("s3://bucket/landing", "s3://bucket/store", cron="*/15 * * * *", workers=2,
                             incremental=True)
    assert [s.schedule.cron for s in refresh.schedules] == ["*/15 * * * *"]
    assert refresh.parameters["incremental"] is True
    assert refresh.parameters["embed_concurrency"] == 2
