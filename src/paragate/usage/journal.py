"""The usage journal: every record on disk before its response ends.

A process appends to a segment file of its own in ``PARAGATE_JOURNAL_DIR``, one
``os.write`` per record (a frame: length, CRC-32, msgpack), from the event loop: a few
microseconds, no thread hop. Once ``write`` returns the record is in the kernel's page
cache, so a ``kill -9`` of the gateway loses nothing; ``fsync`` bounds what a power cut
can lose (``always``: every record is fsynced before the response ends; ``interval``: at
most the last ``fsync_interval`` seconds; ``never``: what the kernel had not written).

Each segment is held with an exclusive ``flock`` for as long as its process lives. A
segment is created under a temporary name, locked, then renamed, so no other process
can take a new one for abandoned. Any process may take over a ``*.journal`` file whose
lock it can get (its owner died) and ship it; shipping is idempotent, so a record that
reaches the database twice is stored once. Each segment's header names the database it
belongs to: segments of another database sharing the directory are left alone.

The usage writer (``writer.UsageWriter``) reads records from the segments in order,
commits them, and deletes a segment once everything in it is committed and it is no
longer appended to. Segments rotate by size and by age, so a committed record does not
linger on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ..store import UsageRecord

__all__ = ["FSYNC_MODES", "Journal", "Segment", "database_tag", "read_segment"]

log = logging.getLogger("paragate.usage")

FSYNC_MODES = ("always", "interval", "never")
_MAGIC = b"PARAGATE-JOURNAL 1 "  # then the database tag and a newline
_FRAME = struct.Struct("<II")  # payload length, CRC-32 of the payload
_SUFFIX = ".journal"
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(UsageRecord).decode


def database_tag(database_url: str) -> str:
    """Which database a segment's records belong to, without its password."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(password=None)
    return hashlib.sha256(url.render_as_string().encode()).hexdigest()[:16]


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    size: int  # bytes in the file that hold whole records (appended so far)
    start: int  # where the first record begins (after the header)
    shipped: int = 0  # bytes committed to the database
    sealed: bool = False  # no longer appended to
    records: int = 0  # whole records found in a segment taken over
    created: float = field(default_factory=time.monotonic)


def _frames(data: bytes, offset: int) -> Iterator[tuple[int, bytes | None]]:
    """(end offset, payload) for each whole frame from ``offset``; payload None marks a
    torn or corrupt frame, after which nothing is read."""
    end = len(data)
    while offset + _FRAME.size <= end:
        length, crc = _FRAME.unpack_from(data, offset)
        stop = offset + _FRAME.size + length
        if stop > end:
            return
        payload = data[offset + _FRAME.size:stop]
        if zlib.crc32(payload) != crc:
            yield stop, None
            return
        yield stop, payload
        offset = stop


def read_segment(path: Path) -> list[UsageRecord]:
    """Every whole record of a segment file (for tools and tests)."""
    data = path.read_bytes()
    start = data.index(b"\n") + 1
    return [_decode(p) for _, p in _frames(data, start) if p is not None]


class Journal:
    def __init__(self, directory: Path, database: str, *, fsync: str = "interval",
                 fsync_interval: float = 0.1, segment_bytes: int = 8 << 20,
                 segment_seconds: float = 30.0) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}")
        self.directory = directory
        self.tag = database_tag(database)
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._segment_bytes = segment_bytes
        self._segment_seconds = segment_seconds
        self._active: Segment | None = None
        self._sealed: list[Segment] = []  # own, rotated out, not yet all committed
        self._taken: list[Segment] = []  # other processes' left-overs, now ours
        self._lock = threading.Lock()  # the segment lists, and fds against close
        self._dirty = False
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.failed: list[UsageRecord] = []  # records the disk refused, kept in memory
        # Counters, each written by one thread only: appended and refused by the event
        # loop, taken over and committed by the writer.
        self.appended = 0
        self.refused = 0
        self.taken = 0
        self.committed = 0

    # -- the request path ---------------------------------------------------------------

    def append(self, record: UsageRecord) -> None:
        """Write one record; it is in the kernel's hands when this returns."""
        seg = self._active
        try:
            payload = _encode(record)
        except Exception as exc:  # a value msgpack cannot hold: the writer will refuse it
            self._refused(record, OSError(str(exc)), rotate=False)
            return
        frame = _FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        try:
            if seg is None:
                raise OSError("the journal is not open")
            written = os.write(seg.fd, frame)
            if written != len(frame):  # a short write: disk full; finish or fail
                written += os.write(seg.fd, frame[written:])
                if written != len(frame):
                    raise OSError("short write")
        except OSError as exc:
            self._refused(record, exc)
            return
        seg.size += len(frame)
        self.appended += 1
        if self._fsync == "always":
            os.fdatasync(seg.fd)
        else:
            self._dirty = True
        if seg.size >= self._segment_bytes or (
                time.monotonic() - seg.created >= self._segment_seconds):
            self._rotate()

    def _refused(self, record: UsageRecord, exc: OSError, rotate: bool = True) -> None:
        # Never lose the record: keep it in memory for the writer, and start a new
        # segment (the old one is cut back to its last whole record).
        self.failed.append(record)
        self.refused += 1
        log.error("the usage journal in %s refused a record (%s); %d kept in memory",
                  self.directory, exc, len(self.failed))
        seg = self._active
        if seg is not None and rotate:
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)
            with contextlib.suppress(OSError):
                self._rotate()

    def _rotate(self) -> None:
        new = self._create()
        with self._lock:
            old, self._active = self._active, new
            if old is not None:
                old.sealed = True
                self._sealed.append(old)

    def _create(self) -> Segment:
        name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = _MAGIC + self.tag.encode() + b"\n"
            os.write(fd, header)
            path = self.directory / (name + _SUFFIX)
            os.rename(tmp, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Segment(path, fd, len(header), len(header), shipped=len(header))

    # -- opening and closing ------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._active = self._create()
        if self._fsync == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="paragate-journal-sync")
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._fsync_interval):
            self.sync()

    def sync(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        with self._lock:
            for seg in (*self._sealed, *((self._active,) if self._active else ())):
                if seg.shipped < seg.size:
                    with contextlib.suppress(OSError):
                        os.fdatasync(seg.fd)

    def close(self) -> None:
        """Flush to disk and let go; a segment with records not yet committed stays for
        the next start (or any live process) to ship."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            segments = [*self._taken, *self._sealed,
                        *((self._active,) if self._active else ())]
            self._active, self._sealed, self._taken = None, [], []
        for seg in segments:
            with contextlib.suppress(OSError):
                if seg.shipped >= seg.size:
                    seg.path.unlink()
                else:
                    os.fsync(seg.fd)
            os.close(seg.fd)

    # -- the writer's side --------------------------------------------------------------

    def take_over(self) -> int:
        """Take every segment no live process holds (its owner died, or this is a new
        start); returns how many records they hold."""
        mine = {s.path for s in (*self._taken, *self._sealed)}
        if self._active:
            mine.add(self._active.path)
        found = 0
        for path in sorted(self.directory.glob("*" + _SUFFIX)):
            if path in mine:
                continue
            seg = self._claim(path)
            if seg is not None:
                with self._lock:
                    self._taken.append(seg)
                found += seg.records
        self.taken += found
        return found

    def _claim(self, path: Path) -> Segment | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError  # deleted and replaced while we opened it
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        except OSError:  # held by a live process, or gone
            os.close(fd)
            return None
        newline = data.find(b"\n")
        if not data.startswith(_MAGIC) or newline < 0:
            log.error("%s is not a usage journal segment; left alone", path)
            os.close(fd)
            return None
        if data[len(_MAGIC):newline].decode(errors="replace") != self.tag:
            log.warning("%s holds usage of another database; left alone", path)
            os.close(fd)
            return None
        start = newline + 1
        size, records = start, 0
        for stop, payload in _frames(data, start):
            if payload is None:
                log.error("%s: a torn or corrupt record at byte %d; what follows it (%d "
                          "bytes) cannot be read", path, size, len(data) - size)
                break
            size, records = stop, records + 1
        log.info("taking over %d usage records left in %s", records, path.name)
        return Segment(path, fd, size, start, shipped=start, sealed=True, records=records)

    def pending(self) -> int:
        """Records appended, refused or taken over and not yet committed."""
        return self.appended + self.refused + self.taken - self.committed

    def read(self, limit: int) -> tuple[list[UsageRecord], list[tuple[Segment, int, int]]]:
        """Up to ``limit`` records not yet committed, oldest segments first, and the
        marks to ``commit`` once they are in the database. Reading moves nothing."""
        records: list[UsageRecord] = []
        marks: list[tuple[Segment, int, int]] = []
        if self.failed:
            records = self.failed[:limit]
            marks.append((_MEMORY, len(records), len(records)))
        with self._lock:
            for seg in [*self._taken, *self._sealed]:
                if seg.shipped >= seg.size:  # committed before it was sealed
                    self._delete(seg)
            segments = [*self._taken, *self._sealed, *((self._active,) if self._active
                                                        else ())]
        for seg in segments:
            if len(records) >= limit:
                break
            end = seg.size  # read no further than whole records appended so far
            if seg.shipped >= end:
                continue
            data = os.pread(seg.fd, end - seg.shipped, seg.shipped)
            offset, count = 0, 0
            for stop, payload in _frames(data, 0):
                if payload is None:
                    break
                records.append(_decode(payload))
                offset, count = stop, count + 1
                if len(records) >= limit:
                    break
            if count:
                marks.append((seg, seg.shipped + offset, count))
        return records, marks

    def commit(self, marks: list[tuple[Segment, int, int]]) -> None:
        """The records ``read`` returned with these marks are in the database."""
        for seg, offset, count in marks:
            self.committed += count
            if seg is _MEMORY:
                del self.failed[:count]
                continue
            seg.shipped = offset
            if seg.sealed and seg.shipped >= seg.size:
                with self._lock:
                    self._delete(seg)

    def _delete(self, seg: Segment) -> None:
        """Remove a segment whose records are all committed (with ``_lock`` held)."""
        for group in (self._taken, self._sealed):
            if seg in group:
                group.remove(seg)
        with contextlib.suppress(OSError):
            seg.path.unlink()
        os.close(seg.fd)


_MEMORY = Segment(Path("<memory>"), -1, 0, 0)
