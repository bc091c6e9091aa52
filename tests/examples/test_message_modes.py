"""Which messages charge which provider row, as in the original.

The original books quota and ``last_used`` only for the generations of chat and agent-chat
apps; a completion app's messages (and an advanced-chat app's, whose workflow's LLM nodes
book their own) leave the provider row alone. A plugin-style provider name of the original's
own plugins (``langgenius/openai/openai``) is the provider row ``openai``.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from aioevents.throttle import MemoryThrottle
from examples.llm_platform.deps import Deps
from examples.llm_platform.events import MessageWasCreated
from examples.llm_platform.handlers.update_provider_when_message_created import (
    UpdateProviderWhenMessagesCreated,
)
from examples.llm_platform.models import Provider, ProviderUsage
from examples.llm_platform.quota import provider_name

from .conftest import Harness
from .graphs import model_config


async def send_a_message(harness: Harness, mode: str) -> None:
    services = harness.services
    app = (await services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", mode)).value
    await services.apps.update_model_config(app.id, **model_config())
    done = await services.messages.send_message(app.id, harness.account_id, "Hello there")
    assert done.ok, done.reports
    await harness.deliveries_done()  # the provider update is durable: it runs after


async def openai_usage(harness: Harness) -> tuple[int, bool, int]:
    """The tenant's openai row: quota used, whether last_used is set; and its ledger rows."""
    async with harness.platform.sessions() as session:
        provider = await session.scalar(
            select(Provider).filter_by(tenant_id=harness.tenant_id, provider_name="openai")
        )
        ledger = await session.scalars(select(ProviderUsage).filter_by(provider_name="openai"))
        assert provider is not None
        return provider.quota_used, provider.last_used is not None, len(ledger.all())


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["chat", "agent-chat"])
async def test_a_chat_message_charges_its_provider_and_marks_it_used(
    harness: Harness, mode: str
) -> None:
    await send_a_message(harness, mode)

    assert await openai_usage(harness) == (1, True, 1)  # the trial quota counts messages


@pytest.mark.asyncio
async def test_a_completion_message_charges_nothing_and_marks_nothing(harness: Harness) -> None:
    await send_a_message(harness, "completion")

    assert await openai_usage(harness) == (0, False, 0)


@pytest.mark.asyncio
async def test_a_batch_charges_only_its_chat_messages(harness: Harness) -> None:
    deps = Deps(harness.platform.sessions, harness.cache, MemoryThrottle())
    handler = UpdateProviderWhenMessagesCreated(deps)

    await handler([message(harness, "m1", "completion"), message(harness, "m2", "agent-chat")])

    assert await openai_usage(harness) == (1, True, 1)


def message(harness: Harness, message_id: str, app_mode: str) -> MessageWasCreated:
    return MessageWasCreated(
        message_id=f"{message_id}-{harness.tenant_id}"[:36],
        conversation_id="c",
        app_id="a",
        tenant_id=harness.tenant_id,
        provider="openai",
        model="gpt-4o-mini",
        message_tokens=2,
        answer_tokens=3,
        app_mode=app_mode,
    )


@pytest.mark.asyncio
async def test_a_plugin_style_provider_name_charges_the_provider_row(harness: Harness) -> None:
    services = harness.services
    app = (
        await services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    config = {**model_config(), "provider": "langgenius/openai/openai"}
    await services.apps.update_model_config(app.id, **config)

    done = await services.messages.send_message(app.id, harness.account_id, "Hello there")
    await harness.deliveries_done()

    assert done.ok, done.reports
    assert await openai_usage(harness) == (1, True, 1)


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("openai", "openai"),
        ("langgenius/openai/openai", "openai"),
        ("langgenius/gemini/google", "google"),
        ("acme/openai/openai", "acme/openai/openai"),  # another organisation's plugin
        ("langgenius/openai", "langgenius/openai"),
    ],
)
def test_provider_names(name: str, row: str) -> None:
    assert provider_name(name) == row
