"""The schema: SQLAlchemy 2 typed models, tables named as in the original.

There are no foreign keys, as in the original: rows that belong to a deleted parent are
removed by handlers after the parent's transaction commits, which a constraint would forbid.
Ids are client-side UUID strings so the same models run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID_LENGTH = 36  # a UUID's text: what every id column holds


def new_id() -> str:
    return str(uuid.uuid4())


def valid_id(value: object) -> str | None:
    """``value`` if it can be an id (a string of 1 to `ID_LENGTH` characters, no whitespace),
    else None: ids read from JSON (configs, graphs) are checked before they reach a column."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= ID_LENGTH
        and not any(character.isspace() for character in value)
    ):
        return value
    return None


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        datetime: DateTime(timezone=True),
    }


class Row(Base):
    __abstract__ = True
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Tenant(Row):
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="normal")


class Account(Row):
    __tablename__ = "accounts"
    tenant_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(255), unique=True)
    interface_language: Mapped[str] = mapped_column(String(16), default="en-US")


class App(Row):
    __tablename__ = "apps"
    tenant_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    mode: Mapped[str] = mapped_column(String(32))
    icon: Mapped[str] = mapped_column(String(255), default="🤖")
    icon_background: Mapped[str] = mapped_column(String(16), default="#FFEAD5")
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(36))
    app_model_config_id: Mapped[str | None] = mapped_column(String(36), default=None)
    workflow_id: Mapped[str | None] = mapped_column(String(36), default=None)


class AppModelConfig(Row):
    """Immutable: an update adds a row and points the app at it."""

    __tablename__ = "app_model_configs"
    app_id: Mapped[str] = mapped_column(String(36), index=True)
    provider: Mapped[str] = mapped_column(String(255))
    model_id: Mapped[str] = mapped_column(String(255))
    agent_mode: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_configs: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Workflow(Row):
    """One mutable 'draft' row per app; each publish adds an immutable versioned row."""

    __tablename__ = "workflows"
    __table_args__ = (UniqueConstraint("app_id", "version"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36), index=True)
    version: Mapped[str] = mapped_column(String(64))
    graph: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Site(Row):
    __tablename__ = "sites"
    app_id: Mapped[str] = mapped_column(String(36), unique=True)
    title: Mapped[str] = mapped_column(String(255))
    icon: Mapped[str] = mapped_column(String(255))
    icon_background: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text)
    default_language: Mapped[str] = mapped_column(String(16))
    customize_token_strategy: Mapped[str] = mapped_column(String(16))
    code: Mapped[str] = mapped_column(String(16), unique=True)


class InstalledApp(Row):
    __tablename__ = "installed_apps"
    __table_args__ = (UniqueConstraint("tenant_id", "app_id"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36))
    app_owner_tenant_id: Mapped[str] = mapped_column(String(36))
    position: Mapped[int] = mapped_column(Integer, default=0)


class Dataset(Row):
    __tablename__ = "datasets"
    tenant_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    indexing_technique: Mapped[str] = mapped_column(String(32))
    doc_form: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str] = mapped_column(String(36))


class UploadFile(Row):
    """``content`` stands in for the original's object storage."""

    __tablename__ = "upload_files"
    tenant_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)


class Document(Row):
    __tablename__ = "documents"
    tenant_id: Mapped[str] = mapped_column(String(36))
    dataset_id: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255))
    upload_file_id: Mapped[str | None] = mapped_column(String(36), default=None)
    doc_form: Mapped[str] = mapped_column(String(32))
    indexing_status: Mapped[str] = mapped_column(String(16), default="waiting")
    is_paused: Mapped[bool] = mapped_column(default=False)
    processing_started_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    word_count: Mapped[int] = mapped_column(Integer, default=0)


class DocumentSegment(Row):
    __tablename__ = "document_segments"
    __table_args__ = (UniqueConstraint("document_id", "position"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    dataset_id: Mapped[str] = mapped_column(String(36), index=True)
    document_id: Mapped[str] = mapped_column(String(36), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    word_count: Mapped[int] = mapped_column(Integer)


class AppDatasetJoin(Row):
    __tablename__ = "app_dataset_joins"
    __table_args__ = (UniqueConstraint("app_id", "dataset_id"),)
    app_id: Mapped[str] = mapped_column(String(36), index=True)
    dataset_id: Mapped[str] = mapped_column(String(36), index=True)


class AppTrigger(Row):
    __tablename__ = "app_triggers"
    __table_args__ = (UniqueConstraint("app_id", "node_id"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36))
    node_id: Mapped[str] = mapped_column(String(64))
    trigger_type: Mapped[str] = mapped_column(String(32))
    title: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="disabled")


class WorkflowPluginTrigger(Row):
    __tablename__ = "workflow_plugin_triggers"
    __table_args__ = (UniqueConstraint("app_id", "node_id"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36))
    node_id: Mapped[str] = mapped_column(String(64))
    provider_id: Mapped[str] = mapped_column(String(255))
    event_name: Mapped[str] = mapped_column(String(255))
    subscription_id: Mapped[str] = mapped_column(String(255))


class WorkflowWebhookTrigger(Row):
    __tablename__ = "workflow_webhook_triggers"
    __table_args__ = (UniqueConstraint("app_id", "node_id"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36))
    node_id: Mapped[str] = mapped_column(String(64))
    webhook_id: Mapped[str] = mapped_column(String(24), unique=True)


class WorkflowSchedulePlan(Row):
    """An app's schedule; ``next_run_at`` (UTC) is when it is due, which a scheduler finds
    by its index and advances after each run."""

    __tablename__ = "workflow_schedule_plans"
    tenant_id: Mapped[str] = mapped_column(String(36))
    app_id: Mapped[str] = mapped_column(String(36), unique=True)  # one plan per app
    node_id: Mapped[str] = mapped_column(String(64))
    cron_expression: Mapped[str] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64))
    next_run_at: Mapped[datetime | None] = mapped_column(default=None, index=True)


class Conversation(Row):
    __tablename__ = "conversations"
    app_id: Mapped[str] = mapped_column(String(36), index=True)
    from_account_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(255))


class Message(Row):
    __tablename__ = "messages"
    app_id: Mapped[str] = mapped_column(String(36), index=True)
    conversation_id: Mapped[str] = mapped_column(String(36), index=True)
    model_provider: Mapped[str] = mapped_column(String(255))
    model_id: Mapped[str] = mapped_column(String(255))
    query: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    message_tokens: Mapped[int] = mapped_column(Integer)
    answer_tokens: Mapped[int] = mapped_column(Integer)


class Provider(Row):
    """One model provider of a tenant: its hosted quota and when it was last used.

    One row per (tenant, provider name): ``provider_type`` says whether the platform hosts it
    (``system``, with a quota of ``quota_type`` counted in `quota.QuotaUnit` units; a
    ``quota_limit`` of -1 is unlimited) or the tenant brings its own key (``custom``, no quota).
    """

    __tablename__ = "providers"
    __table_args__ = (UniqueConstraint("tenant_id", "provider_name"),)
    tenant_id: Mapped[str] = mapped_column(String(36))
    provider_name: Mapped[str] = mapped_column(String(255))
    provider_type: Mapped[str] = mapped_column(String(16), default="system")
    quota_type: Mapped[str] = mapped_column(String(16), default="trial")
    quota_limit: Mapped[int] = mapped_column(BigInteger, default=0)
    quota_used: Mapped[int] = mapped_column(BigInteger, default=0)
    last_used: Mapped[datetime | None] = mapped_column(default=None)


class ProviderUsage(Base):
    """The ledger of quota charges: one row per message, so a message is charged at most once.

    Written in the transaction that charges the quota; a redelivered message finds its row
    and charges nothing. ``charged`` is false when the quota was exhausted: the message was
    counted but not added to ``quota_used``.
    """

    __tablename__ = "provider_usage_ledger"
    message_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    provider_name: Mapped[str] = mapped_column(String(255))
    units: Mapped[int] = mapped_column(BigInteger)
    charged: Mapped[bool] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
