"""Workflows: sync the draft, publish it as a new immutable version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..events import AppDraftWorkflowWasSynced, AppPublishedWorkflowWasUpdated
from ..models import App, Workflow, utcnow
from ..uow import Done
from ._base import Service, get_or_404
from .apps import WORKFLOW_MODES
from .errors import Invalid

DRAFT = "draft"


class WorkflowService(Service):
    async def sync_draft(self, app_id: str, graph: dict[str, Any]) -> Done[Workflow]:
        if not isinstance(graph.get("nodes"), list):
            raise Invalid("a workflow graph needs a list of nodes")
        async with self.unit_of_work() as uow:
            app = await self._workflow_app(uow.session, app_id)
            draft = await uow.session.scalar(_draft_of(app.id))
            if draft is None:
                draft = Workflow(tenant_id=app.tenant_id, app_id=app.id, version=DRAFT)
                uow.session.add(draft)
            draft.graph, draft.updated_at = graph, utcnow()
            await uow.session.flush()
            uow.record(
                AppDraftWorkflowWasSynced(
                    app_id=app.id, tenant_id=app.tenant_id, mode=app.mode, workflow_id=draft.id
                )
            )
        return uow.done(draft)

    async def publish(self, app_id: str) -> Done[Workflow]:
        async with self.unit_of_work() as uow:
            app = await self._workflow_app(uow.session, app_id)
            draft = await uow.session.scalar(_draft_of(app.id))
            if draft is None:
                raise Invalid(f"app {app_id} has no draft workflow to publish")
            version = utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")
            published = Workflow(
                tenant_id=app.tenant_id, app_id=app.id, version=version, graph=draft.graph
            )
            uow.session.add(published)
            await uow.session.flush()
            app.workflow_id = published.id
            uow.record(
                AppPublishedWorkflowWasUpdated(
                    app_id=app.id, tenant_id=app.tenant_id, mode=app.mode, workflow_id=published.id
                )
            )
        return uow.done(published)

    async def _workflow_app(self, session: AsyncSession, app_id: str) -> App:
        app = await get_or_404(session, App, app_id)
        if app.mode not in WORKFLOW_MODES:
            raise Invalid(f"a {app.mode} app has no workflow")
        return app


def _draft_of(app_id: str) -> Select[Workflow]:
    return select(Workflow).where(Workflow.app_id == app_id, Workflow.version == DRAFT)
