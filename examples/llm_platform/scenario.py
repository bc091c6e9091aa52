"""The demo's scripted scenario: every publisher, so every handler, runs at least once."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .handlers.delete_tool_parameters_cache_when_sync_draft_workflow import (
    tool_parameters_cache_key,
)
from .services import Services
from .uow import Done

Step = Callable[[str, Awaitable[Done[Any]]], Awaitable[Any]]

HANDBOOK = (
    "Refunds are granted within 30 days of purchase.\n\n"
    "Support answers within one working day, in English and German."
)
FAQ = "Q: Can I export my data? A: Yes, as JSON, from the settings page."


def workflow_graph(dataset_ids: list[str]) -> dict[str, Any]:
    """A workflow with a tool, a plugin trigger, a webhook, a schedule and knowledge retrieval."""
    weekly = {"time": "7:30 AM", "weekdays": ["mon", "thu"]}
    plugin = {
        "provider_id": "langgenius/github",
        "event_name": "issues.opened",
        "subscription_id": "s1",
    }
    schedule = {
        "mode": "visual",
        "frequency": "weekly",
        "visual_config": weekly,
        "timezone": "Europe/Berlin",
    }
    return {
        "nodes": [
            _node("on_issue", "trigger-plugin", "New GitHub issue", **plugin),
            _node("on_call", "trigger-webhook", "Incoming call"),
            _node("weekly", "trigger-schedule", "Twice a week", **schedule),
            _node("clock", "tool", "Current time", provider_id="time", tool_name="current_time"),
            _node("lookup", "knowledge-retrieval", "Search the handbook", dataset_ids=dataset_ids),
        ],
        "edges": [],
    }


def _node(node_id: str, node_type: str, title: str, **data: Any) -> dict[str, Any]:
    return {"id": node_id, "data": {"type": node_type, "title": title, **data}}


async def run_scenario(
    services: Services, step: Step, cache_set: Callable[[str, str], Awaitable[None]]
) -> None:
    """Drive the services through ``step(title, call)``, which runs and reports each call."""
    tenant = await step("create a tenant", services.tenants.create_tenant("Acme"))
    email = (
        f"ann+{uuid.uuid4().hex[:8]}@acme.test"  # unique: the demo can run again on one database
    )
    account = await step(
        "create an account", services.tenants.create_account(tenant.id, "Ann", email, "de-DE")
    )
    chat = await step(
        "create a chat app", services.apps.create_app(tenant.id, account.id, "Support bot", "chat")
    )
    flow = await step(
        "create a workflow app",
        services.apps.create_app(tenant.id, account.id, "Triage", "workflow"),
    )
    handbook = await step(
        "create a dataset", services.datasets.create_dataset(tenant.id, account.id, "Handbook")
    )
    faq = await step(
        "create a dataset", services.datasets.create_dataset(tenant.id, account.id, "FAQ")
    )
    files = [
        await step(
            "upload a file", services.documents.upload_file(tenant.id, "handbook.txt", HANDBOOK)
        ),
        await step("upload a file", services.documents.upload_file(tenant.id, "faq.txt", FAQ)),
        await step("upload a file", services.documents.upload_file(tenant.id, "empty.txt", "")),
        await step("upload a file", services.documents.upload_file(tenant.id, "faq-copy.txt", FAQ)),
    ]
    documents = await step(
        "add and index documents",
        services.documents.create_documents(handbook.id, [file.id for file in files[:3]]),
    )
    await step(
        "add and index a document", services.documents.create_documents(faq.id, [files[3].id])
    )
    config = _model_config(handbook.id, faq.id)
    await step(
        "update the model config with two datasets",
        services.apps.update_model_config(chat.id, **config),
    )
    await cache_set(
        tool_parameters_cache_key(flow.id, "clock"), '{"format": "%H:%M"}'
    )  # a cached run
    graph = workflow_graph([handbook.id])
    await step("sync the draft workflow", services.workflows.sync_draft(flow.id, graph))
    await step("publish the workflow", services.workflows.publish(flow.id))
    message = await step(
        "send a message", services.messages.send_message(chat.id, account.id, "Refund policy?")
    )
    await step(
        "send a follow-up",
        services.messages.send_message(
            chat.id, account.id, "In German?", conversation_id=message.conversation_id
        ),
    )
    await step("rename the tenant", services.tenants.update_tenant(tenant.id, "Acme Inc."))
    await step("delete a document", services.documents.delete_document(documents[0].id))
    await step("delete a dataset", services.datasets.delete_dataset(faq.id))


def _model_config(*dataset_ids: str) -> dict[str, Any]:
    first, *rest = dataset_ids
    return {
        "provider": "openai",
        "model_id": "gpt-4o-mini",
        "agent_mode": {"enabled": True, "tools": [{"dataset": {"enabled": True, "id": first}}]},
        "dataset_configs": {
            "datasets": {"datasets": [{"dataset": {"enabled": True, "id": id}} for id in rest]}
        },
    }
