"""The handlers, one module each, named as in the original; wired by `router`.

`router` is the whole table of what handles what, but for the provider update on
message-was-created, which comes in two variants: `provider_usage_router` gives the one
``app.build_bus`` chooses. Nothing is subscribed by importing a module: the application
includes these routers into its bus.
"""

from __future__ import annotations

from aioevents import Router

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

__all__ = ["provider_usage_router", "router"]

BATCH_SIZE = 100
BATCH_WAIT = 1.0  # seconds a message's quota may lag behind it in the batch variant


def router(deps: Deps) -> Router:
    """Every handler of the platform, built with ``deps``, for `EventBus.include`."""
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
    routes.add(DocumentIndexCreated, CreateDocumentIndex(deps))
    routes.add(DocumentWasDeleted, CleanWhenDocumentDeleted(deps))
    routes.add(DatasetWasDeleted, CleanWhenDatasetDeleted(deps))
    return routes


def provider_usage_router(deps: Deps, *, batched: bool) -> Router:
    """The provider update on message-was-created: per message, or ``batched``.

    Exactly one of the two must be wired, or every message would be charged twice. The batch
    variant only works on a running bus (``async with bus:``), which collects the batches.
    """
    routes = Router()
    if batched:
        routes.on_batch(MessageWasCreated, max_size=BATCH_SIZE, max_wait=BATCH_WAIT)(
            UpdateProviderWhenMessagesCreated(deps)
        )
    else:
        routes.add(MessageWasCreated, UpdateProviderWhenMessageCreated(deps))
    return routes
