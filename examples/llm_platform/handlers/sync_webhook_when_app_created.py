"""Keep an app's webhook rows in step with the trigger-webhook nodes of its workflow.

Each webhook node gets a row with a unique webhook id (the public URL's path), kept for as
long as the node exists. A draft sync keeps stale rows; a publish removes them.
"""

from __future__ import annotations

import logging
import secrets
import string

from sqlalchemy import select

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import TRIGGER_WEBHOOK, nodes
from ..models import WorkflowWebhookTrigger
from ._common import Handler
from ._workflow import WorkflowEvent, load_workflow

logger = logging.getLogger(__name__)


def generate_webhook_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


class SyncWebhookWhenAppCreated(Handler):
    async def __call__(self, event: WorkflowEvent) -> None:
        if event.mode != "workflow":
            return
        async with self.deps.sessions.begin() as session:
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            wanted = {node.id for node in nodes(workflow.graph, TRIGGER_WEBHOOK)}
            query = select(WorkflowWebhookTrigger).where(
                WorkflowWebhookTrigger.app_id == event.app_id
            )
            rows = {row.node_id: row for row in await session.scalars(query)}
            new = sorted(wanted - rows.keys())
            session.add_all(
                WorkflowWebhookTrigger(
                    tenant_id=event.tenant_id,
                    app_id=event.app_id,
                    node_id=node_id,
                    webhook_id=generate_webhook_id(),
                )
                for node_id in new
            )
            prune = isinstance(event, AppPublishedWorkflowWasUpdated)
            stale = [row for node_id, row in rows.items() if node_id not in wanted] if prune else []
            for row in stale:
                await session.delete(row)
        logger.info("webhooks of app %s: %d added, %d removed", event.app_id, len(new), len(stale))
