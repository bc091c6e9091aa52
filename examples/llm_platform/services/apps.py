"""Apps and their model configs."""

from __future__ import annotations

from typing import Any

from ..events import AppModelConfigWasUpdated, AppWasCreated
from ..models import Account, App, AppModelConfig, Tenant
from ..quota import provider_name
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Invalid

APP_MODES = frozenset({"chat", "completion", "agent-chat", "advanced-chat", "workflow"})
WORKFLOW_MODES = frozenset({"advanced-chat", "workflow"})


class AppService(Service):
    async def create_app(
        self,
        tenant_id: str,
        account_id: str,
        name: str,
        mode: str,
        *,
        icon: str = "🤖",
        description: str = "",
    ) -> Done[App]:
        if mode not in APP_MODES:
            raise Invalid(f"mode must be one of {sorted(APP_MODES)}, got {mode!r}")
        async with self.unit_of_work() as uow:
            await get_or_404(uow.session, Tenant, tenant_id)
            await get_or_404(uow.session, Account, account_id)
            app = App(
                tenant_id=tenant_id,
                name=name,
                mode=mode,
                icon=icon,
                description=description,
                created_by=account_id,
            )
            uow.session.add(app)
            await uow.session.flush()
            uow.record(
                AppWasCreated(app_id=app.id, tenant_id=tenant_id, mode=mode, account_id=account_id)
            )
        return uow.done(app)

    async def update_model_config(
        self,
        app_id: str,
        *,
        provider: str,
        model_id: str,
        agent_mode: dict[str, Any] | None = None,
        dataset_configs: dict[str, Any] | None = None,
    ) -> Done[AppModelConfig]:
        async with self.unit_of_work() as uow:
            app = await get_or_404(uow.session, App, app_id)
            if app.mode in WORKFLOW_MODES:
                raise Invalid(f"a {app.mode} app is configured by its workflow, not a model config")
            config = AppModelConfig(
                app_id=app.id,
                provider=provider_name(provider),  # the provider row's name, which messages charge
                model_id=model_id,
                agent_mode=agent_mode or {},
                dataset_configs=dataset_configs or {},
            )
            uow.session.add(config)
            await uow.session.flush()
            app.app_model_config_id = config.id
            uow.record(
                AppModelConfigWasUpdated(
                    app_id=app.id, tenant_id=app.tenant_id, app_model_config_id=config.id
                )
            )
        return uow.done(config)
