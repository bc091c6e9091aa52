"""Events about tenants (workspaces)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantWasCreated:
    tenant_id: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantWasUpdated:
    tenant_id: str
    name: str
