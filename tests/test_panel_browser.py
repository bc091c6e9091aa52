"""aioevents.panel in a real browser: Debian's chromium, driven by Playwright, against the panel
served by uvicorn on a loopback port, mounted under ``/events`` in a Starlette app (so its
links must keep the mount point: the test follows them as a user does).

The app's outbox is on SQLite (a file in the test's directory) and its bus runs in the server:
three deliveries completed, and one dead, of a durable handler that fails until the test heals
it. The test opens the overview and the dead-letter page, saves screenshots of both (in the
test's directory and in ``$AIOEVENTS_SCREENSHOTS``, by default ``build/screenshots/`` in the
repository), clicks the dead delivery's Retry and waits for its event page to show it
completed, its two failed attempts kept. Every wait is for a state, with a generous limit: a
loaded machine is only slower.

Without chromium at ``/usr/bin/chromium`` the test skips locally and fails under ``CI=true``
(CI installs Debian's package; a browser is never downloaded).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import anyio
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.routing import Mount

from aioevents import Durable, EventBus
from aioevents.outbox import DeliveryStatus, Outbox
from aioevents.panel import Panel
from aioevents.sqlalchemy import TransactionalEvents

from .browser_support import LAUNCH_ARGS, chromium_path

REPOSITORY = Path(__file__).resolve().parents[1]
DEADLINE = 60.0  # seconds any state may take to show, however loaded the machine
SHIPPED = 3  # parcels shipped: each one completed delivery


@dataclass(frozen=True, slots=True, kw_only=True)
class ParcelWasShipped:
    parcel_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParcelWasLost:
    parcel_id: str


async def notify_customer(event: ParcelWasShipped) -> None:
    """A durable handler that always succeeds."""


class CarrierClaims:
    """A durable handler that fails (a carrier's API down) until the test heals it."""

    def __init__(self) -> None:
        self.healed = threading.Event()  # set by the test's thread, read in the server's

    async def __call__(self, event: ParcelWasLost) -> None:
        if not self.healed.is_set():
            raise ConnectionError(f"carrier API down: no claim for parcel {event.parcel_id}")


@dataclass
class Served:
    """The panel's address, the handler that fails until healed, and its dead delivery."""

    panel_url: str
    claims: CarrierClaims
    dead_id: int = 0  # known once the server started


def shop_app(database: Path, served: Served) -> Starlette:
    """The panel mounted at ``/events`` on an outbox whose bus runs in the app's lifespan.

    Made in the test's thread, used in the server's: nothing here connects or starts yet.
    """
    engine = create_async_engine(f"sqlite+aiosqlite:///{database}")
    outbox = Outbox(engine, poll_interval=0.1)
    bus = EventBus()
    bus.subscribe(ParcelWasShipped, notify_customer, name="notify_customer", durable=True)
    # Dead after two quick failures; no backoff, so it is dead at once.
    twice = Durable(max_attempts=2, wait_initial=0.0, wait_jitter=0.0)
    bus.subscribe(ParcelWasLost, served.claims, name="open_carrier_claim", durable=twice)
    events = TransactionalEvents(bus, outbox=outbox)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await outbox.create_tables()
        try:
            async with bus:  # runs the relay that delivers, and later runs the retry
                async with sessions.begin() as session:
                    for number in range(SHIPPED):
                        events.record(session, ParcelWasShipped(parcel_id=f"p{number}"))
                    events.record(session, ParcelWasLost(parcel_id="p9"))
                served.dead_id = await _settled(outbox)
                yield
        finally:
            await engine.dispose()

    return Starlette(routes=[Mount("/events", app=Panel(outbox=outbox))], lifespan=lifespan)


async def _settled(outbox: Outbox) -> int:
    """Wait until every shipped parcel's delivery completed and the lost one's is dead;
    return the dead one's id."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        completed = await outbox.deliveries(status=DeliveryStatus.COMPLETED)
        dead = await outbox.deliveries(status=DeliveryStatus.DEAD)
        if len(completed) == SHIPPED and len(dead) == 1:
            return dead[0].id
        await anyio.sleep(0.05)
    raise TimeoutError(f"the deliveries did not settle within {DEADLINE:g} s")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The shop app under uvicorn, in a thread, on a free loopback port."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    served = Served(f"http://127.0.0.1:{port}/events/", CarrierClaims())
    app = shop_app(tmp_path / "shop.sqlite3", served)
    # ws="none": no websockets library is imported (its deprecations would be errors here).
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    try:
        _wait_until_started(server, thread)
        yield served
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        listening.close()
    assert not thread.is_alive(), "the server did not stop"


def _wait_until_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + DEADLINE
    while not server.started:
        if not thread.is_alive():
            pytest.fail("the server stopped while starting (see its log above)", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not start within {DEADLINE:g} s", pytrace=False)
        time.sleep(0.05)


@pytest.fixture
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=LAUNCH_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(DEADLINE * 1000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"the panel's scripts failed: {errors}"


def screenshot(page: Page, name: str, tmp_path: Path) -> Path:
    """Save a screenshot of the whole page in the test's directory and in the run's."""
    taken = tmp_path / f"{name}.png"
    page.screenshot(path=taken, full_page=True)
    kept = Path(os.environ.get("AIOEVENTS_SCREENSHOTS") or REPOSITORY / "build" / "screenshots")
    kept.mkdir(parents=True, exist_ok=True)
    # Copied, then renamed into place: runs on several Pythons at once never mix their files.
    copy = kept / f".{taken.name}.{os.getpid()}"
    shutil.copyfile(taken, copy)
    copy.replace(kept / taken.name)
    return taken


@pytest.mark.timeout(240)  # a browser's start and a relay's retry, on a loaded machine
def test_a_dead_delivery_retried_in_the_browser_completes(
    served: Served, page: Page, tmp_path: Path
) -> None:
    dead_id = served.dead_id
    page.goto(served.panel_url)
    expect(page.locator("#status-completed")).to_have_text(re.compile(rf"\b{SHIPPED}\b"))
    expect(page.locator("#status-dead")).to_have_text(re.compile(r"\b1\b"))
    assert screenshot(page, "panel-overview", tmp_path).stat().st_size > 0

    # Followed as a user does, from the overview: the link must keep the mount point.
    page.locator("nav").get_by_role("link", name="Dead letters").click()
    expect(page).to_have_url(f"{served.panel_url}dead")
    row = page.locator(f"#dead-deliveries tr[data-delivery-id='{dead_id}']")
    expect(row).to_contain_text("open_carrier_claim")
    expect(row).to_contain_text("ConnectionError")
    assert screenshot(page, "panel-dead", tmp_path).stat().st_size > 0
    event_link = row.locator("a.event-link").get_attribute("href")
    assert event_link is not None

    served.claims.healed.set()
    row.locator("button.retry-one").click()
    expect(page.locator("p.flash")).to_contain_text("resubmitted")
    expect(row).to_have_count(0)  # resubmitted: pending, or completed already

    page.goto(urljoin(f"{served.panel_url}dead", event_link))  # relative to the dead page
    status = page.locator(f"#event-deliveries tr[data-delivery-id='{dead_id}'] td.status")
    # The event page reloads itself while a delivery is pending: it comes to show completed.
    expect(status).to_have_text("completed")
    attempts = page.locator(f"table.attempts[data-delivery-id='{dead_id}'] tbody tr")
    expect(attempts).to_have_count(2)
    expect(attempts.first).to_contain_text("ConnectionError")
    screenshot(page, "panel-event", tmp_path)
