"""The web app as uvicorn serves it, for the console-tracing test: ``python -m
tests.examples.traced_web`` (with ``OTEL_TRACES_EXPORTER=console`` and ``DATABASE_URL`` set by
the test) runs `examples.llm_platform.web.app`, wired from the environment, through its
lifespan; over HTTP it creates an app (handlers run in process) and a document, and waits
until the relay indexed it (a durable handler). The spans are printed on standard output as
they end.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx

from examples.llm_platform.web import app

WAIT = 60.0  # seconds the indexing may take on a loaded machine


async def main() -> None:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            tenant = (await created(http, "/tenants", {"name": "Acme"}))["id"]
            account = {"name": "Ann", "email": "ann@acme.test", "interface_language": "en-US"}
            account_id = (await created(http, f"/tenants/{tenant}/accounts", account))["id"]
            owner = {"tenant_id": tenant, "account_id": account_id}
            await created(http, "/apps", {**owner, "name": "Bot", "mode": "chat"})
            dataset = (await created(http, "/datasets", {**owner, "name": "KB"}))["id"]
            file = {"tenant_id": tenant, "name": "a.txt", "content": "Hello.\n\nThere."}
            file_id = (await created(http, "/files", file))["id"]
            documents = {"file_ids": [file_id]}
            [document] = (await created(http, f"/datasets/{dataset}/documents", documents))["ids"]
            await indexed(http, document)


async def created(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(url, json=body)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def indexed(http: httpx.AsyncClient, document_id: str) -> None:
    """Wait until the relay indexed the document (polled: it is a row's state)."""
    with anyio.fail_after(WAIT):
        while True:
            response = await http.get(f"/documents/{document_id}")
            response.raise_for_status()
            if response.json()["indexing_status"] == "completed":
                return
            await anyio.sleep(0.05)


if __name__ == "__main__":
    anyio.run(main)
