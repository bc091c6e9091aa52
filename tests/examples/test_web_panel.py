"""The web app's operations panel, mounted at ``/events`` on the platform's outbox.

Read through the app itself (httpx's ASGI transport, on SQLite), with the lifespan running:
the panel's pages are served under the mount point, on the outbox the lifespan opened.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from aioevents.outbox import DeliveryStatus
from examples.llm_platform.app import Platform

from .conftest import deliveries_done, web_app_on_sqlite

pytestmark = pytest.mark.asyncio


@dataclass
class Served:
    http: httpx.AsyncClient
    platform: Platform


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The running web app, with a document indexed by its relay (a durable delivery)."""
    async with web_app_on_sqlite(tmp_path / "web.sqlite3") as (http, platform):
        await index_a_document(platform)
        yield Served(http, platform)


async def index_a_document(platform: Platform) -> None:
    services = platform.services
    tenant = (await services.tenants.create_tenant("Acme")).value
    account = (
        await services.tenants.create_account(tenant.id, "Ann", "a@acme.test", "en-US")
    ).value
    dataset = (await services.datasets.create_dataset(tenant.id, account.id, "KB")).value
    file = (await services.documents.upload_file(tenant.id, "a.txt", "Hello.\n\nThere.")).value
    await services.documents.create_documents(dataset.id, [file.id])
    await deliveries_done(platform.outbox)


async def test_the_overview_and_the_dead_letters_are_served_under_events(served: Served) -> None:
    overview = await served.http.get("/events/")
    dead = await served.http.get("/events/dead")
    # The overview's link to the dead letters keeps the mount point.
    [link] = re.findall(r'<a href="([^"]*)"[^>]*>Dead letters</a>', overview.text)
    followed = await served.http.get(str(overview.url.join(link)))

    for page in (overview, dead, followed):
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "llm_platform events" in page.text
    assert followed.url.path == "/events/dead"


async def test_the_panel_counts_the_platforms_deliveries(served: Served) -> None:
    completed = await served.platform.outbox.deliveries(status=DeliveryStatus.COMPLETED)

    stats = (await served.http.get("/events/stats.json")).json()

    assert [d.handler for d in completed] == ["create_document_index"]
    assert stats["statuses"] == {"pending": 0, "completed": 1, "dead": 0, "discarded": 0}
