"""The durable handlers: which they are, and work that waits in the outbox for a relay."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from aioevents.outbox import DeliveryStatus
from examples.llm_platform.app import build_bus
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import create_engine, session_factory
from examples.llm_platform.deps import Deps
from examples.llm_platform.handlers import DURABLE
from examples.llm_platform.models import Document, Provider

from .conftest import Harness
from .graphs import model_config

pytestmark = pytest.mark.asyncio

DURABLE_HANDLERS = {
    "create_document_index",
    "clean_when_document_deleted",
    "clean_when_dataset_deleted",
    "update_provider_when_message_created",
}


async def test_the_handlers_whose_work_must_not_be_lost_are_durable() -> None:
    engine = create_engine("sqlite://")  # never connects
    bus = build_bus(Deps(session_factory(engine), MemoryCache()))

    durable = {name: sub.durable for name, sub in bus.durable_handlers.items()}

    assert durable == dict.fromkeys(DURABLE_HANDLERS, DURABLE)
    assert DURABLE.max_attempts > 1


async def test_work_recorded_while_no_relay_runs_waits_for_one(idle_harness: Harness) -> None:
    # No relay in this process (the bus does not run): as if it had died right after COMMIT.
    harness = idle_harness
    services = harness.services
    dataset = await services.datasets.create_dataset(harness.tenant_id, harness.account_id, "KB")
    upload = await services.documents.upload_file(harness.tenant_id, "a.txt", "One.\n\nTwo.")
    created = await services.documents.create_documents(dataset.value.id, [upload.value.id])
    [document] = created.value
    app = await services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    await services.apps.update_model_config(app.value.id, **model_config())
    await services.messages.send_message(app.value.id, harness.account_id, "Hello there")

    waiting = await harness.outbox.deliveries(status=DeliveryStatus.PENDING)
    assert sorted((d.handler, d.attempts, d.leased_until) for d in waiting) == [
        ("create_document_index", 0, None),
        ("update_provider_when_message_created", 0, None),
    ]
    assert await document_status(harness, document.id) == "waiting"
    assert await openai_used(harness) == 0

    async with harness.bus:  # a relay again: it claims what is due
        await harness.deliveries_done()

    done = await harness.outbox.deliveries(status=DeliveryStatus.COMPLETED)
    assert sorted((d.handler, d.attempts) for d in done) == [
        ("create_document_index", 1),
        ("update_provider_when_message_created", 1),
    ]
    assert await document_status(harness, document.id) == "completed"
    assert await openai_used(harness) == 1


async def document_status(harness: Harness, document_id: str) -> str:
    [document] = await harness.rows(Document, id=document_id)
    return document.indexing_status


async def openai_used(harness: Harness) -> int:
    async with harness.platform.sessions() as session:
        query = select(Provider.quota_used).filter_by(
            tenant_id=harness.tenant_id, provider_name="openai"
        )
        return int((await session.scalars(query)).one())
