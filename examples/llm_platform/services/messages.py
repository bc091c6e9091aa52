"""Chat messages: a conversation and a message with its token counts."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from ..events import MessageWasCreated
from ..models import Account, App, AppModelConfig, Conversation, Message
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Invalid


def count_tokens(text: str) -> int:
    # Stands in for the model's tokenizer: the handlers only need a number per message.
    return len(text.split())


class MessageService(Service):
    async def send_message(
        self, app_id: str, account_id: str, query: str, *, conversation_id: str | None = None
    ) -> Done[Message]:
        """Store the message and its answer; then message-was-created.

        Its only handler, quota and last-use bookkeeping, is durable: the event and its
        delivery commit with the message, and the handler runs after the COMMIT on the
        relay, so the answer does not wait for it, nor is the charge lost if the process
        dies before it runs.
        """
        if not query.strip():
            raise Invalid("a message needs a query")
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
            uow.record(
                MessageWasCreated(
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
            )
        return uow.done(message)

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
