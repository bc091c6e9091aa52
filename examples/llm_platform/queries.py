"""Read models for the web app: what the handlers left, as plain dicts."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .models import (
    App,
    AppDatasetJoin,
    AppTrigger,
    Document,
    InstalledApp,
    Site,
    WorkflowSchedulePlan,
)
from .services import NotFound


async def app_view(session: AsyncSession, app_id: str) -> dict[str, Any]:
    app = await session.get(App, app_id)
    if app is None:
        raise NotFound("app", app_id)
    site = await session.scalar(select(Site).where(Site.app_id == app_id))
    installed = await session.scalar(select(InstalledApp.id).where(InstalledApp.app_id == app_id))
    datasets = await session.scalars(
        select(AppDatasetJoin.dataset_id).where(AppDatasetJoin.app_id == app_id)
    )
    triggers = await session.scalars(select(AppTrigger).where(AppTrigger.app_id == app_id))
    plan = await session.scalar(
        select(WorkflowSchedulePlan).where(WorkflowSchedulePlan.app_id == app_id)
    )
    return {
        "id": app.id,
        "name": app.name,
        "mode": app.mode,
        "installed": installed is not None,
        "site": None if site is None else _site(site),
        "dataset_ids": sorted(datasets),
        "triggers": sorted((_trigger(trigger) for trigger in triggers), key=lambda t: t["node_id"]),
        "schedule": None if plan is None else _schedule(plan),
    }


def _schedule(plan: WorkflowSchedulePlan) -> dict[str, str | None]:
    next_run = plan.next_run_at
    if next_run is not None and next_run.tzinfo is None:  # SQLite keeps the UTC time, no zone
        next_run = next_run.replace(tzinfo=UTC)
    return {
        "cron": plan.cron_expression,
        "timezone": plan.timezone,
        "next_run_at": None if next_run is None else next_run.isoformat(),
    }


def _site(site: Site) -> dict[str, str]:
    return {"code": site.code, "title": site.title, "language": site.default_language}


def _trigger(trigger: AppTrigger) -> dict[str, str]:
    return {"node_id": trigger.node_id, "type": trigger.trigger_type, "title": trigger.title}


async def document_view(session: AsyncSession, document_id: str) -> dict[str, Any]:
    document = await session.get(Document, document_id)
    if document is None:
        raise NotFound("document", document_id)
    return {
        "id": document.id,
        "dataset_id": document.dataset_id,
        "indexing_status": document.indexing_status,
        "error": document.error,
        "word_count": document.word_count,
    }
