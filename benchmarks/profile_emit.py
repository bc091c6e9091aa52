"""Profile aioevents' emit with pyinstrument, event loop included.

``python -m benchmarks.profile_emit [HANDLERS] [--raising]``: no-op handlers (16 by default);
with ``--raising`` the first one raises, and the ``aioevents`` logger goes to a NullHandler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from time import perf_counter

from pyinstrument import Profiler  # type: ignore[import-not-found, unused-ignore]  # bench env

from . import _contenders as c
from ._timing import Run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_emit")
    parser.add_argument("handlers", nargs="?", type=int, default=16)
    parser.add_argument("--raising", action="store_true", help="the first handler raises")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to profile")
    args = parser.parse_args()
    if args.raising:
        logger = logging.getLogger("aioevents")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    handlers = c.make_handlers(args.handlers, raising=0 if args.raising else None)
    run = c.aioevents_emit(handlers, c.Ping(seq=1))
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    asyncio.run(_profile(run, args.seconds, profiler))
    print(profiler.output_text(unicode=True, color=False, show_all=True))


async def _profile(run: Run, seconds: float, profiler: Profiler) -> None:
    started = perf_counter()
    await run(1000)  # warm-up, and the time one emit takes
    n = max(1, round(seconds * 1000 / (perf_counter() - started)))
    profiler.start()
    await run(n)
    profiler.stop()


if __name__ == "__main__":
    main()
