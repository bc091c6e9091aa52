"""The README's picture of the operations panel: ``python -m examples.llm_platform.screenshot``.

It runs the demo's scenario three times on a SQLite file of its own (its durable deliveries
done), serves the web app on it as ``nox -s web`` does (uvicorn, in a process of its own, on a
free loopback port) and saves what Debian's chromium shows at ``/events/handlers`` (another
page with ``--page``), 1200 pixels wide and at most 800 high, to ``docs/panel.png`` (or the
path given). Needs the ``examples`` and ``dev`` extras (Playwright) and
``/usr/bin/chromium``; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from playwright.sync_api import FloatRect, Page, sync_playwright

from .app import open_platform
from .cache import MemoryCache
from .db import create_engine
from .deliveries import settled
from .scenario import run_scenario
from .uow import Done

T = TypeVar("T")

REPOSITORY = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
RUNS = 3  # of the scenario: enough rows for the panel's counts and rates to say something
WAIT = 60.0  # seconds the server may take to start, and each page to show


async def fill(database_url: str) -> None:
    """Run the scenario ``RUNS`` times on ``database_url`` and wait for its deliveries."""
    async with open_platform(create_engine(database_url), MemoryCache()) as platform:
        async with platform.bus:

            async def step(title: str, call: Awaitable[Done[T]]) -> T:
                return (await call).value

            for _ in range(RUNS):
                await run_scenario(platform.services, step, platform.cache.set)
            await settled(platform.outbox, within=WAIT)


@contextmanager
def served(database_url: str) -> Iterator[str]:
    """``examples.llm_platform.web:app`` under uvicorn on a free port; its base URL."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    command = [sys.executable, "-m", "uvicorn", "examples.llm_platform.web:app"]
    command += ["--fd", str(listening.fileno()), "--log-level", "warning"]
    environment = {**os.environ, "DATABASE_URL": database_url}
    server = subprocess.Popen(
        command, cwd=REPOSITORY, env=environment, pass_fds=[listening.fileno()]
    )
    try:
        wait_until_up(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(WAIT)
        listening.close()


def wait_until_up(url: str, server: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if httpx.get(f"{url}/events/").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the web app did not start at {url}")
        time.sleep(0.2)


def take(url: str, path: Path) -> None:
    """Save what chromium shows at ``url`` (a 1200x800 window) to ``path``."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            response = page.goto(url)
            if response is None or not response.ok:
                raise SystemExit(f"{url} answered {response and response.status}")
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=path, clip=content(page))
        finally:
            browser.close()


def content(page: Page) -> FloatRect:
    """The page's top, 1200 wide, down to the end of its content (800 high at most): no empty
    space below a short page."""
    bottom = page.locator("main").evaluate("main => main.getBoundingClientRect().bottom")
    return {"x": 0, "y": 0, "width": 1200, "height": min(800, float(bottom) + 24)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=REPOSITORY / "docs" / "panel.png")
    parser.add_argument("--page", default="handlers", help="the panel's page (default: handlers)")
    arguments = parser.parse_args(argv)
    path: Path = arguments.path
    with tempfile.TemporaryDirectory() as directory:
        database_url = f"sqlite:///{Path(directory) / 'panel.sqlite3'}"
        anyio.run(fill, database_url)
        with served(database_url) as url:
            take(f"{url}/events/{arguments.page}", path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
