"""Profile aioevents' background delivery with pyinstrument, event loop included.

``python -m benchmarks.profile_background [--workers N] [--seconds S]``: bursts of 2,500
events to one no-op async handler, published inside ``async with bus:`` and drained, as in
scenario 3 (``bench_background.py``).
"""

from __future__ import annotations

import argparse
import asyncio
from time import perf_counter

from pyinstrument import Profiler  # type: ignore[import-not-found, unused-ignore]  # bench env

from aioevents import EventBus

from .bench_background import Stamped

BURST = 2_500


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_background")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long to profile")
    args = parser.parse_args()
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    asyncio.run(_profile(EventBus(workers=args.workers), args.seconds, profiler))
    print(profiler.output_text(unicode=True, color=False, show_all=True))


async def _handle(event: Stamped) -> None:
    pass


async def _burst(bus: EventBus) -> None:
    async with bus:
        for _ in range(BURST):
            await bus.publish(Stamped(at=perf_counter()))


async def _profile(bus: EventBus, seconds: float, profiler: Profiler) -> None:
    bus.subscribe(Stamped, _handle)
    started = perf_counter()
    await _burst(bus)  # warm-up, and the time one burst takes
    bursts = max(1, round(seconds / (perf_counter() - started)))
    profiler.start()
    for _ in range(bursts):
        await _burst(bus)
    profiler.stop()


if __name__ == "__main__":
    main()
