"""The original LLM-app platform's events module, rebuilt on aioevents.

Ten typed events, twelve handlers each in its own transaction, a service layer that commits
and only then emits, a FastAPI app, and a demo (``python -m examples.llm_platform``) that runs
the whole flow on SQLite, or on PostgreSQL and Redis when ``DATABASE_URL`` and ``REDIS_URL``
are set.
"""
