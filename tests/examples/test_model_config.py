"""update_app_dataset_join_when_app_model_config_updated."""

from __future__ import annotations

from typing import Any

import pytest

from aioevents.testing import capture
from examples.llm_platform.events import AppModelConfigWasUpdated
from examples.llm_platform.models import AppDatasetJoin

from .conftest import Harness
from .graphs import model_config

pytestmark = pytest.mark.asyncio


async def new_datasets(harness: Harness, count: int) -> list[str]:
    datasets = harness.services.datasets
    return [
        (await datasets.create_dataset(harness.tenant_id, harness.account_id, f"kb{n}")).value.id
        for n in range(count)
    ]


async def joined(harness: Harness, app_id: str) -> set[str]:
    return {join.dataset_id for join in await harness.rows(AppDatasetJoin, app_id=app_id)}


async def test_the_model_configs_datasets_are_joined_to_the_app(harness: Harness) -> None:
    a, b, c = await new_datasets(harness, 3)
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value

    await harness.services.apps.update_model_config(
        app.id, **model_config(tools=(a,), datasets=(b,))
    )
    assert await joined(harness, app.id) == {a, b}

    done = await harness.services.apps.update_model_config(app.id, **model_config(datasets=(b, c)))
    assert done.ok
    assert await joined(harness, app.id) == {b, c}


async def test_joining_datasets_is_idempotent(harness: Harness) -> None:
    a, b = await new_datasets(harness, 2)
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    with capture(harness.bus) as events:
        await harness.services.apps.update_model_config(
            app.id, **model_config(tools=(a,), datasets=(a, b))
        )

    changes = await harness.emit_again(events.assert_emitted(AppModelConfigWasUpdated))

    assert changes == {"UpdateAppDatasetJoinWhenAppModelConfigUpdated": {}}
    assert await joined(harness, app.id) == {a, b}


@pytest.mark.parametrize(
    "bad_id", ["", "   ", None, 42, {"id": "x"}, "x" * 37, "two words"], ids=repr
)
async def test_empty_and_malformed_dataset_ids_are_ignored(harness: Harness, bad_id: Any) -> None:
    [good] = await new_datasets(harness, 1)
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    config = model_config(datasets=(good,))
    config["dataset_configs"]["datasets"]["datasets"].append({"dataset": {"id": bad_id}})
    config["agent_mode"]["tools"].append({"dataset": {"enabled": True, "id": bad_id}})

    done = await harness.services.apps.update_model_config(app.id, **config)

    assert done.ok, done.reports
    assert await joined(harness, app.id) == {good}


@pytest.mark.parametrize(
    ("agent_mode", "dataset_configs"),
    [
        ({}, {"datasets": "garbage"}),
        ({}, {"datasets": {"datasets": "garbage"}}),
        ({}, {"datasets": {"datasets": ["garbage", {"dataset": "garbage"}]}}),
        ({"tools": "garbage"}, {}),
        ({"tools": ["garbage", {"dataset": None}]}, {}),
    ],
)
async def test_a_malformed_config_leaves_the_joins_in_step_with_it(
    harness: Harness, agent_mode: dict[str, Any], dataset_configs: dict[str, Any]
) -> None:
    # The service takes any JSON (the web API refuses these with a 422): its datasets are none.
    [dataset_id] = await new_datasets(harness, 1)
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    await harness.services.apps.update_model_config(app.id, **model_config(datasets=(dataset_id,)))

    done = await harness.services.apps.update_model_config(
        app.id,
        provider="openai",
        model_id="gpt-4o-mini",
        agent_mode=agent_mode,
        dataset_configs=dataset_configs,
    )

    assert done.ok, done.reports
    assert await joined(harness, app.id) == set()
