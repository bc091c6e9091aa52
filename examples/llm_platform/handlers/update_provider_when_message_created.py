"""A message charges its provider's hosted quota and marks the provider as used.

The original's one performance optimisation was to write ``last_used`` at most once per
five-minute window, remembered in Redis; it had four races, each fixed here:

- GET then SETEX let concurrent workers all write: the window is claimed atomically from an
  `aioevents.throttle.Throttle` (one ``SET NX PX`` on Redis), which fails open when Redis does;
- the window was claimed before a transaction that could roll back, losing ``last_used`` for
  the window: a failed transaction releases its claims;
- quota was deducted without an idempotency key, so a redelivered message charged twice: each
  charge inserts a ledger row keyed by the message id in the same transaction;
- updates to ``providers`` deadlocked: every transaction locks its provider rows first, in one
  order, (tenant_id, provider_name).

`UpdateProviderWhenMessageCreated` does this per message; `UpdateProviderWhenMessagesCreated`
per batch, for a running bus, with the quota summed per provider and written once per batch.
Both run one transaction:

1. (before it) claim the ``last_used`` window of each (tenant, provider): no throttle call
   waits while provider rows are locked;
2. ``SELECT ... FOR UPDATE`` the provider rows, ordered by (tenant_id, provider_name);
3. insert a ledger row per chargeable message, ``ON CONFLICT DO NOTHING RETURNING``: only the
   ids that come back are charged (a concurrent redelivery waits on the first one's row, then
   finds it);
4. one UPDATE per provider: ``quota_used = quota_used + n`` computed in SQL, where
   ``quota_limit > quota_used``, and ``last_used = now`` where its window was granted (on a
   window's first message the two share the statement; most messages only charge).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from aioevents.throttle import Claim

from ..deps import Deps
from ..events import MessageWasCreated
from ..models import Provider, ProviderUsage, utcnow
from ..quota import HOSTED, UNLIMITED, QuotaPolicy
from ._common import Handler, rowcount

logger = logging.getLogger(__name__)

LAST_USED_WINDOW: Final = 300.0
"""Seconds between two writes of a provider's ``last_used``, as in the original."""

Key = tuple[str, str]  # (tenant_id, provider_name): the order provider rows are locked in


def throttle_key(key: Key) -> str:
    return f"provider-last-used:{key[0]}:{key[1]}"


@dataclass(frozen=True, slots=True)
class Locked:
    """A provider row as read under its lock: what decides whether and how to charge."""

    provider_type: str
    quota_type: str
    quota_limit: int
    quota_used: int


class ProviderUsageHandler(Handler):
    """What both variants share: the claims, the transaction, and what it writes."""

    def __init__(
        self, deps: Deps, *, last_used_window: float = LAST_USED_WINDOW, quota: QuotaPolicy = HOSTED
    ) -> None:
        super().__init__(deps)
        self.last_used_window = last_used_window
        self.quota = quota

    async def apply(self, events: Sequence[MessageWasCreated]) -> None:
        claims = {
            key: await self.deps.throttle.claim(throttle_key(key), self.last_used_window)
            for key in sorted({(event.tenant_id, event.provider) for event in events})
        }
        try:
            async with self.deps.sessions.begin() as session:
                providers = await lock_providers(session, list(claims))
                charges = await self._charge(session, providers, events)
                await self._update_providers(session, providers, claims, charges)
        except BaseException:
            await release(claims.values())  # nothing was written: the next message may write
            raise
        unknown = [key for key in claims if key not in providers]
        for tenant_id, provider_name in unknown:
            logger.info("tenant %s has no provider %s: nothing to update", tenant_id, provider_name)
        await release(claims[key] for key in unknown)

    async def _charge(
        self,
        session: AsyncSession,
        providers: Mapping[Key, Locked],
        events: Sequence[MessageWasCreated],
    ) -> dict[Key, int]:
        """Write the ledger rows of messages seen first here; return their units by provider."""
        entries = self._ledger_entries(providers, events)
        if not entries:
            return {}
        new = await insert_ledger(session, list(entries.values()))
        totals: dict[Key, int] = defaultdict(int)
        refused: dict[Key, int] = defaultdict(int)
        for message_id in new:
            entry = entries[message_id]
            key = (entry["tenant_id"], entry["provider_name"])
            if entry["charged"]:
                totals[key] += entry["units"]
            else:
                refused[key] += 1
        for key, count in sorted(refused.items()):
            provider = providers[key]
            logger.warning(
                "quota of provider %s of tenant %s is exhausted (%d of %d %s used): "
                "%d message(s) not charged",
                key[1], key[0], provider.quota_used, provider.quota_limit,
                provider.quota_type, count,
            )  # fmt: skip
        return totals

    def _ledger_entries(
        self, providers: Mapping[Key, Locked], events: Iterable[MessageWasCreated]
    ) -> dict[str, dict[str, Any]]:
        """The ledger rows of the messages to charge, by message id; a system provider only."""
        entries: dict[str, dict[str, Any]] = {}
        now = utcnow()
        for event in events:
            provider = providers.get((event.tenant_id, event.provider))
            if provider is None or provider.provider_type != "system":
                continue
            if provider.quota_limit == UNLIMITED:
                continue
            units = self.quota.units_used(provider.quota_type, event)
            if not units:
                continue
            entries[event.message_id] = {
                "message_id": event.message_id,
                "tenant_id": event.tenant_id,
                "provider_name": event.provider,
                "units": units,
                # Read under the row lock, so it is what the quota UPDATE's guard will see.
                "charged": provider.quota_limit > provider.quota_used,
                "created_at": now,
            }
        return entries

    async def _update_providers(
        self,
        session: AsyncSession,
        providers: Mapping[Key, Locked],
        claims: Mapping[Key, Claim],
        charges: Mapping[Key, int],
    ) -> None:
        """At most one UPDATE per provider: its charge, and last_used if its window was granted."""
        now = utcnow()
        for key in sorted(providers):
            units, mark_used = charges.get(key, 0), claims[key].granted
            if units or mark_used:
                await update_provider(
                    session, key, units=units, last_used=now if mark_used else None
                )


class UpdateProviderWhenMessageCreated(ProviderUsageHandler):
    """Per message: for a bus that delivers each event as it is emitted."""

    async def __call__(self, event: MessageWasCreated) -> None:
        await self.apply([event])


class UpdateProviderWhenMessagesCreated(ProviderUsageHandler):
    """Per batch: for a running bus (``async with bus:``), which collects the batches."""

    async def __call__(self, events: Sequence[MessageWasCreated]) -> None:
        await self.apply(events)


async def lock_providers(session: AsyncSession, keys: Sequence[Key]) -> dict[Key, Locked]:
    """Lock the provider rows of ``keys`` in (tenant_id, provider_name) order; read them.

    PostgreSQL locks rows in the order the sorted query returns them, so two transactions
    over overlapping providers never hold one row each while waiting for the other's.
    SQLite has no row locks and ignores FOR UPDATE: its BEGIN IMMEDIATE serialises writers.
    """
    columns = (Provider.tenant_id, Provider.provider_name)
    query = (
        select(*columns, Provider.provider_type, Provider.quota_type, Provider.quota_limit,
               Provider.quota_used)
        .where(tuple_(*columns).in_(keys))
        .order_by(*columns)
        .with_for_update()
    )  # fmt: skip
    return {
        (tenant_id, name): Locked(provider_type, quota_type, quota_limit, quota_used)
        for tenant_id, name, provider_type, quota_type, quota_limit, quota_used in (
            await session.execute(query)
        )
    }


async def insert_ledger(session: AsyncSession, entries: list[dict[str, Any]]) -> set[str]:
    """Insert the ledger rows not there yet; return the message ids that were inserted."""
    entries.sort(key=lambda entry: str(entry["message_id"]))  # index entries in one order too
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    # The rows as parameters of one statement, not in it: the statement is then compiled once
    # and cached (a multi-VALUES insert is compiled anew for every call).
    statement = (
        dialect.insert(ProviderUsage)
        .on_conflict_do_nothing(index_elements=[ProviderUsage.message_id])
        .returning(ProviderUsage.message_id)
    )
    return set((await session.scalars(statement, entries)).all())


async def update_provider(
    session: AsyncSession, key: Key, *, units: int, last_used: datetime | None
) -> None:
    """Add ``units`` to a system provider's quota, computed in SQL where it is not used up,
    and set ``last_used`` if given, in one statement."""
    conditions = [Provider.tenant_id == key[0], Provider.provider_name == key[1]]
    values: dict[str, Any] = {}
    if units:
        # Always true here, as the row was read under its lock; the database checks it anyway.
        conditions += [
            Provider.provider_type == "system",
            Provider.quota_limit > Provider.quota_used,
        ]
        values["quota_used"] = Provider.quota_used + units
    if last_used is not None:
        values["last_used"] = last_used
    statement = update(Provider).where(*conditions).values(values)
    updated = await rowcount(session, statement.execution_options(synchronize_session=False))
    if not updated:
        logger.error("provider %s of tenant %s was not updated", key[1], key[0])


async def release(claims: Iterable[Claim]) -> None:
    for claim in claims:
        await claim.release()
