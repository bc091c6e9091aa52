"""A message charges its provider's hosted quota and marks the provider as used.

The original's one performance optimisation was to write ``last_used`` at most once per
five-minute window, remembered in Redis; it had four races, each fixed here:

- GET then SETEX let concurrent workers all write: the window is claimed atomically from an
  `aioevents.throttle.Throttle` (one ``SET NX PX`` on Redis), which fails open when Redis does;
- the window was claimed before a transaction that could roll back, losing ``last_used`` for
  the window: a failed transaction releases its claims;
- quota was deducted without an idempotency key, so a redelivered message charged twice: each
  charge inserts a ledger row keyed by the message id in the same transaction (the ledger is
  this handler's own inbox, so the durable variant, run at least once, needs no other:
  a delivery run again after a crash finds the row and charges nothing);
- updates to ``providers`` deadlocked: every transaction takes its locks in one order, ledger
  rows by message id, then provider rows by (tenant_id, provider_name).

`UpdateProviderWhenMessageCreated` does this per message (the platform wires it durable);
`UpdateProviderWhenMessagesCreated` per batch, for a running bus, with the quota summed per
provider and written once per batch (in memory, so not durable: see `provider_usage_router`).
Both run one transaction:

1. (before it) claim the ``last_used`` window of each (tenant, provider): no throttle call
   waits while rows are locked;
2. read the provider rows, without a lock: their type, quota type and limit pick the messages
   to charge and what each costs (a custom or unlimited provider's messages cost nothing);
3. insert a ledger row per chargeable message, sorted by message id, ``ON CONFLICT DO NOTHING
   RETURNING``: only the ids that come back are charged (a concurrent redelivery waits on the
   first one's row, then finds it);
4. one UPDATE per provider, in (tenant_id, provider_name) order: ``quota_used = quota_used +
   n`` computed in SQL and guarded in its WHERE (a system provider, ``quota_limit`` not -1 and
   above ``quota_used``), with ``last_used = now`` where its window was granted (on a window's
   first message the two share the statement; most messages only charge). Its row count says
   whether it charged: a quota found used up, when read or by the guard, charges nothing, its
   ledger rows say ``charged = false``, and a warning is logged.

A provider row is locked by nothing but that UPDATE, the last statement before the COMMIT:
the workers booking a busy provider queue for its row, and each holds it for one statement
and the commit. The common case, one message outside its window's first, folds steps 2 and 3
into one ``INSERT ... SELECT`` from the provider row, so it runs two statements (a custom or
unlimited provider's message one, which locks nothing). Statements are Core, not ORM: the
handler is bound by its CPU time per message long before the database is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import BigInteger, DateTime, String, Table, bindparam, case, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from aioevents.throttle import Claim

from ..deps import Deps
from ..events import MessageWasCreated
from ..models import Provider, ProviderUsage, utcnow
from ..quota import HOSTED, UNLIMITED, QuotaPolicy
from ._common import Handler

logger = logging.getLogger(__name__)

CHARGED_APP_MODES: Final = frozenset({"chat", "agent-chat"})
"""The apps whose messages charge their provider and mark it used, as in the original."""

LAST_USED_WINDOW: Final = 300.0
"""Seconds between two writes of a provider's ``last_used``, as in the original."""

PROVIDERS: Final = cast(Table, Provider.__table__)
LEDGER: Final = cast(Table, ProviderUsage.__table__)

Key = tuple[str, str]  # (tenant_id, provider_name): the order provider rows are locked in


def throttle_key(key: Key) -> str:
    return f"provider-last-used:{key[0]}:{key[1]}"


@dataclass(frozen=True, slots=True)
class Seen:
    """A provider row as read without a lock: what picks the messages to charge.

    It may be stale by the time the UPDATE locks the row: the UPDATE's guard decides.
    """

    provider_type: str
    quota_type: str
    quota_limit: int
    quota_used: int

    @property
    def hosted(self) -> bool:
        """A quota the platform charges: a system provider's, and not unlimited."""
        return self.provider_type == "system" and self.quota_limit != UNLIMITED

    @property
    def used_up(self) -> bool:
        return not self.quota_limit > self.quota_used


@dataclass(slots=True)
class Charge:
    """The messages of one provider whose ledger rows this transaction inserted."""

    charged: bool  # what their ledger rows say: whether the quota was not used up when read
    message_ids: list[str] = field(default_factory=list)
    units: int = 0


class ProviderUsageHandler(Handler):
    """What both variants share: the claims, the transaction, and what it writes."""

    def __init__(
        self, deps: Deps, *, last_used_window: float = LAST_USED_WINDOW, quota: QuotaPolicy = HOSTED
    ) -> None:
        super().__init__(deps)
        self.last_used_window = last_used_window
        self.quota = quota
        self._quota_types = tuple(quota.units)
        self._statements: dict[str, Statements] = {}  # by dialect name

    async def apply(self, events: Sequence[MessageWasCreated]) -> None:
        events = [event for event in events if event.app_mode in CHARGED_APP_MODES]
        if not events:
            return
        claims = {
            key: await self.deps.throttle.claim(throttle_key(key), self.last_used_window)
            for key in sorted({(event.tenant_id, event.provider) for event in events})
        }
        # One message and no window to write: its ledger INSERT reads the provider row.
        unread = len(events) == 1 and not any(claim.granted for claim in claims.values())
        providers: dict[Key, Seen] = {}
        try:
            async with self.deps.sessions.begin() as session:
                # Core statements on the session's connection: less CPU time per message.
                connection = await session.connection()
                sql = self._sql(connection)
                if unread:
                    charges = await self._charge_unread(connection, sql, events[0])
                else:
                    providers = await sql.read_providers(connection, list(claims))
                    charges = await self._charge(connection, sql, providers, events)
                keys = sorted(providers.keys() | charges.keys())
                gone = await self._update_providers(connection, sql, keys, claims, charges)
        except BaseException:
            await release(claims.values())  # nothing was written: the next message may write
            raise
        # Unread, no claim was granted: there is nothing to release, nor a row to miss.
        unknown = [key for key in claims if (not unread and key not in providers) or key in gone]
        for tenant_id, provider_name in unknown:
            logger.info("tenant %s has no provider %s: nothing to update", tenant_id, provider_name)
        await release(claims[key] for key in unknown)

    def _sql(self, connection: AsyncConnection) -> Statements:
        dialect = connection.dialect.name
        statements = self._statements.get(dialect)
        if statements is None:
            statements = self._statements[dialect] = Statements(dialect, self._quota_types)
        return statements

    async def _charge(
        self,
        connection: AsyncConnection,
        sql: Statements,
        providers: Mapping[Key, Seen],
        events: Sequence[MessageWasCreated],
    ) -> dict[Key, Charge]:
        """Write the ledger rows of messages seen first here; return them by provider."""
        entries = self._ledger_entries(providers, events)
        if not entries:
            return {}
        charges: dict[Key, Charge] = {}
        for message_id in sorted(await sql.insert_ledger(connection, list(entries.values()))):
            entry = entries[message_id]
            key = (entry["tenant_id"], entry["provider_name"])
            charge = charges.setdefault(key, Charge(charged=entry["charged"]))
            charge.message_ids.append(message_id)
            charge.units += entry["units"]
        return charges

    def _ledger_entries(
        self, providers: Mapping[Key, Seen], events: Iterable[MessageWasCreated]
    ) -> dict[str, dict[str, Any]]:
        """The ledger rows of the messages to charge, by message id; a hosted quota only."""
        entries: dict[str, dict[str, Any]] = {}
        now = utcnow()
        for event in events:
            provider = providers.get((event.tenant_id, event.provider))
            if provider is None or not provider.hosted:
                continue
            units = self.quota.units_used(provider.quota_type, event)
            if not units:
                continue
            entries[event.message_id] = {
                "message_id": event.message_id,
                "tenant_id": event.tenant_id,
                "provider_name": event.provider,
                "units": units,
                # As read: a quota used up then is not charged (one not used up then may be
                # by the time the UPDATE runs: its guard has the last word).
                "charged": not provider.used_up,
                "created_at": now,
            }
        return entries

    async def _charge_unread(
        self, connection: AsyncConnection, sql: Statements, event: MessageWasCreated
    ) -> dict[Key, Charge]:
        """`_charge` for one message, its ledger row inserted from the provider row read in
        the same statement; nothing for a custom, unlimited or unknown provider."""
        costs = [self.quota.units_used(quota_type, event) or 0 for quota_type in self._quota_types]
        if not any(costs):
            return {}
        key = (event.tenant_id, event.provider)
        inserted = await sql.insert_ledger_unread(connection, key, event.message_id, costs)
        if inserted is None:  # not a hosted quota, or the message was charged before
            return {}
        units, charged = inserted
        return {key: Charge(charged=charged, message_ids=[event.message_id], units=units)}

    async def _update_providers(
        self,
        connection: AsyncConnection,
        sql: Statements,
        keys: Iterable[Key],
        claims: Mapping[Key, Claim],
        charges: Mapping[Key, Charge],
    ) -> set[Key]:
        """At most one UPDATE per provider, in key order: its charge, and last_used if its
        window was granted. Return the keys whose row was gone by then."""
        now = utcnow()
        gone: set[Key] = set()
        for key in keys:
            charge, last_used = charges.get(key), now if claims[key].granted else None
            if charge is not None and charge.charged:
                if await sql.charge(connection, key, charge.units, last_used):
                    continue  # the common case
                await sql.mark_uncharged(connection, charge.message_ids)  # refused by the guard
            elif charge is None and last_used is None:
                continue  # nothing to charge, no window to write
            seen = await sql.mark_used(connection, key, last_used)  # and the row as it is now
            if seen is None:
                gone.add(key)
            if charge is not None:
                log_refused(key, seen, len(charge.message_ids))
        return gone


class UpdateProviderWhenMessageCreated(ProviderUsageHandler):
    """Per message: for a bus that delivers each event as it is emitted."""

    async def __call__(self, event: MessageWasCreated) -> None:
        await self.apply([event])


class UpdateProviderWhenMessagesCreated(ProviderUsageHandler):
    """Per batch: for a running bus (``async with bus:``), which collects the batches."""

    async def __call__(self, events: Sequence[MessageWasCreated]) -> None:
        await self.apply(events)


class Statements:
    """The handler's statements, Core and built once per dialect, with their parameters bound
    at each execution: building one per message, or an ORM-enabled one, would cost the
    handler more CPU time than the database spends running it."""

    def __init__(self, dialect_name: str, quota_types: Sequence[str]) -> None:
        dialect: Any = postgresql if dialect_name == "postgresql" else sqlite
        p, ledger = PROVIDERS.c, LEDGER.c
        row = (p.provider_type, p.quota_type, p.quota_limit, p.quota_used)
        tenant_id, name = bindparam("key_tenant", type_=String), bindparam("key_name", type_=String)
        is_key = (p.tenant_id == tenant_id, p.provider_name == name)
        hosted = (p.provider_type == "system", p.quota_limit != UNLIMITED)
        not_used_up = p.quota_limit > p.quota_used
        at = DateTime(timezone=True)

        self.read = select(p.tenant_id, p.provider_name, *row).where(
            tuple_(p.tenant_id, p.provider_name).in_(bindparam("keys", expanding=True))
        )
        self.read_one = select(*row).where(*is_key)
        self.insert = (
            dialect.insert(LEDGER)
            .on_conflict_do_nothing(index_elements=[ledger.message_id])
            .returning(ledger.message_id)
        )
        # A message's units in the provider's quota type, from the costs bound per type.
        units = case(
            {kind: bindparam(f"units_{n}", type_=BigInteger) for n, kind in enumerate(quota_types)},
            value=p.quota_type,
        )
        from_provider = select(
            bindparam("message_id", type_=String), tenant_id, name, units, not_used_up,
            bindparam("created_at", type_=at),
        ).where(*is_key, *hosted, units > 0)  # fmt: skip
        columns = ("message_id", "tenant_id", "provider_name", "units", "charged", "created_at")
        self.insert_unread = (
            dialect.insert(LEDGER)
            .from_select(columns, from_provider)
            .on_conflict_do_nothing(index_elements=[ledger.message_id])
            .returning(ledger.units, ledger.charged)
        )
        add = {"quota_used": p.quota_used + bindparam("units", type_=BigInteger)}
        charge = update(PROVIDERS).where(*is_key, *hosted, not_used_up)
        self.charge_only = charge.values(add)
        self.charge_and_mark = charge.values({**add, "last_used": bindparam("at", type_=at)})
        self.mark = (
            update(PROVIDERS)
            .where(*is_key)
            .values(last_used=bindparam("at", type_=at))
            .returning(*row)
        )
        self.uncharge = (
            update(LEDGER)
            .where(ledger.message_id.in_(bindparam("message_ids", expanding=True)))
            .values(charged=False)
        )

    async def read_providers(
        self, connection: AsyncConnection, keys: Sequence[Key]
    ) -> dict[Key, Seen]:
        """Read the provider rows of ``keys``, locking none: the UPDATEs lock them, later."""
        rows = await connection.execute(self.read, {"keys": keys})
        return {(tenant_id, name): Seen(*seen) for tenant_id, name, *seen in rows}

    async def insert_ledger(
        self, connection: AsyncConnection, entries: list[dict[str, Any]]
    ) -> set[str]:
        """Insert the ledger rows not there yet; return the message ids that were inserted.

        The rows go in sorted by message id: two transactions inserting some of the same ids
        lock their index entries in one order.
        """
        entries.sort(key=lambda entry: str(entry["message_id"]))
        return set((await connection.scalars(self.insert, entries)).all())

    async def insert_ledger_unread(
        self, connection: AsyncConnection, key: Key, message_id: str, costs: Sequence[int]
    ) -> tuple[int, bool] | None:
        """Insert one message's ledger row from its provider row, read by the same statement,
        if the provider has a hosted quota; ``costs`` are its units by quota type. Return the
        row's units and charged (the quota was not used up), or None if none was inserted."""
        params = {"key_tenant": key[0], "key_name": key[1], "message_id": message_id,
                  "created_at": utcnow()}  # fmt: skip
        params.update((f"units_{n}", cost) for n, cost in enumerate(costs))
        row = (await connection.execute(self.insert_unread, params)).first()
        return None if row is None else (row[0], bool(row[1]))

    async def charge(
        self, connection: AsyncConnection, key: Key, units: int, last_used: datetime | None
    ) -> bool:
        """Add ``units`` to a hosted quota that is not used up, computed in SQL, and set
        ``last_used`` if given, in one statement; whether it did (it did neither if not)."""
        params: dict[str, Any] = {"key_tenant": key[0], "key_name": key[1], "units": units}
        statement = self.charge_only
        if last_used is not None:
            statement, params["at"] = self.charge_and_mark, last_used
        return (await connection.execute(statement, params)).rowcount > 0

    async def mark_used(
        self, connection: AsyncConnection, key: Key, last_used: datetime | None
    ) -> Seen | None:
        """Set ``last_used`` if given, else only read; the row as it is now, None if gone."""
        params: dict[str, Any] = {"key_tenant": key[0], "key_name": key[1]}
        if last_used is None:
            row = (await connection.execute(self.read_one, params)).first()
        else:
            params["at"] = last_used
            row = (await connection.execute(self.mark, params)).first()
        return None if row is None else Seen(*row)

    async def mark_uncharged(self, connection: AsyncConnection, message_ids: Sequence[str]) -> None:
        """Say in their ledger rows that these messages were not charged after all."""
        await connection.execute(self.uncharge, {"message_ids": message_ids})


def log_refused(key: Key, seen: Seen | None, count: int) -> None:
    """A used-up quota is the tenant's business, not a failure: a warning."""
    if seen is None or not seen.hosted:  # gone, or no longer hosted, since it was read
        logger.info(
            "provider %s of tenant %s has no hosted quota now: %d message(s) not charged",
            key[1], key[0], count,
        )  # fmt: skip
        return
    logger.warning(
        "quota of provider %s of tenant %s is exhausted (%d of %d %s used): "
        "%d message(s) not charged",
        key[1], key[0], seen.quota_used, seen.quota_limit, seen.quota_type, count,
    )  # fmt: skip


async def release(claims: Iterable[Claim]) -> None:
    for claim in claims:
        await claim.release()
