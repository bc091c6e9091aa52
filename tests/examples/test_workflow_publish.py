"""Handlers of app-published-workflow-was-updated: schedule, app triggers, dataset joins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import inspect

from aioevents.testing import capture
from examples.llm_platform.events import AppPublishedWorkflowWasUpdated
from examples.llm_platform.models import App, AppDatasetJoin, AppTrigger, WorkflowSchedulePlan

from .conftest import Harness
from .graphs import graph, knowledge, plugin_trigger, schedule, webhook

pytestmark = pytest.mark.asyncio

DAILY: dict[str, Any] = {
    "mode": "visual",
    "frequency": "daily",
    "visual_config": {"time": "9:15 AM"},
    "timezone": "Europe/Paris",
}


async def publish(
    harness: Harness, app: App, *nodes: dict[str, Any]
) -> AppPublishedWorkflowWasUpdated:
    await harness.services.workflows.sync_draft(app.id, graph(*nodes))
    with capture(harness.bus) as events:
        done = await harness.services.workflows.publish(app.id)
    assert done.ok, done.reports
    return events.assert_emitted(AppPublishedWorkflowWasUpdated)


async def workflow_app(harness: Harness, mode: str = "workflow") -> App:
    done = await harness.services.apps.create_app(
        harness.tenant_id, harness.account_id, "Flow", mode
    )
    return done.value


def in_utc(moment: datetime | None) -> datetime:
    """A stored time as aware UTC: SQLite gives back the UTC wall time without its zone."""
    assert moment is not None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def test_publishing_a_schedule_creates_then_updates_the_plan(harness: Harness) -> None:
    app = await workflow_app(harness)

    await publish(harness, app, schedule(**DAILY))
    [plan] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    assert (plan.node_id, plan.cron_expression, plan.timezone) == (
        "schedule",
        "15 9 * * *",
        "Europe/Paris",
    )

    await publish(harness, app, schedule("s2", mode="cron", cron_expression="*/5 * * * 1-5"))
    [plan] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    assert (plan.node_id, plan.cron_expression, plan.timezone) == ("s2", "*/5 * * * 1-5", "UTC")


async def test_a_plans_next_run_is_computed_on_create_and_on_update_in_place(
    harness: Harness,
) -> None:
    app = await workflow_app(harness)
    before = datetime.now(UTC)

    await publish(harness, app, schedule(**DAILY))

    [plan] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    created = in_utc(plan.next_run_at)
    paris = created.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute) == (9, 15)
    assert before < created <= before + timedelta(days=1)

    weekdays = schedule(mode="cron", cron_expression="*/5 * * * 1-5", timezone="Asia/Tokyo")
    await publish(harness, app, weekdays)

    [updated] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    tokyo = in_utc(updated.next_run_at).astimezone(ZoneInfo("Asia/Tokyo"))
    assert updated.id == plan.id  # updated in place
    assert tokyo.minute % 5 == 0 and tokyo.weekday() < 5
    assert before < tokyo <= datetime.now(UTC) + timedelta(days=3)


async def test_the_next_run_at_column_is_indexed(harness: Harness) -> None:
    def indexed_columns(connection: Any) -> list[list[str]]:
        indexes = inspect(connection).get_indexes(WorkflowSchedulePlan.__tablename__)
        return [index["column_names"] for index in indexes]

    async with harness.platform.engine.connect() as connection:
        assert ["next_run_at"] in await connection.run_sync(indexed_columns)


async def test_an_hourly_schedule_without_a_minute_runs_on_the_hour(harness: Harness) -> None:
    app = await workflow_app(harness)

    await publish(harness, app, schedule(mode="visual", frequency="hourly", visual_config={}))

    [plan] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    assert plan.cron_expression == "0 * * * *"
    assert in_utc(plan.next_run_at).minute == 0


async def test_a_monthly_schedule_on_the_last_day_uses_cron_L(harness: Harness) -> None:
    app = await workflow_app(harness)
    monthly = {"time": "11:45 PM", "monthly_days": ["last", 15]}

    await publish(harness, app, schedule(mode="visual", frequency="monthly", visual_config=monthly))

    [plan] = await harness.rows(WorkflowSchedulePlan, app_id=app.id)
    assert plan.cron_expression == "45 23 15,L * *"


@pytest.mark.parametrize(
    "nodes",
    [
        (),
        (schedule(mode="cron", cron_expression="every day"),),
        (schedule(mode="cron", cron_expression="0 6 * * *", timezone="Mars/Olympus_Mons"),),
    ],
    ids=["no schedule node", "invalid cron", "unknown time zone"],
)
async def test_no_valid_schedule_deletes_the_plan_with_a_warning(
    harness: Harness, nodes: tuple[dict[str, Any], ...], caplog: pytest.LogCaptureFixture
) -> None:
    app = await workflow_app(harness)
    await publish(harness, app, schedule(**DAILY))

    await publish(harness, app, *nodes)

    assert await harness.rows(WorkflowSchedulePlan, app_id=app.id) == []
    assert f"app {app.id} has no valid schedule; its plan is deleted" in caplog.messages


async def test_app_triggers_follow_the_published_trigger_nodes(harness: Harness) -> None:
    app = await workflow_app(harness)
    await publish(
        harness,
        app,
        plugin_trigger("p1", "On issue"),
        webhook("w1", "Hook"),
        schedule("s1", **DAILY),
    )
    [webhook_row] = await harness.rows(AppTrigger, app_id=app.id, node_id="w1")

    await publish(
        harness,
        app,
        plugin_trigger("p1", "On new issue"),
        webhook("w1", "Hook"),
        webhook("w2", "Hook 2"),
    )

    rows = {row.node_id: row for row in await harness.rows(AppTrigger, app_id=app.id)}
    assert {
        node_id: (row.trigger_type, row.title, row.status) for node_id, row in rows.items()
    } == {
        "p1": ("trigger-plugin", "On new issue", "disabled"),
        "w1": ("trigger-webhook", "Hook", "disabled"),
        "w2": ("trigger-webhook", "Hook 2", "disabled"),
    }
    assert rows["w1"].id == webhook_row.id  # kept, not replaced


async def test_an_advanced_chat_app_has_no_trigger_rows(harness: Harness) -> None:
    # As the original: only a workflow-mode app is started by triggers.
    app = await workflow_app(harness, mode="advanced-chat")

    await publish(harness, app, plugin_trigger("p1"), webhook("w1"), schedule("s1", **DAILY))

    assert await harness.rows(AppTrigger, app_id=app.id) == []


async def test_dataset_joins_follow_the_knowledge_retrieval_nodes(harness: Harness) -> None:
    app = await workflow_app(harness)
    await publish(harness, app, knowledge("k1", "d1", "d2"), knowledge("k2", "d2", "d3"))
    assert {row.dataset_id for row in await harness.rows(AppDatasetJoin, app_id=app.id)} == {
        "d1",
        "d2",
        "d3",
    }

    await publish(harness, app, knowledge("k1", "d3", "d4"))

    assert {row.dataset_id for row in await harness.rows(AppDatasetJoin, app_id=app.id)} == {
        "d3",
        "d4",
    }


async def test_publish_handlers_are_idempotent(harness: Harness) -> None:
    app = await workflow_app(harness)
    event = await publish(
        harness, app, plugin_trigger("p1"), webhook("w1"), schedule(**DAILY), knowledge("k1", "d1")
    )

    changes = await harness.emit_again(event)

    assert changes == {
        "SyncPluginTriggerWhenAppCreated": {},
        "SyncWebhookWhenAppCreated": {},
        "SyncWorkflowScheduleWhenAppPublished": {},
        "UpdateAppTriggersWhenAppPublishedWorkflowUpdated": {},
        "UpdateAppDatasetJoinWhenAppPublishedWorkflowUpdated": {},
    }


async def test_empty_and_malformed_knowledge_dataset_ids_are_ignored(harness: Harness) -> None:
    app = await workflow_app(harness)
    node = knowledge("k1", "d1")
    node["data"]["dataset_ids"] += ["", " ", None, 7, "x" * 37]

    await publish(harness, app, node, knowledge("k2", "d2"))

    assert {row.dataset_id for row in await harness.rows(AppDatasetJoin, app_id=app.id)} == {
        "d1",
        "d2",
    }
