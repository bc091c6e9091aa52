"""The original LLM-app platform's events module, rebuilt on aioevents.

Ten typed events, twelve handlers each in its own transaction, a service layer that commits
and only then emits, a FastAPI app, and a demo (``python -m examples.llm_platform``) that runs
the whole flow on SQLite, or on PostgreSQL and Redis when ``DATABASE_URL`` and ``REDIS_URL``
are set. Four handlers are durable: their events are written to an outbox in the publishing
transaction and delivered at least once, by the running bus's relay or by a worker process
(``python -m aioevents relay examples.llm_platform.worker:bus``); ``--crash`` shows a worker
killed in the middle of that work, and a survivor finishing it.
"""
