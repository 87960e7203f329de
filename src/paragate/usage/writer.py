"""The one writer that moves journaled usage records into the database.

Every ``flush_interval`` (at once while a backlog remains) it reads up to ``batch`` records
from the journal, writes them in one transaction (idempotent: see ``store.usage``) and
only then marks them committed; the journal, not a Python list, is the buffer, so memory
stays bounded however long the database is away.

- The database is unreachable (a connection error, a lost acknowledgement, a lock
  timeout): nothing is marked, and the same records are tried again after a back-off
  that doubles up to ``max_backoff``. A COMMIT that succeeded but whose acknowledgement
  was lost is harmless: the retry inserts nothing twice.
- A batch fails for another reason: the records are tried one by one, each in its own
  transaction; one that still fails goes to the dead-letter file (JSON lines beside the
  journal, re-imported by ``paragate usage replay``) and the others go in.

Where it runs: in the gateway, ``thread`` is an idle-priority thread (see
``background.StoreThread``), so the writer takes no CPU the request path wants, in
batches of at most ``idle_batch`` (the time one batch can be held up). A core kept busy
by requests starves such a thread; once the journal has not been empty for
``catch_up_after`` seconds the writer moves to ``catch_up`` (a nice-10 thread) and full
batches until it is empty again, so the lag stays bounded whatever the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError

from ..background import StoreThread
from ..store import Store, UsageRecord
from .journal import Journal

__all__ = ["DeadLetters", "UsageWriter", "is_outage", "write_isolated"]

log = logging.getLogger("paragate.usage")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away (try again later), rather than that
    the rows are bad (isolate them)."""
    if isinstance(exc, OperationalError | InterfaceError | ProgrammingError | OSError):
        return True  # ProgrammingError: the schema is not what it should be, for all rows
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class _Entry(msgspec.Struct):
    record: UsageRecord
    error: str
    at: datetime


class DeadLetters:
    """Records the database refused on their own, as JSON lines: appended under an
    exclusive lock (several processes may share the file), rewritten by ``replay``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, record: UsageRecord, error: str) -> None:
        line = msgspec.json.encode(_Entry(record, error[:2000], datetime.now(UTC))) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def replay(self, store: Store) -> tuple[int, int, int]:
        """Write every record in the file; keep the ones that still fail. Returns
        (written, already there, still failing)."""
        if not self.path.exists():
            return 0, 0, 0
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            entries = [msgspec.json.decode(line, type=_Entry)
                       for line in f.read().splitlines() if line.strip()]
            records = [e.record for e in entries]
            failed: list[tuple[UsageRecord, str]] = []
            written = write_isolated(store, records, lambda r, e: failed.append((r, e)))
            keep = [_Entry(r, e, datetime.now(UTC)) for r, e in failed]
            f.seek(0)
            f.truncate()
            f.write(b"".join(msgspec.json.encode(e) + b"\n" for e in keep))
            f.flush()
            os.fsync(f.fileno())
        return written, len(records) - written - len(failed), len(failed)


def write_isolated(store: Store, records: Sequence[UsageRecord],
                   refuse: Callable[[UsageRecord, str], None]) -> int:
    """Write ``records``; on a failure that is not an outage, one by one, handing each
    that fails on its own to ``refuse``. An outage raises. Returns how many were new."""
    try:
        return store.insert_usage(records)
    except Exception as exc:
        if is_outage(exc):
            raise
        if len(records) == 1:
            _refuse(refuse, records[0], exc)
            return 0
    written = 0
    for record in records:
        try:
            written += store.insert_usage([record])
        except Exception as exc:
            if is_outage(exc):
                raise
            _refuse(refuse, record, exc)
    return written


def _refuse(refuse: Callable[[UsageRecord, str], None], record: UsageRecord,
            exc: Exception) -> None:
    log.error("usage record %s refused by the database; moved to the dead-letter file: %s",
              record.request_id, exc)
    refuse(record, f"{type(exc).__name__}: {exc}")


class UsageWriter:
    def __init__(self, store: Store, thread: StoreThread, journal: Journal, *,
                 flush_interval: float, batch: int = 2000, max_backoff: float = 5.0,
                 retention_days: int = 90, takeover_interval: float = 30.0,
                 catch_up: StoreThread | None = None, catch_up_after: float = 2.0,
                 idle_batch: int = 500) -> None:
        self._store = store
        self._thread = thread
        self._catch_up = catch_up
        self._catch_up_after = catch_up_after
        self._idle_batch = idle_batch if catch_up is not None else batch
        self._last_empty = time.monotonic()  # when a pass last left the journal empty
        self.catch_ups = 0  # how many passes fell behind and moved to ``catch_up``
        self.journal = journal
        self.dead_letters = DeadLetters(journal.directory / "dead-letter.jsonl")
        self._interval = flush_interval
        self._batch = batch
        self._max_backoff = max_backoff
        self._retention = retention_days
        self._takeover_interval = takeover_interval
        self._stopping = asyncio.Event()
        self.written = 0  # new rows (a retried record counts once)
        self.failing_since: float | None = None  # monotonic; None while writes succeed

    def _ship(self, limit: int) -> int:
        """One batch, in a store thread: read, write, mark. Returns how many records
        were read (0: nothing left)."""
        records, marks = self.journal.read(limit)
        if not records:
            return 0
        self.written += write_isolated(self._store, records, self.dead_letters.add)
        self.journal.commit(marks)
        return len(records)

    async def drain(self) -> None:
        """Write until nothing is left; raises while the database is away."""
        behind = False
        while True:
            if (not behind and self._catch_up is not None
                    and time.monotonic() - self._last_empty > self._catch_up_after):
                behind = True
                self.catch_ups += 1
                log.info("the usage writer is %.1f s behind (%d records wait); catching "
                         "up at normal priority", time.monotonic() - self._last_empty,
                         self.journal.pending())
            if behind:
                assert self._catch_up is not None
                limit = self._batch
                read = await self._catch_up.run(self._ship, limit)
            else:
                limit = self._idle_batch
                read = await self._thread.run(self._ship, limit)
            if read < limit:  # that was all there was
                self._last_empty = time.monotonic()
                return

    async def run(self) -> None:
        """Take over left-over segments, then write until ``stop``; then write what is
        left (what cannot be written stays in the journal for the next start)."""
        backoff = self._interval
        next_takeover = next_prune = 0.0
        while True:
            # A stop that came before this pass makes it the last one: every record the
            # stopped server made is in the journal by now, so this pass reads them all
            # (a stop seen only after the pass could miss what came during it).
            last = self._stopping.is_set()
            now = time.monotonic()
            if now >= next_takeover:
                next_takeover = now + self._takeover_interval
                with contextlib.suppress(OSError):
                    await self._thread.run(self.journal.take_over)
            try:
                await self.drain()
                if self.failing_since is not None:
                    log.warning("usage records are being written again after %.1f s",
                                time.monotonic() - self.failing_since)
                self.failing_since = None
                backoff = self._interval
                if self._retention and now >= next_prune and not last:
                    next_prune = now + 3600
                    await self._prune()
            except Exception as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.error("writing usage records failed (%s); %d wait in the journal, "
                              "retrying with back-off", exc, self.journal.pending())
                backoff = min(backoff * 2, self._max_backoff)
            if last:
                return
            delay = self._interval if self.failing_since is None else backoff
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _prune(self) -> None:
        before = datetime.now(UTC) - timedelta(days=self._retention)
        try:
            deleted = await self._thread.run(self._store.prune_usage, before)
        except Exception:
            log.exception("pruning usage records older than %d days failed", self._retention)
            return
        if deleted:
            log.info("pruned %d usage records older than %d days", deleted, self._retention)

    def lag(self) -> float:
        """Seconds since the journal was last seen empty; 0 while it is."""
        if self.journal.pending() == 0:
            return 0.0
        return time.monotonic() - self._last_empty

    def stop(self) -> None:
        self._stopping.set()
