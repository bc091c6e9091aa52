"""The handlers, one module each, named as in the original; wired by `router`.

`router` is the whole table of what handles what. Nothing is subscribed by importing a
module: the application includes this router into its bus (see ``app.build_bus``).
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

__all__ = ["router"]


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
