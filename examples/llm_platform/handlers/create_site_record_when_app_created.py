"""Every app gets a site: its public page, reached by a unique 16-character code."""

from __future__ import annotations

import logging
import secrets
import string

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ..events import AppWasCreated
from ..models import Account, App, Site
from ._common import Handler

logger = logging.getLogger(__name__)

CODE_ALPHABET = string.ascii_letters + string.digits
CODE_ATTEMPTS = 5


def generate_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(16))


class CreateSiteRecordWhenAppCreated(Handler):
    code_factory = staticmethod(generate_code)  # tests swap it to force a collision

    async def __call__(self, event: AppWasCreated) -> None:
        async with self.deps.sessions.begin() as session:
            app = await session.get(App, event.app_id)
            if app is None:
                logger.warning("app %s is gone; no site created", event.app_id)
                return
            for _ in range(CODE_ATTEMPTS):
                if await self._site_exists(session, app.id):
                    logger.info("app %s already has a site", app.id)
                    return
                if await self._try_insert(session, app, event.account_id):
                    return
        raise RuntimeError(f"no unique site code for app {event.app_id} in {CODE_ATTEMPTS} tries")

    async def _site_exists(self, session: AsyncSession, app_id: str) -> bool:
        query = select(Site.id).where(Site.app_id == app_id)
        return (await session.scalar(query)) is not None

    async def _try_insert(self, session: AsyncSession, app: App, account_id: str) -> bool:
        # The unique constraints decide, not a prior check: a collision on the code (or a
        # concurrent run that created the site) rolls back to the savepoint and we look again.
        account = await session.get(Account, account_id)
        site = Site(
            app_id=app.id,
            title=app.name,
            icon=app.icon,
            icon_background=app.icon_background,
            description=app.description,
            default_language=account.interface_language if account else "en-US",
            customize_token_strategy="not_allow",
            code=self.code_factory(),
        )
        try:
            async with session.begin_nested():
                session.add(site)
        except IntegrityError:
            logger.info("site code collision for app %s; retrying", app.id)
            return False
        logger.info("created site %s for app %s", site.code, app.id)
        return True
