"""The FastAPI app through httpx's ASGI transport, on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from examples.llm_platform.app import Platform, open_platform
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import create_engine
from examples.llm_platform.events import AppWasCreated
from examples.llm_platform.models import AppModelConfig
from examples.llm_platform.web import create_web_app

from .conftest import deliveries_done, lifespan_in_a_task
from .graphs import graph, knowledge, model_config, schedule, webhook

pytestmark = pytest.mark.asyncio


@dataclass
class Client:
    http: httpx.AsyncClient
    platform: Platform
    web: FastAPI
    tenant_id: str = ""
    account_id: str = ""

    async def ok(
        self, method: str, url: str, json: Any = None, status: int = 200
    ) -> dict[str, Any]:
        response = await self.http.request(method, url, json=json)
        assert response.status_code == status, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    opened: list[Platform] = []

    def opener() -> AbstractAsyncContextManager[Platform]:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'web.sqlite3'}")
        return open_platform(engine, MemoryCache())

    web = create_web_app(opener)
    # httpx's ASGI transport does not run the lifespan: run it around the client ourselves.
    async with lifespan_in_a_task(web):
        opened.append(web.state.platform)
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = Client(http, opened[0], web)
            client.tenant_id = (await client.ok("POST", "/tenants", {"name": "Acme"}, 201))["id"]
            account = {"name": "Ann", "email": "ann@acme.test", "interface_language": "fr-FR"}
            client.account_id = (
                await client.ok("POST", f"/tenants/{client.tenant_id}/accounts", account, 201)
            )["id"]
            yield client


async def new_app(client: Client, mode: str = "chat") -> str:
    body = {
        "tenant_id": client.tenant_id,
        "account_id": client.account_id,
        "name": "Bot",
        "mode": mode,
    }
    created = await client.ok("POST", "/apps", body, 201)
    assert created["events"][0]["failed"] == []
    return str(created["id"])


async def test_creating_an_app_gives_it_a_site_and_an_installation(client: Client) -> None:
    app_id = await new_app(client)

    app = await client.ok("GET", f"/apps/{app_id}")

    assert app["installed"] is True
    assert app["site"]["title"] == "Bot" and app["site"]["language"] == "fr-FR"
    assert len(app["site"]["code"]) == 16


async def test_a_chat_app_with_datasets_and_messages(client: Client) -> None:
    app_id = await new_app(client)
    dataset = {"tenant_id": client.tenant_id, "account_id": client.account_id, "name": "KB"}
    dataset_id = (await client.ok("POST", "/datasets", dataset, 201))["id"]
    file = {
        "tenant_id": client.tenant_id,
        "name": "a.txt",
        "content": "Hello there.\n\nGeneral Kenobi.",
    }
    file_id = (await client.ok("POST", "/files", file, 201))["id"]

    documents = await client.ok(
        "POST", f"/datasets/{dataset_id}/documents", {"file_ids": [file_id]}, 201
    )
    assert documents["events"] == [{"handlers": [], "failed": []}]  # indexing is durable
    await client.ok("PUT", f"/apps/{app_id}/model-config", model_config(datasets=(dataset_id,)))
    first = await client.ok(
        "POST", f"/apps/{app_id}/messages", {"account_id": client.account_id, "query": "Hi"}, 201
    )
    follow_up = {
        "account_id": client.account_id,
        "query": "And?",
        "conversation_id": first["conversation_id"],
    }
    second = await client.ok("POST", f"/apps/{app_id}/messages", follow_up, 201)

    [document_id] = documents["ids"]
    await deliveries_done(client.platform.outbox)  # indexing ran on the relay, after the answer
    document = await client.ok("GET", f"/documents/{document_id}")
    assert (document["indexing_status"], document["word_count"]) == ("completed", 4)
    assert (await client.ok("GET", f"/apps/{app_id}"))["dataset_ids"] == [dataset_id]
    assert second["conversation_id"] == first["conversation_id"]

    await client.ok("DELETE", f"/datasets/{dataset_id}")
    await deliveries_done(client.platform.outbox)
    assert (await client.ok("GET", f"/apps/{app_id}"))["dataset_ids"] == []
    assert (await client.http.get(f"/documents/{document_id}")).status_code == 404


async def test_a_workflow_app_synced_and_published(client: Client) -> None:
    app_id = await new_app(client, mode="workflow")
    nodes = graph(
        webhook("hook", "On call"),
        schedule(mode="cron", cron_expression="0 6 * * *"),
        knowledge("k", "d1"),
    )

    synced = await client.ok("PUT", f"/apps/{app_id}/workflows/draft", {"graph": nodes})
    published = await client.ok("POST", f"/apps/{app_id}/workflows/publish")

    assert len(synced["events"][0]["handlers"]) == 3
    assert len(published["events"][0]["handlers"]) == 5
    app = await client.ok("GET", f"/apps/{app_id}")
    assert [trigger["node_id"] for trigger in app["triggers"]] == ["hook", "schedule"]
    next_run = datetime.fromisoformat(app["schedule"].pop("next_run_at"))
    assert app["schedule"] == {"cron": "0 6 * * *", "timezone": "UTC"}
    assert (next_run.hour, next_run.minute, next_run.utcoffset()) == (6, 0, timedelta(0))
    assert app["dataset_ids"] == ["d1"]


async def test_a_failed_handler_is_in_the_response_and_the_change_is_kept(client: Client) -> None:
    async def broken(event: AppWasCreated) -> None:
        raise RuntimeError("boom")

    client.platform.bus.subscribe(AppWasCreated, broken)
    body = {
        "tenant_id": client.tenant_id,
        "account_id": client.account_id,
        "name": "Bot",
        "mode": "chat",
    }

    created = await client.ok("POST", "/apps", body, 201)

    [report] = created["events"]
    assert [failure["error"] for failure in report["failed"]] == ["RuntimeError('boom')"]
    assert (await client.ok("GET", f"/apps/{created['id']}"))["site"] is not None


@pytest.mark.parametrize(
    ("method", "url", "body", "status"),
    [
        ("POST", "/tenants", {"name": ""}, 422),
        ("POST", "/tenants", {"title": "no name"}, 422),
        ("POST", "/tenants", "not an object", 422),
        ("PATCH", "/tenants/missing", {"name": "X"}, 404),
        ("POST", "/tenants/missing/accounts", {"name": "Bo", "email": "bo@acme.test"}, 404),
        (
            "POST",
            "/apps",
            {"tenant_id": "t", "account_id": "a", "name": "Bot", "mode": "robot"},
            422,
        ),
        (
            "POST",
            "/apps",
            {"tenant_id": "missing", "account_id": "a", "name": "Bot", "mode": "chat"},
            404,
        ),
        ("PUT", "/apps/missing/model-config", {"provider": "openai", "model_id": "gpt"}, 404),
        ("PUT", "/apps/missing/workflows/draft", {"graph": {"nodes": []}}, 404),
        ("POST", "/apps/missing/workflows/publish", None, 404),
        ("POST", "/datasets/missing/documents", {"file_ids": ["f"]}, 404),
        ("POST", "/datasets/missing/documents", {"file_ids": []}, 422),
        ("DELETE", "/documents/missing", None, 404),
        ("DELETE", "/datasets/missing", None, 404),
        ("POST", "/files", {"tenant_id": "t", "name": "x" * 256, "content": ""}, 422),
    ],
)
async def test_bad_input_is_a_4xx_with_a_json_error(
    client: Client, method: str, url: str, body: Any, status: int
) -> None:
    response = await client.http.request(method, url, json=body)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert_error_shape(response.json())


def assert_error_shape(body: dict[str, Any]) -> None:
    """Every error response: ``{"error": str, "fields": [{"field": str, "message": str}]}``."""
    assert set(body) == {"error", "fields"}, body
    assert isinstance(body["error"], str) and body["error"]
    for field in body["fields"]:
        assert set(field) == {"field", "message"}, field
        assert all(isinstance(value, str) and value for value in field.values())


@pytest.mark.parametrize(
    ("method", "url", "body", "fields"),
    [
        ("POST", "/tenants", {"name": ""}, ["name"]),
        ("POST", "/tenants", "not an object", ["body"]),
        ("POST", "/tenants", None, ["body"]),
        ("POST", "/datasets/d/documents", {"file_ids": ["ok", ""]}, ["file_ids[1]"]),
        (
            "POST",
            "/apps",
            {"tenant_id": "t", "account_id": "a", "name": "Bot", "mode": "robot"},
            ["mode"],
        ),
    ],
)
async def test_a_422_names_the_invalid_fields(
    client: Client, method: str, url: str, body: Any, fields: list[str]
) -> None:
    response = await client.http.request(method, url, json=body)

    assert response.status_code == 422, response.text
    assert_error_shape(response.json())
    assert [field["field"] for field in response.json()["fields"]] == fields


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [("GET", "/nowhere", 404), ("DELETE", "/tenants", 405)],
)
async def test_fastapis_own_errors_have_the_same_shape(
    client: Client, method: str, url: str, status: int
) -> None:
    response = await client.http.request(method, url)

    assert response.status_code == status
    assert_error_shape(response.json())


async def test_an_unexpected_error_is_a_500_of_the_same_shape(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(client.platform.services.tenants, "create_tenant", broken)
    transport = httpx.ASGITransport(app=client.web, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.post("/tenants", json={"name": "Acme"})

    assert response.status_code == 500
    assert response.json() == {"error": "internal server error", "fields": []}


FIVE_MB = 5 * 1024 * 1024


async def test_a_body_over_the_limit_is_a_413_without_the_body(client: Client) -> None:
    content = b'{"name": "' + b"x" * FIVE_MB + b'"}'

    response = await client.http.post(
        "/tenants", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert_error_shape(response.json())
    assert len(response.content) < 1000


async def test_a_chunked_body_over_the_limit_is_a_413(client: Client) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(5):
            yield b"x" * 1024 * 1024
        yield b'"}'

    response = await client.http.post(
        "/tenants", content=chunks(), headers={"content-type": "application/json"}
    )

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert_error_shape(response.json())


async def test_a_body_within_the_limit_is_accepted(client: Client) -> None:
    file = {"tenant_id": client.tenant_id, "name": "big.txt", "content": "word " * 200_000}

    await client.ok("POST", "/files", file, 201)


def listed(*entries: Any) -> dict[str, Any]:
    """A model config's dataset configs listing ``entries``."""
    return {"dataset_configs": {"datasets": {"datasets": list(entries)}}}


LISTED = "dataset_configs.datasets.datasets"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"dataset_configs": {"datasets": "garbage"}}, "dataset_configs.datasets"),
        ({"dataset_configs": {"datasets": {"datasets": "garbage"}}}, LISTED),
        (listed("garbage"), f"{LISTED}[0]"),
        (listed({"dataset": {"id": ""}}), f"{LISTED}[0].dataset.id"),
        (listed({"dataset": {"id": "x" * 37}}), f"{LISTED}[0].dataset.id"),
        (listed({"dataset": {"enabled": True}}), f"{LISTED}[0].dataset.id"),
        ({"agent_mode": {"tools": [{"dataset": {"id": " "}}]}}, "agent_mode.tools[0].dataset.id"),
        ({"agent_mode": {"tools": [{"dataset": None}]}}, "agent_mode.tools[0].dataset"),
        ({"agent_mode": {"tools": "garbage"}}, "agent_mode.tools"),
        ({"agent_mode": "garbage"}, "agent_mode"),
    ],
)
async def test_a_malformed_model_config_is_a_422_naming_the_field_and_changes_nothing(
    client: Client, config: dict[str, Any], field: str
) -> None:
    app_id = await new_app(client)
    dataset = {"tenant_id": client.tenant_id, "account_id": client.account_id, "name": "KB"}
    dataset_id = (await client.ok("POST", "/datasets", dataset, 201))["id"]
    await client.ok("PUT", f"/apps/{app_id}/model-config", model_config(datasets=(dataset_id,)))
    body = {"provider": "openai", "model_id": "gpt-4o-mini", **config}

    response = await client.http.put(f"/apps/{app_id}/model-config", json=body)

    assert response.status_code == 422, response.text
    assert_error_shape(response.json())
    assert [error["field"] for error in response.json()["fields"]] == [field]
    assert (await client.ok("GET", f"/apps/{app_id}"))["dataset_ids"] == [dataset_id]


async def test_a_model_config_is_saved_as_sent(client: Client) -> None:
    app_id = await new_app(client)
    config = model_config(datasets=("d1",))
    config["agent_mode"]["strategy"] = "function_call"
    config["dataset_configs"]["retrieval_model"] = "multiple"

    done = await client.ok("PUT", f"/apps/{app_id}/model-config", config)

    async with client.platform.sessions() as session:
        saved = await session.get(AppModelConfig, done["id"])
    assert saved is not None
    assert (saved.agent_mode, saved.dataset_configs) == (
        config["agent_mode"],
        config["dataset_configs"],
    )


async def test_refused_calls_on_real_rows_change_nothing(client: Client) -> None:
    chat = await new_app(client)
    flow = await new_app(client, mode="workflow")
    duplicate = {"name": "Ann again", "email": "ann@acme.test"}

    responses = [
        await client.http.put(f"/apps/{chat}/workflows/draft", json={"graph": {"nodes": []}}),
        await client.http.put(
            f"/apps/{flow}/model-config", json={"provider": "openai", "model_id": "gpt"}
        ),
        await client.http.put(f"/apps/{flow}/workflows/draft", json={"graph": {"nodes": "none"}}),
        await client.http.post(f"/apps/{flow}/workflows/publish"),
        await client.http.post(
            f"/apps/{chat}/messages", json={"account_id": client.account_id, "query": "Hi"}
        ),
        await client.http.post(f"/tenants/{client.tenant_id}/accounts", json=duplicate),
    ]

    assert [response.status_code for response in responses] == [422, 422, 422, 422, 422, 409]
    for response in responses:
        assert_error_shape(response.json())
    app = await client.ok("GET", f"/apps/{flow}")
    assert (app["triggers"], app["dataset_ids"], app["schedule"]) == ([], [], None)
