"""Event types shared by the core tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class AppEvent:
    app_id: str = "app-1"


@dataclass(frozen=True, slots=True, kw_only=True)
class AppWasCreated(AppEvent):
    tenant_id: str = "tenant-1"


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantWasCreated:
    tenant_id: str = "tenant-1"
