"""An app's dataset joins follow the datasets its model config uses."""

from __future__ import annotations

import logging
from typing import Any

from ..events import AppModelConfigWasUpdated
from ..models import AppModelConfig
from ._common import Handler, sync_dataset_joins

logger = logging.getLogger(__name__)


def dataset_ids(config: AppModelConfig) -> set[str]:
    """The datasets of the agent's dataset tools and of the dataset configs, as the original."""
    ids = set()
    for tool in config.agent_mode.get("tools") or ():
        ids.add(_dataset_id(tool))
    for entry in (config.dataset_configs.get("datasets") or {}).get("datasets") or ():
        ids.add(_dataset_id(entry))
    ids.discard(None)
    return {str(dataset_id) for dataset_id in ids}


def _dataset_id(entry: Any) -> Any:
    # An entry is {"dataset": {"enabled": true, "id": ...}}; tools of other kinds are skipped.
    if (
        isinstance(entry, dict)
        and list(entry) == ["dataset"]
        and isinstance(entry["dataset"], dict)
    ):
        return entry["dataset"].get("id")
    return None


class UpdateAppDatasetJoinWhenAppModelConfigUpdated(Handler):
    async def __call__(self, event: AppModelConfigWasUpdated) -> None:
        async with self.deps.sessions.begin() as session:
            config = await session.get(AppModelConfig, event.app_model_config_id)
            if config is None:
                logger.warning("model config %s is gone", event.app_model_config_id)
                return
            added, removed = await sync_dataset_joins(session, event.app_id, dataset_ids(config))
        logger.info("dataset joins of app %s: %d added, %d removed", event.app_id, added, removed)
