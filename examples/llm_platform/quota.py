"""What a message costs against a hosted provider's quota, and the trial a tenant starts with.

The hosting configuration, as in the original: each quota type counts its own unit, and
credits are priced per model. A provider row's ``quota_type`` picks the unit; its
``quota_limit`` of -1 means unlimited, which is never charged. A new tenant gets a system
provider row with a trial quota for each hosted provider (`TRIAL_QUOTAS`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from .events import MessageWasCreated

UNLIMITED: Final = -1


class QuotaUnit(enum.StrEnum):
    TOKENS = "tokens"  # the message's and the answer's tokens
    CREDITS = "credits"  # the model's price per message, from the price table
    TIMES = "times"  # one per message


# Credits per message by model; a model missing here costs DEFAULT_CREDITS.
MODEL_CREDITS: Final[Mapping[str, int]] = {
    "gpt-4o": 20,
    "gpt-4o-mini": 1,
    "gpt-4.1": 30,
    "claude-3-5-sonnet": 20,
    "claude-3-5-haiku": 2,
    "gemini-1.5-pro": 15,
}
DEFAULT_CREDITS: Final = 1


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """Which unit each quota type counts, and the credit price of each model."""

    units: Mapping[str, QuotaUnit] = field(
        default_factory=lambda: {
            "trial": QuotaUnit.TIMES,
            "free": QuotaUnit.TOKENS,
            "paid": QuotaUnit.CREDITS,
        }
    )
    model_credits: Mapping[str, int] = field(default_factory=lambda: MODEL_CREDITS)
    default_credits: int = DEFAULT_CREDITS

    def units_used(self, quota_type: str, event: MessageWasCreated) -> int | None:
        """What ``event`` costs against a quota of ``quota_type``; None for an unknown type."""
        unit = self.units.get(quota_type)
        if unit is QuotaUnit.TOKENS:
            return event.message_tokens + event.answer_tokens
        if unit is QuotaUnit.CREDITS:
            return self.model_credits.get(event.model, self.default_credits)
        if unit is QuotaUnit.TIMES:
            return 1
        return None


HOSTED: Final = QuotaPolicy()


TRIAL_QUOTAS: Final[Mapping[str, int]] = {"anthropic": 200, "openai": 200}
"""The hosted providers a new tenant may try, and how many messages (the ``trial`` quota
type counts `QuotaUnit.TIMES`) each trial allows."""


HOSTED_PLUGINS: Final = "langgenius/"
"""The organisation of the original's own provider plugins, whose providers the provider rows
name without it."""


def provider_name(name: str) -> str:
    """The name of the provider row that ``name`` means: a plugin-style name of the original's
    own plugins, ``langgenius/openai/openai`` (organisation/plugin/provider), is the provider
    ``openai``, as the original treats the two; any other name is kept."""
    parts = name.split("/")
    if name.startswith(HOSTED_PLUGINS) and len(parts) == 3 and parts[2]:
        return parts[2]
    return name
