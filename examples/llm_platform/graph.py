"""Reading a workflow graph: the nodes handlers care about, in the original's JSON shape.

A graph is ``{"nodes": [{"id": ..., "data": {"type": ..., "title": ..., ...}}], "edges": []}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import valid_id

TRIGGER_PLUGIN = "trigger-plugin"
TRIGGER_WEBHOOK = "trigger-webhook"
TRIGGER_SCHEDULE = "trigger-schedule"
TRIGGER_TYPES = frozenset({TRIGGER_PLUGIN, TRIGGER_WEBHOOK, TRIGGER_SCHEDULE})
TOOL = "tool"
KNOWLEDGE_RETRIEVAL = "knowledge-retrieval"


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    type: str
    title: str
    data: Mapping[str, Any]


def nodes(graph: Mapping[str, Any], *types: str) -> list[Node]:
    """The graph's nodes of the given types (all nodes if none given); malformed ones skipped."""
    found = []
    for raw in graph.get("nodes") or ():
        node = _node(raw)
        if node is not None and (not types or node.type in types):
            found.append(node)
    return found


def _node(raw: object) -> Node | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
        return None
    data = raw.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        return None
    return Node(raw["id"], data["type"], str(data.get("title") or ""), data)


def knowledge_dataset_ids(graph: Mapping[str, Any]) -> set[str]:
    """The dataset ids of the graph's knowledge-retrieval nodes; empty or malformed ids and
    a ``dataset_ids`` that is not a list are skipped."""
    ids: set[str] = set()
    for node in nodes(graph, KNOWLEDGE_RETRIEVAL):
        listed = node.data.get("dataset_ids")
        for dataset_id in listed if isinstance(listed, list) else ():
            if valid_id(dataset_id) is not None:
                ids.add(dataset_id)
    return ids
