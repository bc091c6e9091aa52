"""Handlers of app-was-created: the installed app and the site."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aioevents.testing import capture
from examples.llm_platform.events import AppWasCreated
from examples.llm_platform.handlers.create_site_record_when_app_created import (
    CreateSiteRecordWhenAppCreated,
)
from examples.llm_platform.models import InstalledApp, Site

from .conftest import Harness

pytestmark = pytest.mark.asyncio


async def create_app(harness: Harness, name: str = "Helper", mode: str = "chat") -> AppWasCreated:
    with capture(harness.bus) as events:
        done = await harness.services.apps.create_app(
            harness.tenant_id, harness.account_id, name, mode, icon="🦊"
        )
    assert done.ok, done.reports
    return events.assert_emitted(AppWasCreated, app_id=done.value.id)


async def test_creating_an_app_installs_it_in_its_tenant(harness: Harness) -> None:
    event = await create_app(harness)

    [installed] = await harness.rows(InstalledApp, app_id=event.app_id)
    assert (installed.tenant_id, installed.app_owner_tenant_id) == (
        harness.tenant_id,
        harness.tenant_id,
    )


async def test_creating_an_app_creates_its_site(harness: Harness) -> None:
    event = await create_app(harness, name="Helper")

    [site] = await harness.rows(Site, app_id=event.app_id)
    assert (site.title, site.icon, site.default_language) == ("Helper", "🦊", "de-DE")
    assert site.customize_token_strategy == "not_allow"
    assert len(site.code) == 16 and site.code.isalnum()


async def test_app_created_handlers_are_idempotent(harness: Harness) -> None:
    event = await create_app(harness)
    [site] = await harness.rows(Site, app_id=event.app_id)

    changes = await harness.emit_again(event)

    assert changes == {"CreateInstalledAppWhenAppCreated": {}, "CreateSiteRecordWhenAppCreated": {}}
    assert [row.code for row in await harness.rows(Site, app_id=event.app_id)] == [site.code]
    assert len(await harness.rows(InstalledApp, app_id=event.app_id)) == 1


async def test_a_site_code_collision_is_retried_with_a_new_code(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await create_app(harness, name="First")
    [taken] = await harness.rows(Site, app_id=first.app_id)
    codes = iter([taken.code, taken.code, "FreshCode0000000"])
    monkeypatch.setattr(
        CreateSiteRecordWhenAppCreated, "code_factory", staticmethod(lambda: next(codes))
    )

    second = await create_app(harness, name="Second")

    [site] = await harness.rows(Site, app_id=second.app_id)
    assert site.code == "FreshCode0000000"


def _same_code() -> Iterator[str]:
    while True:
        yield "SameCodeEveryTry"


async def test_a_site_code_that_always_collides_fails_the_handler_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = _same_code()
    monkeypatch.setattr(
        CreateSiteRecordWhenAppCreated, "code_factory", staticmethod(lambda: next(codes))
    )
    await create_app(harness, name="First")

    done = await harness.services.apps.create_app(
        harness.tenant_id, harness.account_id, "Second", "chat"
    )

    [error] = done.reports[0].errors
    assert error.handler_name.endswith("CreateSiteRecordWhenAppCreated")
    assert await harness.rows(InstalledApp, app_id=done.value.id)  # the other handler ran
    assert await harness.rows(Site, app_id=done.value.id) == []
