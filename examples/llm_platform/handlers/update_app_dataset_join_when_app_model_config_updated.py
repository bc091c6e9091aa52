"""An app's dataset joins follow the datasets its model config uses."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..events import AppModelConfigWasUpdated
from ..models import AppModelConfig, valid_id
from ._common import Handler, sync_dataset_joins

logger = logging.getLogger(__name__)


def dataset_ids(config: AppModelConfig) -> set[str]:
    """The datasets of the agent's dataset tools and of the dataset configs, as the original.

    The config is JSON as saved: a part of another shape than expected is skipped, and so is
    an empty or malformed id (the web API refuses both with a 422; other callers may not).
    """
    tools = _list(_mapping(config.agent_mode).get("tools"))
    datasets = _mapping(_mapping(config.dataset_configs).get("datasets"))
    entries = [*tools, *_list(datasets.get("datasets"))]
    return {dataset_id for dataset_id in map(_dataset_id, entries) if dataset_id is not None}


def _dataset_id(entry: object) -> str | None:
    # An entry is {"dataset": {"enabled": true, "id": ...}}; tools of other kinds are skipped.
    if isinstance(entry, dict) and list(entry) == ["dataset"]:
        return valid_id(_mapping(entry["dataset"]).get("id"))
    return None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class UpdateAppDatasetJoinWhenAppModelConfigUpdated(Handler):
    async def __call__(self, event: AppModelConfigWasUpdated) -> None:
        async with self.deps.sessions.begin() as session:
            config = await session.get(AppModelConfig, event.app_model_config_id)
            if config is None:
                logger.warning("model config %s is gone", event.app_model_config_id)
                return
            added, removed = await sync_dataset_joins(session, event.app_id, dataset_ids(config))
        logger.info("dataset joins of app %s: %d added, %d removed", event.app_id, added, removed)
