"""Chat messages: a conversation and a message with its token counts."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from aioevents import BusStateError

from ..events import MessageWasCreated
from ..models import Account, App, AppModelConfig, Conversation, Message
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Invalid

logger = logging.getLogger(__name__)


def count_tokens(text: str) -> int:
    # Stands in for the model's tokenizer: the handlers only need a number per message.
    return len(text.split())


class MessageService(Service):
    async def send_message(
        self, app_id: str, account_id: str, query: str, *, conversation_id: str | None = None
    ) -> Done[Message]:
        """Store the message and its answer; then message-was-created.

        When the bus runs (the web app), message-was-created is published in the background
        once the transaction has committed: its only handler does quota and last-use
        bookkeeping, nothing the chat user reads back, so the answer does not wait for it.
        A bus that does not run gets it emitted after the commit, as every other event.
        """
        if not query.strip():
            raise Invalid("a message needs a query")
        in_background = self._events.bus.running
        async with self.unit_of_work() as uow:
            app = await get_or_404(uow.session, App, app_id)
            await get_or_404(uow.session, Account, account_id)
            if app.app_model_config_id is None:
                raise Invalid(f"app {app_id} has no model config to answer with")
            config = await get_or_404(uow.session, AppModelConfig, app.app_model_config_id)
            conversation = await self._conversation(
                uow.session, app, account_id, query, conversation_id
            )
            answer = f"({config.model_id}) You said: {query}"
            message = Message(
                app_id=app.id,
                conversation_id=conversation.id,
                model_provider=config.provider,
                model_id=config.model_id,
                query=query,
                answer=answer,
                message_tokens=count_tokens(query),
                answer_tokens=count_tokens(answer),
            )
            uow.session.add(message)
            await uow.session.flush()
            created = MessageWasCreated(
                message_id=message.id,
                conversation_id=conversation.id,
                app_id=app.id,
                tenant_id=app.tenant_id,
                provider=config.provider,
                model=config.model_id,
                message_tokens=message.message_tokens,
                answer_tokens=message.answer_tokens,
                app_mode=app.mode,
            )
            if not in_background:
                uow.record(created)
        if in_background:
            await self._publish(created)
        return uow.done(message)

    async def _publish(self, event: MessageWasCreated) -> None:
        try:
            await self._events.bus.publish(event)
        except BusStateError:  # the bus stopped since the message began: it is shutting down
            logger.error("message-was-created of message %s not delivered", event.message_id)

    async def _conversation(
        self,
        session: AsyncSession,
        app: App,
        account_id: str,
        query: str,
        conversation_id: str | None,
    ) -> Conversation:
        if conversation_id is not None:
            conversation = await get_or_404(session, Conversation, conversation_id)
            if conversation.app_id != app.id:
                raise Invalid(f"conversation {conversation_id} belongs to another app")
            return conversation
        conversation = Conversation(app_id=app.id, from_account_id=account_id, name=query[:40])
        session.add(conversation)
        await session.flush()
        return conversation
