"""A timing worker for the ``versions`` scenario: ``python -m benchmarks._worker``.

Runs on any Python with aioevents and anyio installed (no peer library). It answers one JSON
request a line on stdin, ``{"case": ..., "handlers": k, "n": n}``, with the seconds n emits of
that case took, and starts by saying which Python it is and which aioevents it imported.
Cases: ``aioevents`` and ``bare tasks`` on the default loop, ``task group`` on the default
loop, and ``task group eager`` on a loop whose task factory is `asyncio.eager_task_factory`
(Python 3.12+).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from collections.abc import Awaitable, Callable
from time import perf_counter

import aioevents

from . import _floors

BUILDERS = {
    "aioevents": (_floors.aioevents_emit, "default"),
    "bare tasks": (_floors.bare_tasks, "default"),
    "task group": (_floors.task_group, "default"),
    "task group eager": (_floors.task_group, "eager"),
}


def _eager_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined, unused-ignore]
    return loop


def main() -> None:
    runners = {"default": asyncio.Runner()}
    if sys.version_info >= (3, 12):
        runners["eager"] = asyncio.Runner(loop_factory=_eager_loop)
    runs: dict[tuple[str, int], Callable[[int], Awaitable[None]]] = {}
    hello = {"python": sys.version.split()[0], "aioevents": aioevents.__file__}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        key = request["case"], request["handlers"]
        build, loop = BUILDERS[request["case"]]
        if key not in runs:
            runs[key] = build(_floors.make_handlers(key[1]), _floors.Ping(seq=1))
        gc.collect()  # every run starts with the same clean heap, as in the main process
        seconds = runners[loop].run(_timed(runs[key], request["n"]))
        print(json.dumps({"seconds": seconds}), flush=True)
    for runner in runners.values():
        runner.close()


async def _timed(run: Callable[[int], Awaitable[None]], n: int) -> float:
    started = perf_counter()
    await run(n)
    return perf_counter() - started


if __name__ == "__main__":
    main()
