"""The platform over HTTP: FastAPI, JSON bodies, every call one transaction then its events.

Run it with ``uvicorn examples.llm_platform.web:app``. Refused input is a 4xx with a JSON
body (404 unknown id, 409 duplicate, 413 body over `MAX_BODY_BYTES`, 422 invalid), and since
a service call is one transaction, a refused call has changed nothing. Every error, FastAPI's
own included, has one body shape::

    {"error": "what went wrong", "fields": [{"field": "dataset_configs.datasets",
                                             "message": "Input should be ..."}]}

``fields`` names each invalid part of a 422's request (an empty list for other errors); the
input itself is never echoed back. Each write answers with the reports of the events it
emitted, so a failed handler is visible to the caller.

The lifespan runs the bus (``async with bus:``), and with it this process's outbox relay;
leaving it drains what is queued and gives back the deliveries not yet started. What is
awaited, and what is not:

- the durable handlers (`handlers.DURABLE`) are not awaited: they run on the relay right
  after the COMMIT, while the answer goes out: indexing new documents, cleaning up after a
  deleted document or dataset, charging a message to its provider. Their events are written
  to the outbox in the call's own transaction, so their work is done at least once even if
  this process dies right after the COMMIT (another process's relay, or this one restarted,
  runs it once its lease has run out). A caller follows the work where it shows: a
  document's ``indexing_status`` goes from ``waiting`` to ``completed``. Their failures are
  retried, not reported in the response.
- every other event's handlers are awaited after its commit, because the caller reads their
  work in the very next request (the app's site and installation, dataset joins, triggers
  and schedule) and the response reports their failures.

The operations panel (`aioevents.panel`) is mounted at ``/events``: the outbox's deliveries
by status, its backlog, its dead deliveries with retry and discard, each event with every
attempt. With ``OTEL_TRACES_EXPORTER=console`` every handler's run is printed as an
OpenTelemetry span (see `tracing`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aioevents import EmitResult
from aioevents.panel import Panel

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
from .tracing import hooks_from_env
from .uow import Done

PlatformOpener = Callable[[], AbstractAsyncContextManager[Platform]]

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body accepted; a larger one is refused with a 413 before it is read."""


def open_from_env() -> AbstractAsyncContextManager[Platform]:
    engine, cache = engine_and_cache_from_env()
    return open_platform(engine, cache, throttle=throttle_from_env(), hooks=hooks_from_env())


def create_web_app(
    open_platform: PlatformOpener = open_from_env, *, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The web app; ``open_platform`` gives the platform its lifespan runs on."""

    @asynccontextmanager
    async def lifespan(web: FastAPI) -> AsyncIterator[None]:
        async with open_platform() as platform, platform.bus:
            web.state.platform = platform
            web.state.panel = Panel(outbox=platform.outbox, title="llm_platform events")
            yield

    async def panel(scope: Scope, receive: Receive, send: Send) -> None:
        # The panel reads the platform's outbox, which the lifespan opens: it is made there.
        await web.state.panel(scope, receive, send)

    web = FastAPI(title="llm_platform", lifespan=lifespan)
    web.include_router(router)
    # Read-write: whoever reaches it can retry and discard deliveries. A real application
    # mounts it behind its own authentication (an operators-only middleware, or a gateway);
    # this example has no users to check.
    web.mount("/events", panel)
    web.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    for error, status in ((NotFound, 404), (Conflict, 409), (Invalid, 422)):
        web.add_exception_handler(error, _service_error(status))
    web.add_exception_handler(RequestValidationError, _invalid_request)
    web.add_exception_handler(StarletteHTTPException, _http_error)
    web.add_exception_handler(Exception, _internal_error)
    return web


def error_body(message: str, fields: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """The one shape of every error response."""
    return {"error": message, "fields": list(fields)}


def _service_error(status: int) -> Callable[[Request, Exception], Any]:
    async def respond(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return JSONResponse(error_body(str(exc)), status_code=status)

    return respond


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own body would echo each invalid input back whole: name the fields instead.
    assert isinstance(exc, RequestValidationError)
    fields = [
        {"field": _field_name(error["loc"]), "message": str(error["msg"])} for error in exc.errors()
    ]
    names = ", ".join(dict.fromkeys(field["field"] for field in fields))
    return JSONResponse(error_body(f"invalid request: {names}", fields), status_code=422)


def _field_name(loc: Sequence[str | int]) -> str:
    """``("body", "agent_mode", "tools", 0, "dataset")`` as ``agent_mode.tools[0].dataset``."""
    where, *path = loc
    if where == "body" and path and isinstance(path[0], str):
        parts = path
    elif where == "body":
        parts = ["body"]  # the body itself, or its JSON syntax (located by an offset)
    else:
        parts = [where, *path]  # a path or query parameter
    name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return name.lstrip(".")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The server logs the exception; the caller learns only that it was not their fault.
    return JSONResponse(error_body("internal server error"), status_code=500)


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with a 413: at once if its Content-Length
    says so, else as soon as the bytes received pass it (a chunked body has no length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_length(scope) > self.max_bytes:
            response = JSONResponse(error_body(self._too_large()), status_code=413)
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _declared_length(self, scope: Scope) -> int:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return int(value) if value.isdigit() else 0
        return 0

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised where the route reads its body: the exception handlers answer 413.
                raise HTTPException(413, self._too_large())
            return message

        return counted

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"


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
    done = await services.apps.update_model_config(app_id, **body.model_dump(exclude_unset=True))
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
