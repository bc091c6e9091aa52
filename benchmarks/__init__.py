"""Benchmarks: aioevents side by side with its peers and the raw asyncio/anyio idioms.

Run with ``nox -s bench`` (or ``python -m benchmarks [emit] [isolation] [--quick]``); see
README.md in this directory for what each table measures and the latest results.
"""
