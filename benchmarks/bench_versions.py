"""Scenario: emit across the Python versions of this machine, in one interleaved run.

Issue 14's goal 2 compares aioevents on Python 3.12+ with its own time on 3.11 "in the same
run", and with a raw TaskGroup whose loop starts tasks eagerly (`asyncio.eager_task_factory`,
3.12+). Absolute times on this shared machine move by up to 1.6x between runs minutes apart,
so timing each Python in a session of its own and dividing afterwards would mostly measure
the machine's spells. Instead one long-lived worker process per Python (``benchmarks._worker``,
the same `_floors` code over the same aioevents source tree) takes requests from this process,
and every case of every Python runs once per repetition, in rotated order, as the in-process
tables do: the ratios are taken within each repetition, between runs milliseconds apart.

The interpreters: this process's own, and each ``--python 3.X=PATH`` given to the runner (the
nox bench session passes every other Python it found, each in a virtualenv with aioevents).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import aioevents

from ._timing import Case, Goal, Run, Sample, Settings, Skipped, Verdict, measure, print_table

COUNTS = (4, 16)
VERSION_LIMIT = 0.5  # 4 no-op handlers on 3.12+: at most half of this version's time on 3.11
EAGER_LIMIT = 0.90  # aioevents ÷ raw TaskGroup on an eager_task_factory loop, 4 and 16
BASELINE = (3, 11)


class Worker:
    """One Python's timing process; asked for one timed run at a time."""

    def __init__(self, version: str, executable: str) -> None:
        self.version = version
        self.process = subprocess.Popen(
            [executable, "-m", "benchmarks._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Where this process found the benchmarks package: the worker then imports the
            # same aioevents as this process (the directory comes first on its sys.path).
            cwd=Path(__file__).parent.parent,
        )
        hello = self._read()
        if hello["aioevents"] != aioevents.__file__:
            self.close()
            raise RuntimeError(
                f"Python {version} imported {hello['aioevents']}, not {aioevents.__file__}"
            )
        self.python = hello["python"]

    def _read(self) -> Any:
        line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"the Python {self.version} worker exited")
        return json.loads(line)

    @property
    def _stdout(self) -> IO[str]:
        assert self.process.stdout is not None
        return self.process.stdout

    def run(self, case: str, handlers: int) -> Run:
        async def run(n: int) -> float:
            # Blocking on the pipe stalls this process's loop, which has nothing else to do.
            assert self.process.stdin is not None
            request = {"case": case, "handlers": handlers, "n": n}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return float(self._read()["seconds"])

        return run

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def main(settings: Settings) -> list[Verdict]:
    pythons = {f"{sys.version_info[0]}.{sys.version_info[1]}": sys.executable}
    pythons.update(settings.pythons)
    workers = [Worker(version, path) for version, path in sorted(pythons.items(), key=_key)]
    try:
        columns = {f"{count} handlers": _column(workers, count, settings) for count in COUNTS}
    finally:
        for worker in workers:
            worker.close()
    print_table(
        "emit on every Python found, no-op handlers, interleaved across worker processes",
        columns,
    )
    found = ", ".join(f"{worker.version} ({worker.python})" for worker in workers)
    print(f"   Pythons: {found}")
    goals = _goals(columns, [worker.version for worker in workers])
    for goal in goals:
        print(f"   {goal}")
    return goals


def _key(item: tuple[str, str]) -> tuple[int, ...]:
    return tuple(map(int, item[0].split(".")))


def _aioevents(version: str) -> str:
    return f"aioevents  await bus.emit(ev), Python {version}"


def _eager(version: str) -> str:
    return f"raw asyncio.TaskGroup + try/except, eager_task_factory, Python {version}"


def _is_eager(version: str) -> bool:
    return _key((version, "")) >= (3, 12)


def _column(workers: Sequence[Worker], count: int, settings: Settings) -> dict[str, Sample]:
    cases = [Case(_aioevents(worker.version), worker.run("aioevents", count)) for worker in workers]
    cases += [
        Case(_eager(worker.version), worker.run("task group eager", count))
        for worker in workers
        if _is_eager(worker.version)
    ]
    return measure(cases, settings)


def _goals(columns: dict[str, dict[str, Sample]], versions: Sequence[str]) -> list[Verdict]:
    baseline = "{}.{}".format(*BASELINE)
    eager = [version for version in versions if _is_eager(version)]
    if not eager:
        reason = "no Python 3.12+ found on this machine"
        return [
            Skipped(f"[14.2] Python 3.12+, 4 handlers: aioevents ÷ its time on {baseline}", reason),
            Skipped("[14.2] Python 3.12+: aioevents ÷ raw TaskGroup, eager_task_factory", reason),
        ]
    goals: list[Verdict] = []
    four = columns["4 handlers"]
    for version in eager:
        text = f"[14.2] Python {version}, 4 handlers: aioevents ÷ aioevents on {baseline}"
        if baseline in versions:
            goals.append(
                Goal.ratio(
                    text,
                    four[_aioevents(version)],
                    four[_aioevents(baseline)],
                    VERSION_LIMIT,
                    "<=",
                )
            )
        else:
            goals.append(Skipped(text, f"no Python {baseline} found on this machine"))
        for label, column in columns.items():
            goals.append(
                Goal.ratio(
                    f"[14.2] Python {version}, {label}: aioevents ÷ raw TaskGroup, eager start",
                    column[_aioevents(version)],
                    column[_eager(version)],
                    EAGER_LIMIT,
                    "<=",
                )
            )
    return goals
