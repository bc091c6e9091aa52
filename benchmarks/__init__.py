"""Benchmarks: aioevents side by side with its peers, the raw asyncio/anyio/trio idioms and the
floors (bare tasks, a plain queue).

Run with ``nox -s bench`` (or ``python -m benchmarks [SCENARIO ...] [--quick] [--python
3.X=PATH ...]``, scenarios emit, isolation, background, trio, invalidation, memory, versions,
realistic, after-commit and provider-usage); see README.md in this directory for what each one
measures, the services the last three need, and the latest results.
"""
