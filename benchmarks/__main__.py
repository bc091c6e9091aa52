"""Run the benchmark scenarios: ``python -m benchmarks [SCENARIO ...] [--quick]``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from time import perf_counter

from . import bench_emit, bench_isolation
from ._timing import Goal, Settings, close_loops

SCENARIOS: dict[str, Callable[[Settings], list[Goal]]] = {
    "emit": bench_emit.main,
    "isolation": bench_isolation.main,
}
PACKAGES = ("aioevents", "anyio", "aiosignal", "blinker", "pyee", "bubus", "uvloop")
FULL = Settings(repetitions=101, target=0.04)
QUICK = Settings(repetitions=3, target=0.01)


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
    args = parser.parse_args()
    if unknown := set(args.scenarios) - SCENARIOS.keys():
        parser.error(
            f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}"
        )
    settings = QUICK if args.quick else FULL
    print_environment(settings)
    started, goals = perf_counter(), list[Goal]()
    try:
        for name in args.scenarios or SCENARIOS:
            goals += SCENARIOS[name](settings)
    finally:
        close_loops()
    print(f"\n== goals: {sum(goal.met for goal in goals)} of {len(goals)} met ==")
    for goal in goals:
        print(f"   {goal}")
    print(f"\ntotal {perf_counter() - started:.0f} s")


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
