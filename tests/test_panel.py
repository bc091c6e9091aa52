"""aioevents.panel through httpx (ASGITransport): every route, on SQLite and PostgreSQL, with
the store queries behind it (attempt history, newest-first keyset pages, aggregates) and the
streams' dead letters on MemoryStreams and Redis.

Dead deliveries are made the real way: a relay runs a failing durable handler out of attempts.
"""

from __future__ import annotations

import importlib
import re
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.routing import Mount

from aioevents import Durable, EventBus
from aioevents.outbox import DeliveryStatus, Outbox
from aioevents.panel import Panel
from aioevents.panel import _render as render
from aioevents.panel import _views as views
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import MemoryStreams, Streams, Transport, consume

from .outbox_support import Database, eventually, open_database, record

pytestmark = pytest.mark.asyncio

BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]
QUICKLY = Durable(max_attempts=2, wait_initial=0.001, wait_max=0.001, wait_jitter=0)
FAILING, WORKING = "panel.failing", "panel.working"
MOUNT = "/ops/events"


@dataclass(frozen=True, slots=True, kw_only=True)
class Happening:
    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Broke(Happening):
    __event_name__ = "panel.broke"


@dataclass(frozen=True, slots=True, kw_only=True)
class Odd(Happening):
    __event_name__ = "panel.odd"


async def fail(event: object) -> None:
    raise ValueError(f"cannot handle {event!r}")


async def work(event: object) -> None:
    return None


def failing_bus(outbox: Outbox) -> tuple[EventBus, TransactionalEvents]:
    """A bus whose durable handler "panel.failing" always fails, "panel.working" never."""
    bus = EventBus()
    bus.subscribe(Happening, fail, name=FAILING, durable=QUICKLY)
    bus.subscribe(Happening, work, name=WORKING, durable=True)
    return bus, TransactionalEvents(bus, outbox=outbox)


async def dead_deliveries(db: Database, *items: object, key: str | None = None) -> list[int]:
    """Record ``items`` and run them: each leaves one dead and one completed delivery."""
    bus, events = failing_bus(db.outbox)
    before = await db.statuses()
    async with bus:
        for item in items:  # one transaction each: ids in recording order
            await record(db, events, item, key=key, headers={"traceparent": "00-ab-cd-01"})
        await db.wait_for_statuses(
            {
                "dead": before["dead"] + len(items),
                "completed": before["completed"] + len(items),
                **{s: n for s, n in before.items() if s not in ("dead", "completed")},
            }
        )
    dead = await db.outbox.deliveries(status="dead", limit=1000)
    return [d.id for d in dead][-len(items) :]


def client(panel: Panel) -> httpx.AsyncClient:
    """A browser at the panel mounted under MOUNT in an application of its own."""
    app = Starlette(routes=[Mount(MOUNT, panel)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://panel.test")


async def csrf_token(browser: httpx.AsyncClient) -> str:
    page = await browser.get(f"{MOUNT}/dead")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, "the dead-letter page has a CSRF field"
    assert browser.cookies.get("aioevents_panel_csrf") == found.group(1)
    return found.group(1)


def row_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-delivery-id="(\d+)"', html)]


def next_link(html: str) -> str | None:
    found = re.search(r'class="next-page" href="([^"]+)"', html)
    return None if found is None else found.group(1).replace("&amp;", "&")


# -- pages ------------------------------------------------------------------------------------


async def test_overview_counts_deliveries_by_status_and_recent_events(db: Database) -> None:
    await dead_deliveries(db, Broke(number=1), Broke(number=2))
    async with client(Panel(outbox=db.outbox, title="Ops")) as browser:
        page = await browser.get(f"{MOUNT}/")
        live = await browser.get(f"{MOUNT}/stats.json")
    assert page.status_code == 200
    assert '<td id="status-dead" class="status-dead">2</td>' in page.text
    assert '<td id="status-completed" class="status-completed">2</td>' in page.text
    assert f'data-poll="{MOUNT}/stats.json"' in page.text
    assert f'href="{MOUNT}/static/panel.css"' in page.text  # links under the mount point
    assert "<title>Overview · Ops</title>" in page.text
    stats = live.json()
    assert stats["statuses"] == {"pending": 0, "completed": 2, "dead": 2, "discarded": 0}
    assert stats["events_per_second"] == round(2 / 60, 3)
    assert stats["failures_per_second"] == round(4 / 60, 3)  # 2 events x 2 attempts


async def test_handlers_page_shows_counts_failure_rate_and_percentiles(db: Database) -> None:
    await dead_deliveries(db, Broke(number=1), Odd(number=3))
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/handlers")
    assert page.status_code == 200
    failing = _row(page.text, f'data-handler="{FAILING}"')
    working = _row(page.text, f'data-handler="{WORKING}"')
    # deliveries, pending, completed, dead, failed attempts, failure rate
    assert _cells(failing)[1:7] == ["2", "0", "0", "2", "4", "100.0 %"]
    assert _cells(working)[1:7] == ["2", "0", "2", "0", "0", "0.0 %"]
    assert _cells(working)[7].endswith(("µs", "ms"))  # p50 of the completed ones
    assert _cells(failing)[7] == "-"  # none completed


async def test_handler_stats_percentiles_interpolate_as_postgresql_does(db: Database) -> None:
    await dead_deliveries(db, Broke(number=1), Broke(number=2), Broke(number=3))
    working = [d.id for d in await db.outbox.deliveries(handler=WORKING)]
    d = db.deliveries
    async with db.engine.begin() as connection:
        for delivery_id, duration in zip(working, (4.0, 1.0, 2.0), strict=True):
            await connection.execute(
                d.update().where(d.c.id == delivery_id).values(duration=duration)
            )
    stats = {s.handler: s for s in await db.outbox.handler_stats()}
    assert await db.outbox.counts() == {
        (FAILING, DeliveryStatus.DEAD): 3,
        (WORKING, DeliveryStatus.COMPLETED): 3,
    }
    assert await db.outbox.counts("dead", DeliveryStatus.PENDING) == {
        (FAILING, DeliveryStatus.DEAD): 3
    }
    assert stats[WORKING].p50 == pytest.approx(2.0)
    assert stats[WORKING].p99 == pytest.approx(3.96)
    assert (stats[FAILING].p50, stats[FAILING].p99) == (None, None)
    assert stats[WORKING].failure_rate == 0.0
    assert stats[FAILING].failure_rate == 1.0


async def test_backlog_page_shows_pending_per_handler_and_per_key(db: Database) -> None:
    _, events = failing_bus(db.outbox)  # the bus is not running: its deliveries wait
    await record(db, events, Broke(number=1), Broke(number=2), key="tenant-7")
    await record(db, events, Odd(number=3))
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/deliveries")
    assert page.status_code == 200
    by_handler = _table(page.text, "backlog-handlers")
    assert [_cells(row)[:2] for row in by_handler] == [[FAILING, "3"], [WORKING, "3"]]
    by_key = _table(page.text, "backlog-keys")
    assert [_cells(row)[:3] for row in by_key] == [
        [FAILING, "tenant-7", "2"],
        [WORKING, "tenant-7", "2"],
    ]
    assert "Streams: groups" not in page.text  # no streams given


async def test_empty_pages_say_so(db: Database) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        handlers = await browser.get(f"{MOUNT}/handlers")
        backlog = await browser.get(f"{MOUNT}/deliveries")
        dead = await browser.get(f"{MOUNT}/dead")
    assert "No deliveries stored yet." in handlers.text
    assert "Nothing pending." in backlog.text and "No keyed deliveries pending." in backlog.text
    assert "No dead deliveries." in dead.text


async def test_dead_page_lists_newest_first_with_links_to_events(db: Database) -> None:
    ids = await dead_deliveries(db, Broke(number=1), Broke(number=2), Odd(number=3))
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/dead")
    assert page.status_code == 200
    assert row_ids(page.text) == sorted(ids, reverse=True)
    assert "builtins.ValueError" in page.text and "cannot handle" in page.text
    assert len(re.findall(f'class="event-link" href="{MOUNT}/event/', page.text)) == 3
    assert next_link(page.text) is None


async def test_dead_page_searches_by_event_handler_and_time(db: Database) -> None:
    broke = await dead_deliveries(db, Broke(number=1), Broke(number=2))
    odd = await dead_deliveries(db, Odd(number=3))
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with client(Panel(outbox=db.outbox)) as browser:
        by_event = await browser.get(f"{MOUNT}/dead", params={"event": "panel.odd"})
        by_handler = await browser.get(f"{MOUNT}/dead", params={"handler": WORKING})
        until_now = await browser.get(f"{MOUNT}/dead", params={"until": later})
        since_later = await browser.get(
            f"{MOUNT}/dead", params={"since": later, "event": "panel.broke"}
        )
        naive = await browser.get(f"{MOUNT}/dead", params={"since": "2000-01-01T00:00"})
    assert row_ids(by_event.text) == odd
    assert 'value="panel.odd"' in by_event.text  # the search form keeps what was asked
    assert row_ids(by_handler.text) == []  # the working handler has no dead deliveries
    assert row_ids(until_now.text) == sorted(broke + odd, reverse=True)
    assert row_ids(since_later.text) == []
    assert "No dead deliveries match." in since_later.text
    assert row_ids(naive.text) == sorted(broke + odd, reverse=True)


async def test_dead_page_pages_through_cursor_links(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    ids = await dead_deliveries(db, *(Broke(number=n) for n in range(5)))
    newest_first = sorted(ids, reverse=True)
    seen: list[int] = []
    async with client(Panel(outbox=db.outbox)) as browser:
        link: str | None = f"{MOUNT}/dead?handler={FAILING}"
        while link is not None:
            page = await browser.get(link)
            assert page.status_code == 200
            seen += row_ids(page.text)
            link = next_link(page.text)
            if link is not None:
                assert f"handler={FAILING}" in link  # the filters ride along
                assert 'class="first-page"' in (await browser.get(link)).text
    assert seen == newest_first


# -- the event page ---------------------------------------------------------------------------


async def test_event_page_shows_payload_headers_deliveries_and_every_attempt(
    db: Database,
) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=41))
    [dead] = [d for d in await db.outbox.deliveries(status="dead") if d.id == dead_id]
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/event/{dead.event_id}")
    assert page.status_code == 200
    assert "<h1>Event panel.broke</h1>" in page.text
    assert "&#34;number&#34;: 41" in page.text  # pretty-printed JSON
    assert "<th>traceparent</th><td><code>00-ab-cd-01</code></td>" in page.text
    statuses = re.findall(r'<td class="status status-\w+">(\w+)</td>', page.text)
    assert sorted(statuses) == ["completed", "dead"]
    attempts = _row(page.text, f'<table class="attempts" data-delivery-id="{dead_id}"')
    assert attempts.count("Traceback (most recent call last)") == 2
    assert "data-live" not in page.text  # nothing pending: no refresh


async def test_event_record_has_deliveries_and_attempt_history(db: Database) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=5))
    [dead] = [d for d in await db.outbox.deliveries(status="dead") if d.id == dead_id]
    found = await db.outbox.event(dead.event_id)
    assert found is not None
    assert (found.name, found.version, found.headers) == (
        "panel.broke",
        1,
        {"traceparent": "00-ab-cd-01"},
    )
    assert [(d.handler, d.status) for d in found.deliveries] == [
        (FAILING, DeliveryStatus.DEAD),
        (WORKING, DeliveryStatus.COMPLETED),
    ]
    assert [(a.delivery_id, a.attempt) for a in found.attempts] == [(dead_id, 1), (dead_id, 2)]
    for attempt in found.attempts:
        assert attempt.error_type == "builtins.ValueError"
        assert attempt.error_message == "cannot handle Broke(number=5)"
        assert attempt.error_traceback is not None and "ValueError" in attempt.error_traceback
        assert attempt.duration is not None and attempt.duration >= 0
        assert attempt.started_at <= attempt.finished_at
    assert all(d.duration is not None for d in found.deliveries)  # success and failure
    assert await db.outbox.event(uuid.uuid4()) is None


async def test_attempts_after_a_resubmit_follow_the_earlier_ones(db: Database) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=6))
    assert await db.outbox.resubmit([dead_id]) == 1
    bus, _ = failing_bus(db.outbox)
    async with bus:  # fails twice more: dead again
        await db.wait_for_statuses({"dead": 1, "completed": 1})
    [dead] = await db.outbox.deliveries(status="dead")
    found = await db.outbox.event(dead.event_id)
    assert found is not None
    assert [a.attempt for a in found.attempts] == [1, 2, 1, 2]  # as they happened
    assert [a.finished_at for a in found.attempts] == sorted(a.finished_at for a in found.attempts)


async def test_a_pending_delivery_makes_the_event_page_refresh_itself(db: Database) -> None:
    _, events = failing_bus(db.outbox)
    [recorded] = await record(db, events, Broke(number=1))
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/event/{recorded.event_id}")
    assert 'data-live="2000"' in page.text
    assert "A delivery is pending: this page refreshes itself." in page.text


async def test_an_unknown_event_is_404_and_a_malformed_id_400(db: Database) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        unknown = await browser.get(f"{MOUNT}/event/{uuid.uuid4()}")
        malformed = await browser.get(f"{MOUNT}/event/not-a-uuid")
        nowhere = await browser.get(f"{MOUNT}/nowhere")
    assert unknown.status_code == 404 and "no stored event" in unknown.text
    assert malformed.status_code == 400
    assert malformed.text == "event id: not a UUID: 'not-a-uuid'"
    assert nowhere.status_code == 404


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"before": "abc"}, "before: a delivery id (a positive integer), got 'abc'"),
        ({"before": "0"}, "before: a delivery id (a positive integer), got '0'"),
        ({"since": "yesterday"}, "since: an ISO 8601 time such as 2026-01-31T12:00, got"),
        ({"until": "2026-13-01"}, "until: an ISO 8601 time"),
    ],
)
async def test_bad_query_parameters_are_400_naming_them(
    db: Database, params: dict[str, str], message: str
) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/dead", params=params)
    assert page.status_code == 400
    assert page.text.startswith(message)


# -- actions ----------------------------------------------------------------------------------


async def test_retry_one_resubmits_it_and_says_so(db: Database) -> None:
    ids = await dead_deliveries(db, Broke(number=1), Broke(number=2))
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        back = "handler=panel.failing&before=999999&evil=http://elsewhere"
        answer = await browser.post(
            f"{MOUNT}/dead/retry", data={"csrf": token, "one": str(ids[0]), "back": back}
        )
        again = await browser.post(f"{MOUNT}/dead/retry", data={"csrf": token, "one": str(ids[0])})
        shown = await browser.get(answer.headers["location"])
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        f"{MOUNT}/dead?handler=panel.failing&before=999999&done=retried&count=1&asked=1"
    )
    assert "done=retried&count=0&asked=1" in again.headers["location"]  # only still-dead rows
    assert '<p class="flash">1 of 1 resubmitted</p>' in shown.text
    statuses = {d.id: d.status for d in await db.outbox.deliveries(handler=FAILING)}
    assert statuses == {ids[0]: DeliveryStatus.PENDING, ids[1]: DeliveryStatus.DEAD}


async def test_a_retried_delivery_runs_again_and_completes(db: Database) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=1))
    healed = EventBus()
    healed.subscribe(Broke, work, name=FAILING, durable=QUICKLY)
    async with client(Panel(outbox=db.outbox)) as browser, db.outbox.relay(healed):
        token = await csrf_token(browser)
        await browser.post(f"{MOUNT}/dead/retry", data={"csrf": token, "one": str(dead_id)})
        await db.wait_for_statuses({"completed": 2})


async def test_bulk_retry_and_discard_take_the_checked_rows(db: Database) -> None:
    ids = await dead_deliveries(db, *(Broke(number=n) for n in range(4)))
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        retried = await browser.post(
            f"{MOUNT}/dead/retry", data={"csrf": token, "id": [str(ids[0]), str(ids[1])]}
        )
        discarded = await browser.post(
            f"{MOUNT}/dead/discard", data={"csrf": token, "id": [str(i) for i in ids[1:]]}
        )
        shown = await browser.get(discarded.headers["location"])
    assert "done=retried&count=2&asked=2" in retried.headers["location"]
    # Only rows still dead are discarded: ids[1], retried since, stays pending; the last two go.
    assert "done=discarded&count=2&asked=3" in discarded.headers["location"]
    assert '<p class="flash">2 of 3 discarded</p>' in shown.text
    statuses = {d.id: d.status for d in await db.outbox.deliveries(handler=FAILING)}
    assert statuses == {
        ids[0]: DeliveryStatus.PENDING,
        ids[1]: DeliveryStatus.PENDING,
        ids[2]: DeliveryStatus.DISCARDED,
        ids[3]: DeliveryStatus.DISCARDED,
    }


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({}, "id: no row chosen"),
        ({"id": ["1", "x"]}, "id: a delivery id (a positive integer), got 'x'"),
        ({"id": [str(n) for n in range(1001)]}, "id: at most 1000 rows at once"),
    ],
)
async def test_bad_action_forms_are_400(db: Database, form: dict[str, Any], message: str) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        answer = await browser.post(f"{MOUNT}/dead/retry", data={"csrf": token, **form})
    assert answer.status_code == 400
    assert answer.text.startswith(message)


async def test_posts_without_a_matching_csrf_token_are_refused(db: Database) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=1))
    form = {"one": str(dead_id)}
    async with client(Panel(outbox=db.outbox)) as browser:
        no_cookie = await browser.post(f"{MOUNT}/dead/retry", data={**form, "csrf": "x" * 43})
        token = await csrf_token(browser)
        no_field = await browser.post(f"{MOUNT}/dead/retry", data=form)
        wrong = await browser.post(f"{MOUNT}/dead/discard", data={**form, "csrf": "y" * 43})
        cross_site = await browser.post(
            f"{MOUNT}/dead/retry",
            data={**form, "csrf": token},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        same_origin = await browser.post(
            f"{MOUNT}/dead/retry",
            data={**form, "csrf": token},
            headers={"Sec-Fetch-Site": "same-origin"},
        )
    for refused in (no_cookie, no_field, wrong, cross_site):
        assert refused.status_code == 403, refused.text
    assert no_cookie.text.startswith("refused: no CSRF token")
    assert wrong.text.startswith("refused: the CSRF token does not match")
    assert cross_site.text == "refused: a request from another site (cross-site)"
    assert same_origin.status_code == 303


async def test_the_csrf_cookie_is_set_once_on_the_mount_path(db: Database) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        first = await browser.get(f"{MOUNT}/dead")
        second = await browser.get(f"{MOUNT}/")
    cookie = first.headers["set-cookie"]
    assert f"Path={MOUNT}/" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "set-cookie" not in second.headers  # the browser's token is kept


async def test_a_read_only_panel_shows_no_actions_and_refuses_them(db: Database) -> None:
    [dead_id] = await dead_deliveries(db, Broke(number=1))
    async with client(Panel(outbox=db.outbox, read_only=True)) as browser:
        page = await browser.get(f"{MOUNT}/dead")
        token = browser.cookies["aioevents_panel_csrf"]
        answers = [
            await browser.post(f"{MOUNT}/{path}", data={"csrf": token, "one": str(dead_id)})
            for path in ("dead/retry", "dead/discard", "streams/retry", "streams/discard")
        ]
    assert row_ids(page.text) == [dead_id]
    assert "read-only" in page.text
    for hidden in ("retry-one", "discard-one", "retry-selected", "select-all", 'name="id"'):
        assert hidden not in page.text
    assert [a.status_code for a in answers] == [403] * 4
    assert answers[0].text == "refused: this panel is read-only"
    assert (await db.statuses())["dead"] == 1


async def test_static_assets_are_served_by_the_panel(db: Database) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        css = await browser.get(f"{MOUNT}/static/panel.css")
        js = await browser.get(f"{MOUNT}/static/panel.js")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert js.status_code == 200 and "select-all" in js.text


# -- streams ----------------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
    if request.param == "memory":
        yield MemoryStreams()
        return
    from aioevents.redis_streams import RedisStreams

    url = str(request.getfixturevalue("redis_url"))
    transport = RedisStreams(url)
    yield transport
    await transport.aclose()


@pytest.fixture
def prefix() -> str:
    return f"aioevents-panel-{secrets.token_hex(6)}"


@pytest_asyncio.fixture
async def cleanup_redis(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[None]:
    yield
    if "redis_url" in request.fixturenames:
        from .test_streams_conformance import _delete_keys

        await _delete_keys(str(request.getfixturevalue("redis_url")), prefix)


async def test_stream_dead_letters_are_listed_retried_and_discarded(
    db: Database, transport: Transport, prefix: str, cleanup_redis: None
) -> None:
    streams = Streams(transport, prefix=prefix)
    healthy = False
    handled: list[int] = []

    async def flaky(event: Broke) -> None:
        if not healthy:
            raise ValueError("stream handler down")
        handled.append(event.number)

    async def all_dead() -> bool:
        return len(await streams.dead_letters(Broke)) == 3

    async def retried_handled() -> bool:
        return handled == [0]

    bus = EventBus()
    bus.subscribe(Broke, flaky, name="panel.stream-flaky")
    consume(bus, Broke, streams=streams, max_deliveries=1, min_idle=60.0)
    panel = Panel(outbox=db.outbox, streams=streams, event_types=[Broke])
    async with bus, client(panel) as browser:
        for number in range(3):
            await streams.publish(Broke(number=number))
        await eventually(all_dead, "three stream dead letters")
        letters = sorted(await streams.dead_letters(Broke), key=lambda x: x.envelope.payload)
        page = await browser.get(f"{MOUNT}/dead")
        backlog = await browser.get(f"{MOUNT}/deliveries")
        token = await csrf_token(browser)
        healthy = True
        retried = await browser.post(
            f"{MOUNT}/streams/retry",
            data={"csrf": token, "event": "panel.broke", "one": letters[0].id},
        )
        await eventually(retried_handled, lambda: f"the retried letter handled ({handled})")
        discarded = await browser.post(
            f"{MOUNT}/streams/discard",
            data={"csrf": token, "event": "panel.broke", "id": [x.id for x in letters[1:]]},
        )
        shown = await browser.get(discarded.headers["location"])
    assert page.status_code == 200
    listed = re.findall(r'<tr data-letter-id="([^"]+)"', page.text)
    assert sorted(listed) == sorted(x.id for x in letters)
    assert "stream handler down" in page.text
    assert "panel.stream-flaky" in _table(backlog.text, "stream-groups")[0]
    assert "done=redriven&count=1&asked=1" in retried.headers["location"]
    assert "done=removed&count=2&asked=2" in discarded.headers["location"]
    assert "2 of 2 stream dead letters discarded" in shown.text
    assert await streams.dead_letters(Broke) == []
    assert handled == [0]


async def test_stream_actions_refuse_an_unknown_event_type_or_bad_ids(db: Database) -> None:
    streams = Streams(MemoryStreams(), prefix="aioevents-panel")
    async with client(Panel(outbox=db.outbox, streams=streams, event_types=[Broke])) as browser:
        token = await csrf_token(browser)
        unknown = await browser.post(
            f"{MOUNT}/streams/retry", data={"csrf": token, "event": "nope", "one": "1-0"}
        )
        bad_id = await browser.post(
            f"{MOUNT}/streams/discard", data={"csrf": token, "event": "panel.broke", "one": "x"}
        )
        gone = await browser.post(
            f"{MOUNT}/streams/retry", data={"csrf": token, "event": "panel.broke", "one": "1-0"}
        )
    assert unknown.status_code == 400
    assert unknown.text == "event: not an event type of this panel's streams: 'nope'"
    assert bad_id.status_code == 400 and "a dead letter id looks like" in bad_id.text
    assert "done=redriven&count=0&asked=1" in gone.headers["location"]


# -- construction, store queries -------------------------------------------------------------


async def test_importing_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.startswith("aioevents.panel")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if the extra were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'aioevents\[panel\]'") as caught:
        importlib.import_module("aioevents.panel")
    assert caught.value.name == "jinja2"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.000042, "42 µs"),
        (0.0123, "12.3 ms"),
        (3.25, "3.2 s"),
        (600, "10 min"),
        (9000, "2.5 h"),
    ],
)
async def test_durations_are_shown_in_a_readable_unit(seconds: float | None, shown: str) -> None:
    assert render._seconds(seconds) == shown


async def test_times_ago_and_payloads_that_are_not_json() -> None:
    assert render._ago(None) == render._when(None) == ""
    assert render._ago(datetime.now(UTC) + timedelta(minutes=10)).startswith("in ")
    assert render._pretty_json("{not json") == "{not json"


async def test_panel_refuses_bad_arguments(tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    outbox = Outbox(engine)
    with pytest.raises(TypeError, match="outbox"):
        Panel(outbox="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="streams"):
        Panel(outbox=outbox, streams="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="read_only"):
        Panel(outbox=outbox, read_only="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="title"):
        Panel(outbox=outbox, title=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of classes"):
        Panel(outbox=outbox, event_types=Broke)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes classes"):
        Panel(outbox=outbox, event_types=[Broke(number=1)])  # type: ignore[list-item]
    panel = Panel(outbox=outbox, title="Ops", read_only=True)
    assert repr(panel).startswith("<Panel 'Ops' of <Outbox") and "read_only=True" in repr(panel)
    await engine.dispose()


async def test_deliveries_newest_first_pages_by_keyset(db: Database) -> None:
    ids = await dead_deliveries(db, *(Broke(number=n) for n in range(5)))
    every = [d.id for d in await db.outbox.deliveries(limit=100)]
    newest = sorted(every, reverse=True)
    first = await db.outbox.deliveries(newest_first=True, limit=4)
    second = await db.outbox.deliveries(newest_first=True, before=first[-1].id, limit=4)
    assert [d.id for d in first] == newest[:4]
    assert [d.id for d in second] == newest[4:8]
    dead = await db.outbox.deliveries(status="dead", newest_first=True, before=ids[-1], limit=2)
    assert [d.id for d in dead] == [ids[3], ids[2]]
    with pytest.raises(TypeError, match="before"):
        await db.outbox.deliveries(before="7")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="newest_first"):
        await db.outbox.deliveries(newest_first=1)  # type: ignore[arg-type]


async def test_activity_and_backlog_refuse_bad_arguments(db: Database) -> None:
    with pytest.raises(TypeError, match="timedelta"):
        await db.outbox.activity(60)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="positive"):
        await db.outbox.activity(timedelta(0))
    with pytest.raises(TypeError, match="by_key"):
        await db.outbox.backlog(by_key="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uuid"):
        await db.outbox.event("not-a-uuid")  # type: ignore[arg-type]
    empty = await db.outbox.activity()
    assert (empty.events, empty.failures, empty.statuses) == (0, 0, {})


@pytest.mark.postgres
async def test_the_dead_page_query_uses_an_index_on_postgresql(
    database_url: str,
) -> None:
    async with open_database("postgresql", database_url) as pg:
        await dead_deliveries(pg, Broke(number=1))
        d = pg.deliveries
        async with pg.engine.connect() as connection:
            from sqlalchemy import text

            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            plan = "\n".join(
                row[0]
                for row in await connection.execute(
                    text(
                        f"EXPLAIN SELECT * FROM {d.name} WHERE status = 'dead' "
                        f"AND handler = :h ORDER BY id DESC LIMIT 51"
                    ),
                    {"h": FAILING},
                )
            )
    assert f"{pg.prefix}deliveries_dead_handler" in plan


# -- helpers ----------------------------------------------------------------------------------


def _row(html: str, marker: str) -> str:
    start = html.index(marker)
    end = html.find("</table>", start)
    return html[start : end if end != -1 else None]


def _table(html: str, table_id: str) -> list[str]:
    body = _row(html, f'id="{table_id}"')
    return re.findall(r"<tr>(.*?)</tr>", body.split("<tbody>", 1)[1], re.S)


def _cells(row: str) -> list[str]:
    return [
        re.sub(r"<[^>]+>", "", cell).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    ]
