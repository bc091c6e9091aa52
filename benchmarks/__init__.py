"""Benchmarks: aioevents side by side with its peers and the raw asyncio/anyio idioms.

Run with ``nox -s bench`` (or ``python -m benchmarks [SCENARIO ...] [--quick]``, scenarios
emit, isolation, background, realistic, after-commit and provider-usage); see README.md in
this directory for what each one measures, the services the last four need, and the latest
results.
"""
