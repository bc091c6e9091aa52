"""The schedule plan of a published workflow: from its schedule node, or none.

The plan's ``next_run_at`` is computed when it is created, and again when an update changes
its cron expression or time zone; a publish that leaves both as they were leaves it alone,
so republishing never moves (or skips) a run that is due.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import TRIGGER_SCHEDULE, Node, nodes
from ..models import WorkflowSchedulePlan, utcnow
from ..schedule import cron_expression, next_run_at, time_zone
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
            values = None if schedule is None else _plan_values(schedule)
            if values is None:
                logger.warning("app %s has no valid schedule; its plan is deleted", event.app_id)
                plans = delete(WorkflowSchedulePlan).where(
                    WorkflowSchedulePlan.app_id == event.app_id
                )
                await session.execute(plans)
                return
            await _save_plan(session, event, values)


def _plan_values(schedule: Node) -> dict[str, Any] | None:
    """The plan's columns but ``next_run_at``, or None if the node is not a valid schedule."""
    cron, zone = cron_expression(schedule.data), time_zone(schedule.data)
    if cron is None or zone is None:
        return None
    return {"node_id": schedule.id, "cron_expression": cron, "timezone": zone}


async def _save_plan(
    session: AsyncSession, event: AppPublishedWorkflowWasUpdated, values: dict[str, Any]
) -> None:
    cron, zone = values["cron_expression"], values["timezone"]
    query = select(WorkflowSchedulePlan).where(WorkflowSchedulePlan.app_id == event.app_id)
    plan = await session.scalar(query)
    if plan is None:
        next_run = next_run_at(cron, zone, utcnow())
        session.add(
            WorkflowSchedulePlan(
                tenant_id=event.tenant_id, app_id=event.app_id, next_run_at=next_run, **values
            )
        )
        logger.info("app %s scheduled at %r, next run at %s", event.app_id, cron, next_run)
        return
    rescheduled = (plan.cron_expression, plan.timezone) != (cron, zone)
    if rescheduled or plan.next_run_at is None:
        values = {**values, "next_run_at": next_run_at(cron, zone, utcnow())}
    if assign(plan, values):
        logger.info("app %s rescheduled at %r", event.app_id, cron)
