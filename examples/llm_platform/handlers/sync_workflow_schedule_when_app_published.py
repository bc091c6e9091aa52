"""The schedule plan of a published workflow: from its schedule node, or none."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import TRIGGER_SCHEDULE, nodes
from ..models import WorkflowSchedulePlan
from ..schedule import cron_expression
from ._common import Handler, assign
from ._workflow import load_workflow

logger = logging.getLogger(__name__)


class SyncWorkflowScheduleWhenAppPublished(Handler):
    async def __call__(self, event: AppPublishedWorkflowWasUpdated) -> None:
        if event.mode != "workflow":
            return
        async with self.deps.sessions.begin() as session:
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            schedule = next(iter(nodes(workflow.graph, TRIGGER_SCHEDULE)), None)
            cron = None if schedule is None else cron_expression(schedule.data)
            if schedule is None or cron is None:
                logger.warning("app %s has no valid schedule; its plan is deleted", event.app_id)
                plans = delete(WorkflowSchedulePlan).where(
                    WorkflowSchedulePlan.app_id == event.app_id
                )
                await session.execute(plans)
                return
            values = {
                "node_id": schedule.id,
                "cron_expression": cron,
                "timezone": str(schedule.data.get("timezone") or "UTC"),
            }
            query = select(WorkflowSchedulePlan).where(WorkflowSchedulePlan.app_id == event.app_id)
            plan = await session.scalar(query)
            if plan is None:
                session.add(
                    WorkflowSchedulePlan(tenant_id=event.tenant_id, app_id=event.app_id, **values)
                )
                logger.info("app %s scheduled at %r", event.app_id, cron)
            elif assign(plan, values):
                logger.info("app %s rescheduled at %r", event.app_id, cron)
