"""Tenants (workspaces), their accounts, and the hosted providers a tenant starts with."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError

from ..events import TenantWasCreated, TenantWasUpdated
from ..models import Account, Provider, Tenant
from ..quota import TRIAL_QUOTAS
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Conflict


class TenantService(Service):
    async def create_tenant(self, name: str) -> Done[Tenant]:
        """The tenant, with a system provider on a trial quota for each hosted provider, as
        the original set up a tenant's hosted providers: messages charge their quota."""
        async with self.unit_of_work() as uow:
            tenant = Tenant(name=name)
            uow.session.add(tenant)
            await uow.session.flush()
            uow.session.add_all(
                Provider(tenant_id=tenant.id, provider_name=provider_name, provider_type="system",
                         quota_type="trial", quota_limit=limit)
                for provider_name, limit in sorted(TRIAL_QUOTAS.items())
            )  # fmt: skip
            uow.record(TenantWasCreated(tenant_id=tenant.id, name=name))
        return uow.done(tenant)

    async def update_tenant(self, tenant_id: str, name: str) -> Done[Tenant]:
        async with self.unit_of_work() as uow:
            tenant = await get_or_404(uow.session, Tenant, tenant_id)
            tenant.name = name
            uow.record(TenantWasUpdated(tenant_id=tenant.id, name=name))
        return uow.done(tenant)

    async def create_account(
        self, tenant_id: str, name: str, email: str, interface_language: str = "en-US"
    ) -> Done[Account]:
        try:
            async with self.unit_of_work() as uow:
                await get_or_404(uow.session, Tenant, tenant_id)
                account = Account(
                    tenant_id=tenant_id,
                    name=name,
                    email=email,
                    interface_language=interface_language,
                )
                uow.session.add(account)
                await uow.session.flush()
        except IntegrityError:
            raise Conflict(f"an account with email {email!r} exists") from None
        return uow.done(account)
