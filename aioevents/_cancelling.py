"""What asyncio's count of a task's pending cancellations says, and where it misleads.

aioevents tells the emitter's own cancellation from a handler's doings by that count
(``Task.cancelling()``): a cancel scope or timeout that ends takes its own back. On trio,
cancellation is level-triggered and there is no count: these answer None and 0 there.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

__all__ = ["current_asyncio_task", "left_by_a_task_group", "pending_cancellations"]

_get_running_loop = asyncio._get_running_loop  # None when not on asyncio (trio)

# On Python 3.11 and 3.12 an asyncio.TaskGroup whose child failed cancels the task it runs in
# and leaves that task's count raised (fixed in 3.13).
_TASKGROUP_LEAVES_COUNT = sys.version_info < (3, 13)


def current_asyncio_task() -> asyncio.Task[Any] | None:
    """The running asyncio task; None on trio."""
    return asyncio.current_task() if _get_running_loop() is not None else None


def pending_cancellations(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations of ``task`` are pending (0 for None, that is on trio)."""
    return task.cancelling() if task is not None else 0


def left_by_a_task_group(failure: BaseException) -> bool:
    """True when a raised count may be what a failed TaskGroup left (3.11, 3.12): after its
    ExceptionGroup, a raised count is not somebody else's cancellation."""
    return _TASKGROUP_LEAVES_COUNT and isinstance(failure, BaseExceptionGroup)
