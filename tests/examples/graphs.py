"""Workflow graphs and model configs for the tests, in the original's JSON shape."""

from __future__ import annotations

from typing import Any


def node(node_id: str, node_type: str, title: str = "", **data: Any) -> dict[str, Any]:
    return {"id": node_id, "data": {"type": node_type, "title": title or node_id, **data}}


def graph(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": [node("start", "start"), *nodes], "edges": []}


def tool(node_id: str) -> dict[str, Any]:
    return node(node_id, "tool", provider_id="time", provider_type="builtin", tool_name="now")


def plugin_trigger(
    node_id: str, title: str = "", event_name: str = "issue.opened"
) -> dict[str, Any]:
    return node(
        node_id,
        "trigger-plugin",
        title,
        provider_id="github",
        event_name=event_name,
        subscription_id="sub-1",
    )


def webhook(node_id: str, title: str = "") -> dict[str, Any]:
    return node(node_id, "trigger-webhook", title)


def schedule(node_id: str = "schedule", **data: Any) -> dict[str, Any]:
    return node(node_id, "trigger-schedule", **data)


def knowledge(node_id: str, *dataset_ids: str) -> dict[str, Any]:
    return node(node_id, "knowledge-retrieval", dataset_ids=list(dataset_ids))


def model_config(*, tools: tuple[str, ...] = (), datasets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for `AppService.update_model_config` naming these dataset ids."""
    agent_tools: list[dict[str, Any]] = [{"dataset": {"enabled": True, "id": id}} for id in tools]
    agent_tools.append({"builtin": {"provider": "time"}})  # not a dataset: ignored
    return {
        "provider": "openai",
        "model_id": "gpt-4o-mini",
        "agent_mode": {"enabled": True, "tools": agent_tools},
        "dataset_configs": {
            "datasets": {"datasets": [{"dataset": {"enabled": True, "id": id}} for id in datasets]}
        },
    }
