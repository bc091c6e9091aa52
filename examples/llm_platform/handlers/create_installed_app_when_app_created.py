"""An app is installed in its own tenant's workspace when it is created."""

from __future__ import annotations

import logging

from ..events import AppWasCreated
from ..models import InstalledApp
from ._common import Handler, insert_missing

logger = logging.getLogger(__name__)


class CreateInstalledAppWhenAppCreated(Handler):
    async def __call__(self, event: AppWasCreated) -> None:
        row = {
            "tenant_id": event.tenant_id,
            "app_id": event.app_id,
            "app_owner_tenant_id": event.tenant_id,
        }
        async with self.deps.sessions.begin() as session:
            inserted = await insert_missing(session, InstalledApp, [row])
        if inserted:
            logger.info("installed app %s for tenant %s", event.app_id, event.tenant_id)
        else:
            logger.info("app %s already installed for tenant %s", event.app_id, event.tenant_id)
