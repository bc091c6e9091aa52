"""Run the benchmark scenarios: ``python -m benchmarks [SCENARIO ...] [--quick]``.

``--python 3.X=PATH`` (repeatable) adds a Python for the versions scenario: an interpreter with
aioevents and anyio installed (the nox bench session passes every other one it finds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from time import perf_counter

from . import (
    bench_background,
    bench_emit,
    bench_hooks,
    bench_invalidation,
    bench_isolation,
    bench_memory,
    bench_trio,
    bench_versions,
)
from ._timing import Settings, Skipped, Verdict, close_loops

# The database scenarios are imported when they run: they need the example app's
# dependencies (SQLAlchemy, asyncpg, redis), which the in-process scenarios do not.


def _realistic(settings: Settings) -> Sequence[Verdict]:
    from . import bench_realistic

    return bench_realistic.main(settings)


def _after_commit(settings: Settings) -> Sequence[Verdict]:
    from . import bench_after_commit

    return bench_after_commit.main(quick=settings.quick)


def _provider_usage(settings: Settings) -> Sequence[Verdict]:
    from . import bench_provider_usage

    return bench_provider_usage.main(quick=settings.quick)


def _outbox(settings: Settings) -> Sequence[Verdict]:
    from . import bench_outbox

    return bench_outbox.main(quick=settings.quick)


def _streams(settings: Settings) -> Sequence[Verdict]:
    from . import bench_streams

    return bench_streams.main(quick=settings.quick)


def _panel(settings: Settings) -> Sequence[Verdict]:
    from . import bench_panel

    return bench_panel.main(quick=settings.quick)


# realistic, after-commit, provider-usage, outbox and panel need PostgreSQL (provider-usage
# and streams Redis); each says so and is skipped when it cannot reach them.
SCENARIOS: dict[str, Callable[[Settings], Sequence[Verdict]]] = {
    "emit": bench_emit.main,
    "isolation": bench_isolation.main,
    "background": bench_background.main,
    "trio": bench_trio.main,
    "invalidation": bench_invalidation.main,
    "memory": bench_memory.main,
    "versions": bench_versions.main,
    "hooks": bench_hooks.main,
    "realistic": _realistic,
    "after-commit": _after_commit,
    "provider-usage": _provider_usage,
    "outbox": _outbox,
    "streams": _streams,
    "panel": _panel,
}
PACKAGES = (
    "aioevents", "anyio", "aiosignal", "blinker", "pyee", "bubus", "uvloop", "trio",
    "sqlalchemy", "asyncpg", "redis", "msgspec", "pgqueuer", "faststream",
)  # fmt: skip
FULL = Settings(repetitions=101, target=0.04)
QUICK = Settings(repetitions=3, target=0.01, quick=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke run: few, short repetitions"
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        type=_python,
        metavar="3.X=PATH",
        help="another Python to time emit on in the versions scenario (repeatable)",
    )
    args = parser.parse_args()
    if unknown := set(args.scenarios) - SCENARIOS.keys():
        parser.error(
            f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}"
        )
    settings = dataclasses.replace(QUICK if args.quick else FULL, pythons=tuple(args.python))
    print_environment(settings)
    started, goals = perf_counter(), list[Verdict]()
    try:
        for name in args.scenarios or SCENARIOS:
            scenario_started = perf_counter()
            goals += SCENARIOS[name](settings)
            print(f"\n({name}: {perf_counter() - scenario_started:.0f} s)")
    finally:
        close_loops()
    skipped = sum(isinstance(goal, Skipped) for goal in goals)
    judged = len(goals) - skipped
    print(f"\n== goals: {sum(goal.met for goal in goals)} of {judged} met, {skipped} skipped ==")
    for goal in goals:
        print(f"   {goal}")
    print(f"\ntotal {perf_counter() - started:.0f} s")


def _python(argument: str) -> tuple[str, str]:
    version, separator, path = argument.partition("=")
    if not separator or not version.startswith("3.") or not path:
        raise argparse.ArgumentTypeError(f"expected 3.X=PATH, got {argument!r}")
    return version, path


def print_environment(settings: Settings) -> None:
    python = f"Python {sys.version.split()[0]} ({platform.python_implementation()})"
    print(f"{python} on {platform.platform()}, {os.cpu_count()} CPUs")
    print("  ".join(f"{name} {_version(name)}" for name in PACKAGES))
    print(f"{settings.repetitions} interleaved repetitions per cell")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    main()
