"""Events about chat messages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageWasCreated:
    message_id: str
    conversation_id: str
    app_id: str
    tenant_id: str
    provider: str
    model: str
    message_tokens: int
    answer_tokens: int
    # The app's mode: only chat and agent-chat messages charge their provider. "chat" when
    # not given, the mode of most messages.
    app_mode: str = "chat"
