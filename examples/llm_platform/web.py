"""The platform over HTTP: FastAPI, JSON bodies, every call one transaction then its events.

Run it with ``uvicorn examples.llm_platform.web:app``. Refused input is a 4xx with a JSON
body (404 unknown id, 409 duplicate, 422 invalid), and since a service call is one
transaction, a refused call has changed nothing. Each write answers with the reports of the
events it emitted, so a failed handler is visible to the caller.

The lifespan runs the bus (``async with bus:``), and leaving it drains what is queued. What
is delivered in the background, and what is awaited:

- message-was-created (``POST /apps/{id}/messages``) is published in the background: its
  handler only books quota and ``last_used``, which the chat user never reads back, so the
  answer does not wait for it; on a running bus that handler is the batch variant, which
  writes each provider's quota once per batch instead of once per message.
- every other event is awaited after its commit, because the caller reads its handlers'
  work in the very next request (the app's site and installation, dataset joins, triggers
  and schedule, indexed documents, cleaned-up rows) and the response reports their failures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from aioevents import EmitResult

from .app import Platform, engine_and_cache_from_env, open_platform, throttle_from_env
from .queries import app_view, document_view
from .schemas import (
    DraftWorkflow,
    ModelConfig,
    NewAccount,
    NewApp,
    NewDataset,
    NewDocuments,
    NewFile,
    NewMessage,
    NewTenant,
)
from .services import Conflict, Invalid, NotFound, ServiceError, Services
from .uow import Done

PlatformOpener = Callable[[], AbstractAsyncContextManager[Platform]]


def open_from_env() -> AbstractAsyncContextManager[Platform]:
    engine, cache = engine_and_cache_from_env()
    return open_platform(engine, cache, throttle=throttle_from_env(), running=True)


def create_web_app(open_platform: PlatformOpener = open_from_env) -> FastAPI:
    """The web app; ``open_platform`` gives the platform its lifespan runs on."""

    @asynccontextmanager
    async def lifespan(web: FastAPI) -> AsyncIterator[None]:
        async with open_platform() as platform, platform.bus:
            web.state.platform = platform
            yield

    web = FastAPI(title="llm_platform", lifespan=lifespan)
    web.include_router(router)
    for error, status in ((NotFound, 404), (Conflict, 409), (Invalid, 422)):
        web.add_exception_handler(error, _error_response(status))
    return web


def _error_response(status: int) -> Callable[[Request, Exception], Any]:
    async def respond(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return JSONResponse({"error": str(exc)}, status_code=status)

    return respond


def _services(request: Request) -> Services:
    platform: Platform = request.app.state.platform
    return platform.services


def _platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


ServicesDep = Annotated[Services, Depends(_services)]
PlatformDep = Annotated[Platform, Depends(_platform)]


def answer(done: Done[Any], **body: Any) -> dict[str, Any]:
    """``body`` plus the reports of the events the call emitted."""
    return {**body, "events": [_report(report) for report in done.reports]}


def _report(report: EmitResult) -> dict[str, Any]:
    failed = [
        {"handler": error.handler_name, "error": repr(error.exception)} for error in report.errors
    ]
    return {"handlers": list(report.handlers), "failed": failed}


router = APIRouter()


@router.post("/tenants", status_code=201)
async def create_tenant(body: NewTenant, services: ServicesDep) -> dict[str, Any]:
    done = await services.tenants.create_tenant(body.name)
    return answer(done, id=done.value.id, name=done.value.name)


@router.patch("/tenants/{tenant_id}")
async def update_tenant(tenant_id: str, body: NewTenant, services: ServicesDep) -> dict[str, Any]:
    done = await services.tenants.update_tenant(tenant_id, body.name)
    return answer(done, id=done.value.id, name=done.value.name)


@router.post("/tenants/{tenant_id}/accounts", status_code=201)
async def create_account(tenant_id: str, body: NewAccount, services: ServicesDep) -> dict[str, Any]:
    done = await services.tenants.create_account(
        tenant_id, body.name, body.email, body.interface_language
    )
    return answer(done, id=done.value.id)


@router.post("/apps", status_code=201)
async def create_app(body: NewApp, services: ServicesDep) -> dict[str, Any]:
    done = await services.apps.create_app(
        body.tenant_id,
        body.account_id,
        body.name,
        body.mode,
        icon=body.icon,
        description=body.description,
    )
    return answer(done, id=done.value.id)


@router.get("/apps/{app_id}")
async def get_app(app_id: str, platform: PlatformDep) -> dict[str, Any]:
    async with platform.sessions() as session:
        return await app_view(session, app_id)


@router.put("/apps/{app_id}/model-config")
async def update_model_config(
    app_id: str, body: ModelConfig, services: ServicesDep
) -> dict[str, Any]:
    done = await services.apps.update_model_config(app_id, **body.model_dump())
    return answer(done, id=done.value.id)


@router.put("/apps/{app_id}/workflows/draft")
async def sync_draft(app_id: str, body: DraftWorkflow, services: ServicesDep) -> dict[str, Any]:
    done = await services.workflows.sync_draft(app_id, body.graph)
    return answer(done, id=done.value.id)


@router.post("/apps/{app_id}/workflows/publish")
async def publish(app_id: str, services: ServicesDep) -> dict[str, Any]:
    done = await services.workflows.publish(app_id)
    return answer(done, id=done.value.id, version=done.value.version)


@router.post("/apps/{app_id}/messages", status_code=201)
async def send_message(app_id: str, body: NewMessage, services: ServicesDep) -> dict[str, Any]:
    message = services.messages.send_message(
        app_id, body.account_id, body.query, conversation_id=body.conversation_id
    )
    done = await message
    return answer(
        done, id=done.value.id, conversation_id=done.value.conversation_id, answer=done.value.answer
    )


@router.post("/datasets", status_code=201)
async def create_dataset(body: NewDataset, services: ServicesDep) -> dict[str, Any]:
    done = await services.datasets.create_dataset(
        body.tenant_id,
        body.account_id,
        body.name,
        indexing_technique=body.indexing_technique,
        doc_form=body.doc_form,
    )
    return answer(done, id=done.value.id)


@router.delete("/datasets/{dataset_id}")
async def delete_dataset(dataset_id: str, services: ServicesDep) -> dict[str, Any]:
    return answer(await services.datasets.delete_dataset(dataset_id), id=dataset_id)


@router.post("/files", status_code=201)
async def upload_file(body: NewFile, services: ServicesDep) -> dict[str, Any]:
    done = await services.documents.upload_file(body.tenant_id, body.name, body.content)
    return answer(done, id=done.value.id)


@router.post("/datasets/{dataset_id}/documents", status_code=201)
async def create_documents(
    dataset_id: str, body: NewDocuments, services: ServicesDep
) -> dict[str, Any]:
    done = await services.documents.create_documents(dataset_id, body.file_ids)
    return answer(done, ids=[document.id for document in done.value])


@router.get("/documents/{document_id}")
async def get_document(document_id: str, platform: PlatformDep) -> dict[str, Any]:
    async with platform.sessions() as session:
        return await document_view(session, document_id)


@router.delete("/documents/{document_id}")
async def delete_document(document_id: str, services: ServicesDep) -> dict[str, Any]:
    return answer(await services.documents.delete_document(document_id), id=document_id)


app = create_web_app()
