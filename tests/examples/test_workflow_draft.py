"""Handlers of app-draft-workflow-was-synced: tool caches, plugin triggers, webhooks."""

from __future__ import annotations

from typing import Any

import pytest

from aioevents.testing import capture
from examples.llm_platform.events import AppDraftWorkflowWasSynced
from examples.llm_platform.handlers.delete_tool_parameters_cache_when_sync_draft_workflow import (
    tool_parameters_cache_key,
)
from examples.llm_platform.models import App, WorkflowPluginTrigger, WorkflowWebhookTrigger

from .conftest import Harness
from .graphs import graph, plugin_trigger, tool, webhook

pytestmark = pytest.mark.asyncio


async def workflow_app(harness: Harness, mode: str = "workflow") -> App:
    done = await harness.services.apps.create_app(
        harness.tenant_id, harness.account_id, "Flow", mode
    )
    return done.value


async def sync(harness: Harness, app: App, *nodes: dict[str, Any]) -> AppDraftWorkflowWasSynced:
    with capture(harness.bus) as events:
        done = await harness.services.workflows.sync_draft(app.id, graph(*nodes))
    assert done.ok, done.reports
    return events.assert_emitted(AppDraftWorkflowWasSynced)


async def test_syncing_a_draft_deletes_its_tools_cached_parameters(harness: Harness) -> None:
    app = await workflow_app(harness)
    for node_id in ("t1", "t2", "elsewhere"):
        await harness.cache.set(tool_parameters_cache_key(app.id, node_id), "{}")

    await sync(harness, app, tool("t1"), tool("t2"))

    assert await harness.cache.get(tool_parameters_cache_key(app.id, "t1")) is None
    assert await harness.cache.get(tool_parameters_cache_key(app.id, "t2")) is None
    assert await harness.cache.get(tool_parameters_cache_key(app.id, "elsewhere")) == "{}"
    [run] = [
        run
        for run in harness.recorder.runs
        if run.handler.endswith("ToolParametersCacheWhenSyncDraftWorkflow")
    ]
    assert run.changes == {"cache keys deleted": 2}


async def test_a_draft_sync_adds_and_updates_trigger_rows_and_keeps_stale_ones(
    harness: Harness,
) -> None:
    app = await workflow_app(harness)
    await sync(
        harness, app, plugin_trigger("p1"), plugin_trigger("p2"), webhook("w1"), webhook("w2")
    )
    [w1_before, _] = await harness.rows(WorkflowWebhookTrigger, app_id=app.id)

    await sync(harness, app, plugin_trigger("p1", event_name="issue.closed"), webhook("w1"))

    plugins = {
        row.node_id: row.event_name
        for row in await harness.rows(WorkflowPluginTrigger, app_id=app.id)
    }
    assert plugins == {"p1": "issue.closed", "p2": "issue.opened"}
    webhooks = {
        row.node_id: row.webhook_id
        for row in await harness.rows(WorkflowWebhookTrigger, app_id=app.id)
    }
    assert webhooks.keys() == {"w1", "w2"}
    assert webhooks["w1"] == w1_before.webhook_id and len(webhooks["w1"]) == 24


async def test_publishing_removes_stale_trigger_rows(harness: Harness) -> None:
    app = await workflow_app(harness)
    await sync(
        harness, app, plugin_trigger("p1"), plugin_trigger("p2"), webhook("w1"), webhook("w2")
    )
    await sync(harness, app, plugin_trigger("p1"), webhook("w2"))

    done = await harness.services.workflows.publish(app.id)

    assert done.ok
    assert [row.node_id for row in await harness.rows(WorkflowPluginTrigger, app_id=app.id)] == [
        "p1"
    ]
    assert [row.node_id for row in await harness.rows(WorkflowWebhookTrigger, app_id=app.id)] == [
        "w2"
    ]


async def test_trigger_rows_are_for_workflow_apps_only(harness: Harness) -> None:
    app = await workflow_app(harness, mode="advanced-chat")

    await sync(harness, app, plugin_trigger("p1"), webhook("w1"))

    assert await harness.rows(WorkflowPluginTrigger, app_id=app.id) == []
    assert await harness.rows(WorkflowWebhookTrigger, app_id=app.id) == []


async def test_draft_sync_handlers_are_idempotent(harness: Harness) -> None:
    app = await workflow_app(harness)
    event = await sync(harness, app, tool("t1"), plugin_trigger("p1"), webhook("w1"))
    before = [row.webhook_id for row in await harness.rows(WorkflowWebhookTrigger, app_id=app.id)]

    changes = await harness.emit_again(event)

    assert changes == {
        "DeleteToolParametersCacheWhenSyncDraftWorkflow": {},
        "SyncPluginTriggerWhenAppCreated": {},
        "SyncWebhookWhenAppCreated": {},
    }
    assert [
        row.webhook_id for row in await harness.rows(WorkflowWebhookTrigger, app_id=app.id)
    ] == before
