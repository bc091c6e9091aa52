"""``python -m examples.llm_platform``: run the demo (see `examples.llm_platform.demo`)."""

from __future__ import annotations

from .demo import run

raise SystemExit(run())
