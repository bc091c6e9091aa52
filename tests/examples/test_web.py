"""The FastAPI app through httpx's ASGI transport, on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from examples.llm_platform.app import Platform, open_platform
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import create_engine
from examples.llm_platform.events import AppWasCreated
from examples.llm_platform.web import create_web_app

from .conftest import lifespan_in_a_task
from .graphs import graph, knowledge, model_config, schedule, webhook

pytestmark = pytest.mark.asyncio


@dataclass
class Client:
    http: httpx.AsyncClient
    platform: Platform
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
        return open_platform(engine, MemoryCache(), running=True)  # as the web app runs it

    web = create_web_app(opener)
    # httpx's ASGI transport does not run the lifespan: run it around the client ourselves.
    async with lifespan_in_a_task(web):
        opened.append(web.state.platform)
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = Client(http, opened[0])
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
    document = await client.ok("GET", f"/documents/{document_id}")
    assert (document["indexing_status"], document["word_count"]) == ("completed", 4)
    assert (await client.ok("GET", f"/apps/{app_id}"))["dataset_ids"] == [dataset_id]
    assert second["conversation_id"] == first["conversation_id"]

    await client.ok("DELETE", f"/datasets/{dataset_id}")
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
    assert app["schedule"] == {"cron": "0 6 * * *", "timezone": "UTC"}
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
    assert "error" in response.json() or "detail" in response.json()


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
    assert all("error" in response.json() for response in responses)
    app = await client.ok("GET", f"/apps/{flow}")
    assert (app["triggers"], app["dataset_ids"], app["schedule"]) == ([], [], None)
