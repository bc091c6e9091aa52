"""The handlers, one module each, named as in the original; wired by `router`.

`router` is the whole table of what handles what, but for the provider update on
message-was-created, which comes in two variants: `provider_usage_router` gives the durable
one ``app.build_bus`` wires. Nothing is subscribed by importing a module: the application
includes these routers into its bus.

Four handlers are durable: their events, recorded in the publisher's transaction, reach them
through the outbox (`aioevents.outbox`), at least once, retried across processes until they
succeed. They are the ones whose work must not be lost to a crash between the publisher's
COMMIT and the handler: indexing a document, cleaning up after a deleted document or dataset,
and charging a message to its provider. Each is idempotent, as a handler that may run twice
must be (see each module). The others rebuild what they own from the rows each time and are
run in memory after the COMMIT, as before.

Three of the durable ones are heavy (`heavy_router`, their events `HEAVY_EVENTS`): indexing a
document, and cleaning up after a deleted document or dataset. A process can leave them to
worker processes instead of running them (see `examples.llm_platform.offload`).
"""

from __future__ import annotations

from aioevents import Durable, Router

from ..deps import Deps
from ..events import (
    AppDraftWorkflowWasSynced,
    AppModelConfigWasUpdated,
    AppPublishedWorkflowWasUpdated,
    AppWasCreated,
    DatasetWasDeleted,
    DocumentIndexCreated,
    DocumentWasDeleted,
    MessageWasCreated,
)
from .clean_when_dataset_deleted import CleanWhenDatasetDeleted
from .clean_when_document_deleted import CleanWhenDocumentDeleted
from .create_document_index import CreateDocumentIndex
from .create_installed_app_when_app_created import CreateInstalledAppWhenAppCreated
from .create_site_record_when_app_created import CreateSiteRecordWhenAppCreated
from .delete_tool_parameters_cache_when_sync_draft_workflow import (
    DeleteToolParametersCacheWhenSyncDraftWorkflow,
)
from .sync_plugin_trigger_when_app_created import SyncPluginTriggerWhenAppCreated
from .sync_webhook_when_app_created import SyncWebhookWhenAppCreated
from .sync_workflow_schedule_when_app_published import SyncWorkflowScheduleWhenAppPublished
from .update_app_dataset_join_when_app_model_config_updated import (
    UpdateAppDatasetJoinWhenAppModelConfigUpdated,
)
from .update_app_dataset_join_when_app_published_workflow_updated import (
    UpdateAppDatasetJoinWhenAppPublishedWorkflowUpdated,
)
from .update_app_triggers_when_app_published_workflow_updated import (
    UpdateAppTriggersWhenAppPublishedWorkflowUpdated,
)
from .update_provider_when_message_created import (
    UpdateProviderWhenMessageCreated,
    UpdateProviderWhenMessagesCreated,
)

__all__ = ["DURABLE", "HEAVY_EVENTS", "heavy_router", "provider_usage_router", "router"]

BATCH_SIZE = 100
BATCH_WAIT = 1.0  # seconds a message's quota may lag behind it in the batch variant

DURABLE = Durable(max_attempts=8, wait_initial=1.0, wait_max=60.0)
"""How the durable handlers are retried: 8 attempts, the waits doubling from 1 s to at most a
minute (about 2 minutes in all); then the delivery is dead, kept with its error for an
operator to resubmit or discard (`aioevents.outbox.Outbox.resubmit`)."""

# The heavy ones: in the original each of these handlers only queues a Celery task, because
# the work is long (indexing computes the embeddings of every segment; the clean-ups delete
# vectors from the index store and files from storage) and must not hold up the web process.
# The provider update is not heavy: an UPDATE or two per message, and the original runs it
# in the request.
HEAVY_EVENTS: tuple[type, ...] = (DocumentIndexCreated, DocumentWasDeleted, DatasetWasDeleted)
"""The events of the heavy handlers (`heavy_router`), one handler each."""


def router(deps: Deps, *, indexing_pause: float = 0.0, heavy: bool = True) -> Router:
    """Every handler of the platform, built with ``deps``, for `EventBus.include`.

    The durable handlers are named: stored deliveries are addressed by handler name, which
    must outlive a rename or a move of the class (a default name is its module path).
    ``indexing_pause``: see `CreateDocumentIndex`. ``heavy=False`` leaves out the heavy
    handlers (`heavy_router`): a process that externalizes their events to workers.
    """
    plugin_triggers = SyncPluginTriggerWhenAppCreated(deps)
    webhooks = SyncWebhookWhenAppCreated(deps)
    routes = Router()
    routes.add(AppWasCreated, CreateInstalledAppWhenAppCreated(deps))
    routes.add(AppWasCreated, CreateSiteRecordWhenAppCreated(deps))
    routes.add(AppModelConfigWasUpdated, UpdateAppDatasetJoinWhenAppModelConfigUpdated(deps))
    routes.add(AppDraftWorkflowWasSynced, DeleteToolParametersCacheWhenSyncDraftWorkflow(deps))
    routes.add(AppDraftWorkflowWasSynced, plugin_triggers)
    routes.add(AppDraftWorkflowWasSynced, webhooks)
    routes.add(AppPublishedWorkflowWasUpdated, plugin_triggers)
    routes.add(AppPublishedWorkflowWasUpdated, webhooks)
    routes.add(AppPublishedWorkflowWasUpdated, SyncWorkflowScheduleWhenAppPublished(deps))
    routes.add(
        AppPublishedWorkflowWasUpdated, UpdateAppTriggersWhenAppPublishedWorkflowUpdated(deps)
    )
    routes.add(
        AppPublishedWorkflowWasUpdated, UpdateAppDatasetJoinWhenAppPublishedWorkflowUpdated(deps)
    )
    if heavy:
        routes.add_router(heavy_router(deps, indexing_pause=indexing_pause))
    return routes


def heavy_router(
    deps: Deps, *, indexing_pause: float = 0.0, durable: bool | Durable = DURABLE
) -> Router:
    """The heavy handlers, one for each of `HEAVY_EVENTS`: durable where the web process runs
    them; ``durable=False`` in a worker fed from streams, whose consumer groups (named, like
    the deliveries, after the handlers) retry them instead."""
    routes = Router()
    routes.add(
        DocumentIndexCreated,
        CreateDocumentIndex(deps, pause=indexing_pause),
        name="create_document_index",
        durable=durable,
    )
    routes.add(
        DocumentWasDeleted,
        CleanWhenDocumentDeleted(deps),
        name="clean_when_document_deleted",
        durable=durable,
    )
    routes.add(
        DatasetWasDeleted,
        CleanWhenDatasetDeleted(deps),
        name="clean_when_dataset_deleted",
        durable=durable,
    )
    return routes


def provider_usage_router(deps: Deps, *, batched: bool = False) -> Router:
    """The provider update on message-was-created: durable per message, or ``batched``.

    Exactly one of the two must be wired, or every message would be charged twice. The
    platform wires the durable one: a message's charge survives a crash of the process that
    answered it. The batch variant writes each provider's quota once per batch instead of
    once per message, but in memory: a batch not yet written when the process dies is never
    charged, and a durable handler cannot be a batch handler. It only works on a running bus
    (``async with bus:``), which collects the batches.
    """
    routes = Router()
    if batched:
        routes.on_batch(MessageWasCreated, max_size=BATCH_SIZE, max_wait=BATCH_WAIT)(
            UpdateProviderWhenMessagesCreated(deps)
        )
    else:
        routes.add(
            MessageWasCreated,
            UpdateProviderWhenMessageCreated(deps),
            name="update_provider_when_message_created",
            durable=DURABLE,
        )
    return routes
