"""Events about apps, their model configs and their workflows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class AppWasCreated:
    app_id: str
    tenant_id: str
    mode: str
    account_id: str  # the creating account: the site takes its language


@dataclass(frozen=True, slots=True, kw_only=True)
class AppModelConfigWasUpdated:
    app_id: str
    tenant_id: str
    app_model_config_id: str  # model config rows are immutable: this one is the new one


@dataclass(frozen=True, slots=True, kw_only=True)
class AppPublishedWorkflowWasUpdated:
    app_id: str
    tenant_id: str
    mode: str
    workflow_id: str  # the published version: an immutable row


@dataclass(frozen=True, slots=True, kw_only=True)
class AppDraftWorkflowWasSynced:
    app_id: str
    tenant_id: str
    mode: str
    workflow_id: str  # the draft row; handlers read its current graph
