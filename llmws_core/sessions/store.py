"""The sealed session store: replay buffers, conversation state, ack, recovery, expiry.

Why: LLMWS promises that a conversation survives a dropped socket and a killed
daemon, and that no conversation text is ever on disk in the clear. Every event a
client may see is sealed and handed to the OS before it is sent; reopening after
SIGKILL recovers every session; tampering is detected and reported, never
returned as text.

Disk format (version 1)
=======================

``<var>/sessions/<uuid>/`` per session (directories 0700, files 0600):

``buffer.jsonl``
    The replay buffer: one line per unacknowledged event, in seq order::

        {"s": <seq>, "n": "<base64 nonce>", "c": "<base64 ciphertext>"}

    The plaintext is the event as compact UTF-8 JSON, ``seq`` included. It is
    sealed with AES-256-GCM under the session's key with associated data
    (session id, "event", seq) -- see ``crypto.py`` -- so the seq in clear cannot
    be changed, and a record cannot move to another session or position. After an
    ``ack`` the file is rewritten (tmp + fsync + rename) to start at
    ``acked_seq + 1``; from then on seqs are consecutive. Each ``append`` writes
    one whole line with a single ``write`` to an ``O_APPEND`` descriptor before it
    returns (so a SIGKILL loses nothing that was sent); ``fsync`` is batched by
    ``SessionStore.sync_dirty`` (power loss may lose the last unsynced fraction
    of a second).

``state.bin``
    One line ``{"v": 1, "g": <generation>, "n": "<b64>", "c": "<b64>"}``: a sealed
    JSON document ``{"format", "id", "created", "last_active", "last_seq",
    "acked_seq", "state"}`` where ``state`` holds what the chat service keeps
    (history, generation config, ...). Sealed with kind "state" and seq =
    generation (incremented on each save); replaced atomically (tmp + fsync +
    rename). The buffer is fsynced before the state is saved, so the state never
    claims a seq the disk does not hold.

Recovery (``SessionStore.get`` of a session not in memory)
----------------------------------------------------------
- A last segment without a newline (a torn write) is dropped and the file is
  truncated to the last complete line.
- Lines are read in order, expecting seq ``acked_seq + 1, + 2, ...``. A line that
  is not valid JSON or fails authentication takes the expected seq's place and is
  replayed as a ``corrupt_record`` error; a jump forward (records deleted) is
  replayed as one ``corrupt_record`` error for the whole gap; an authentic record
  at the wrong place (reordered or a duplicate) is withheld and logged. Records
  missing at the end (state's ``last_seq`` beyond the last line) are a gap too.
- Authentic records with seq <= ``acked_seq`` at the start of the file are the
  left-overs of a trim interrupted by a crash (the state is saved before the
  buffer is rewritten) and are skipped.
- ``last_seq`` = max(state's ``last_seq``, the highest seq accounted for in the
  buffer), so a seq is never reused.

Rollback: an older ``state.bin`` or buffer of the same session put back whole is
authentic; the seq journal (``journal.py``, kept outside the session folders)
detects it: seqs continue after the highest one handed out, missing events are
replayed as ``corrupt_record`` and an older state is refused as corrupt.
One daemon owns a sessions folder at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmws_core import errors
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.journal import SeqJournal

logger = logging.getLogger("llmws.sessions")

BUFFER_NAME = "buffer.jsonl"
STATE_NAME = "state.bin"
STATE_FORMAT = 1
CORRUPT_MESSAGE = "A stored event failed its integrity check and was withheld."
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".deleted-"
_STORAGE_MESSAGE = "The server could not write to its session store; the session is still readable."
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def corrupt_event(seq: int) -> dict[str, Any]:
    """The event that stands in for a withheld (corrupt or missing) record."""
    return {"type": "error", "code": "corrupt_record", "seq": seq, "message": CORRUPT_MESSAGE}


def _canonical_id(session_id: object) -> str | None:
    """Return `session_id` if it is a canonical UUID string, else None (no path tricks)."""
    if not isinstance(session_id, str) or len(session_id) != 36:
        return None
    try:
        parsed = uuid.UUID(session_id)
    except ValueError:
        return None
    return session_id if str(parsed) == session_id else None


def _dumps(obj: Any) -> bytes:
    """Compact, strict JSON (no NaN: clients must be able to parse what we replay)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.b64decode(text, validate=True)


def _encode_line(seq: int, nonce: bytes, ciphertext: bytes) -> bytes:
    """A buffer line: the bytes `_dumps({"s": seq, "n": ..., "c": ...}) + b"\n"` gives,
    formatted directly (this runs once per streamed token)."""
    return b'{"s":%d,"n":"%s","c":"%s"}\n' % (int(seq), base64.b64encode(nonce), base64.b64encode(ciphertext))


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class StoredEvent(dict[str, Any]):
    """An event as `Session.append` stored it, with `frame`: its compact JSON exactly
    as sealed (UTF-8 bytes, None when persistence is off), so a socket can send
    those bytes instead of encoding the event again."""

    __slots__ = ("frame",)

    def __init__(self, event: dict[str, Any], frame: bytes | None) -> None:
        super().__init__(event)
        self.frame = frame


@dataclass(slots=True)
class _Entry:
    """One slot range of the in-memory replay buffer.

    `event` None means withheld: a corrupt line (`raw` keeps it, so a rewrite keeps
    reporting it) or a gap (`raw` empty; the missing seqs report themselves).
    """

    lo: int
    hi: int
    event: dict[str, Any] | None
    raw: bytes


@dataclass(slots=True)
class _Line:
    """A buffer line as parsed at load: `claimed` is the seq in clear (untrusted)."""

    raw: bytes
    claimed: int  # -1 when the line has no integer seq
    event: dict[str, Any] | None  # set only when the record authenticated


class Session:
    """One conversation: its replay buffer, its sealed state and its seq counter.

    Appends, replay, ack and state saves run on the event loop thread; `sync` may
    run on a worker thread (`SessionStore.sync_dirty`). `_lock` guards what they
    share: the descriptor, its size and the dirty flag. fsync runs on a duplicate
    descriptor outside the lock, so a slow disk never blocks an append.
    """

    id: str
    last_seq: int
    acked_seq: int
    state: dict[str, Any]
    created: float
    last_active: float

    #: Benchmark-only (config `sessions.persist: false`): events are neither sealed nor
    #: written, so the cost of persistence can be measured against the same run.
    persist_events: bool = True

    def __init__(
        self,
        session_id: str,
        directory: Path,
        sealer: Sealer,
        *,
        created: float,
        last_active: float,
        last_seq: int = 0,
        acked_seq: int = 0,
        state: dict[str, Any] | None = None,
        generation: int = 0,
    ) -> None:
        self.id = session_id
        self.last_seq = last_seq
        self.acked_seq = acked_seq
        self.state = {} if state is None else state
        self.created = created
        self.last_active = last_active
        self._dir = directory
        self._sealer = sealer
        self._generation = generation  # of the last state prepared
        self._committed = generation  # of the state on disk
        # Serializes state writes (loop or worker thread) so an older one never lands last.
        self._state_lock = threading.Lock()
        # One buffer rewrite at a time (acks from worker threads).
        self._rewrite_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # see sync()
        self._entries: list[_Entry] = []
        self._his: list[int] = []  # _entries[i].hi, for bisect
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        # Set when a failed write could not be undone: appending after a partial line
        # would glue the next record to it, so refuse writes until a reload.
        self._broken = False
        # How many lines or gaps failed the integrity checks at load (0 when clean).
        self.integrity_problems = 0
        # Told after each append (outside `_lock`), so the store can keep the number
        # of open buffer descriptors bounded (`SessionStore.max_open_buffers`).
        self.on_append: Callable[[Session], None] | None = None

    # -- writing ---------------------------------------------------------------

    def _ensure_fd(self) -> int:
        """The append descriptor, opened on first use (caller holds `_lock`)."""
        if self._fd is None:
            fd = os.open(self._dir / BUFFER_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE_MODE)
            self._size = os.fstat(fd).st_size
            self._fd = fd
        return self._fd

    def _write_locked(self, data: bytes) -> None:
        """Write `data` whole or not at all (caller holds `_lock`)."""
        if self._broken:
            raise errors.StorageError(_STORAGE_MESSAGE)
        try:
            fd = self._ensure_fd()
        except OSError as exc:
            logger.error("session %s: cannot open its buffer: %s", self.id, exc)
            raise errors.StorageError(_STORAGE_MESSAGE) from None
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError("short write")
                view = view[written:]
        except OSError as exc:
            logger.error("session %s: write failed: %s", self.id, exc)
            try:
                os.ftruncate(fd, start)
            except OSError as trunc_exc:
                logger.error("session %s: cannot undo a partial write: %s", self.id, trunc_exc)
                self._broken = True
            raise errors.StorageError(_STORAGE_MESSAGE) from None
        self._size = start + len(data)
        self._dirty = True

    def append(self, event: dict[str, Any]) -> StoredEvent:
        """Assign the next seq to a copy of `event`, seal it and hand it to the OS.

        Returns the copy (with "seq" and its sealed JSON as `frame`); send that. The
        in-memory buffer keeps its own copy, so later changes to the returned dict do
        not alter replays.

        Raises:
            errors.StorageError: the write failed; the seq is not consumed and the
                session stays readable.
        """
        stored = dict(event)
        with self._lock:
            seq = self.last_seq + 1
            stored["seq"] = seq
            if self.persist_events:
                plaintext: bytes | None = _dumps(stored)
                nonce, ciphertext = self._sealer.seal(self.id, "event", seq, plaintext)  # type: ignore[arg-type]
                line = _encode_line(seq, nonce, ciphertext)
                self._write_locked(line)
            else:  # benchmark-only: the buffer lives in memory
                plaintext, line = None, b""
            self.last_seq = seq
            # Listed under the lock: a buffer rewrite (worker thread) then sees exactly
            # the lines the file has.
            self._entries.append(_Entry(seq, seq, stored, line))
            self._his.append(seq)
        self.last_active = time.time()
        if self.on_append is not None:
            self.on_append(self)
        return StoredEvent(stored, plaintext)

    def sync(self) -> None:
        """fsync the buffer now if it has unsynced writes.

        Raises:
            errors.StorageError: fsync failed (the writes stay marked unsynced).

        Syncs from several threads queue on `_sync_lock`: when one returns, every
        write made before it was called is on disk, even if another thread's fsync
        had already taken the dirty mark.
        """
        with self._sync_lock:
            with self._lock:
                if not self._dirty:
                    return
                try:
                    # A buffer closed to free its descriptor is synced through a new one
                    # (fsync flushes the file, whichever descriptor asks).
                    fd = os.dup(self._fd) if self._fd is not None else os.open(self._dir / BUFFER_NAME, os.O_RDONLY)
                except OSError as exc:
                    logger.error("session %s: cannot sync: %s", self.id, exc)
                    raise errors.StorageError(_STORAGE_MESSAGE) from None
                self._dirty = False
            try:
                os.fsync(fd)
            except OSError as exc:
                with self._lock:
                    self._dirty = True
                logger.error("session %s: fsync failed: %s", self.id, exc)
                raise errors.StorageError(_STORAGE_MESSAGE) from None
            finally:
                os.close(fd)

    @property
    def dirty(self) -> bool:
        """Whether some write has not been fsynced yet."""
        return self._dirty

    # -- reading ---------------------------------------------------------------

    def replay(self, after_seq: int) -> list[dict[str, Any]]:
        """Buffered events with seq > `after_seq`, in order, from memory.

        Withheld records appear as `corrupt_record` error events (one per corrupt
        line, one per gap) so a client sees that something is missing.
        """
        start = bisect.bisect_right(self._his, after_seq)
        out: list[dict[str, Any]] = []
        for entry in self._entries[start:]:
            if entry.event is not None:
                out.append(dict(entry.event))
            else:
                out.append(corrupt_event(max(entry.lo, after_seq + 1)))
        return out

    # -- ack and state -----------------------------------------------------------

    def ack(self, seq: int | None = None) -> int:
        """Forget events up to `seq` (None: all so far); returns the new acked_seq.

        `seq` beyond `last_seq` is clamped; at or below `acked_seq` it changes
        nothing. The state (with the new acked_seq) is saved before the buffer is
        rewritten, so a crash in between leaves only skippable left-overs.

        Raises:
            errors.StorageError: the state could not be saved; nothing was trimmed.
        """
        target = self._ack_target(seq)
        if target <= self.acked_seq:
            return self.acked_seq
        previous, self.acked_seq = self.acked_seq, target
        try:
            self._write_state(target)
        except BaseException:
            self._undo_ack(previous, target)
            raise
        self._trim(target)
        try:
            self._rewrite_buffer()
        except OSError as exc:
            # Harmless for correctness: recovery skips records <= acked_seq at the start.
            logger.warning("session %s: could not trim its buffer: %s", self.id, exc)
        return target

    async def ack_async(self, seq: int | None = None) -> int:
        """`ack` with the disk work (the state's fsyncs, the buffer rewrite) in worker
        threads, so the event loop keeps streaming meanwhile (on the loop)."""
        target = self._ack_target(seq)
        if target <= self.acked_seq:
            return self.acked_seq
        # Set before the state is sealed: any state prepared from now on (and so any
        # that may land after this one) carries the new acked_seq.
        previous, self.acked_seq = self.acked_seq, target
        prepared = self._prepare_state(target)
        try:
            await asyncio.to_thread(self._commit_state, *prepared)
        except BaseException:
            self._undo_ack(previous, target)
            raise
        self._trim(target)
        try:
            await asyncio.to_thread(self._rewrite_buffer)
        except OSError as exc:
            logger.warning("session %s: could not trim its buffer: %s", self.id, exc)
        return target

    def _ack_target(self, seq: int | None) -> int:
        return self.last_seq if seq is None else min(int(seq), self.last_seq)

    def _undo_ack(self, previous: int, target: int) -> None:
        if self.acked_seq == target:
            self.acked_seq = previous

    def _trim(self, target: int) -> None:
        """Drop buffered events up to `target` from memory (the state already says so)."""
        with self._lock:
            start = bisect.bisect_right(self._his, target)
            entries = self._entries[start:]
            if entries and entries[0].lo <= target:  # a gap that straddles the ack point
                first = entries[0]
                entries[0] = _Entry(target + 1, first.hi, first.event, first.raw)
            self._entries = entries
            self._his = self._his[start:]

    def _rewrite_buffer(self) -> None:
        """Replace the buffer file with the lines still unacknowledged (any thread).

        The bulk is written and fsynced without holding `_lock`, so appends go on
        meanwhile; lines appended since are copied over under the lock, right
        before the rename, and the new file becomes the append descriptor."""
        if not self.persist_events:
            return
        with self._rewrite_lock:
            path = self._dir / BUFFER_NAME
            tmp = path.with_name(path.name + ".tmp")
            with self._lock:
                if self._broken:
                    return
                upto = self.last_seq
                data = b"".join(entry.raw for entry in self._entries)
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                with self._lock:
                    if self._broken:
                        raise OSError("the buffer is broken")
                    tail = b"".join(e.raw for e in self._entries[bisect.bisect_right(self._his, upto) :])
                    _write_all(fd, tail)
                    os.replace(tmp, path)
                    old, self._fd = self._fd, fd
                    self._size = len(data) + len(tail)
                    self._dirty = bool(tail)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if old is not None:
                os.close(old)
            _fsync_dir(path.parent)

    def _state_doc(self, acked_seq: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "id": self.id,
            "created": self.created,
            "last_active": self.last_active,
            "last_seq": self.last_seq,
            "acked_seq": acked_seq,
            "state": self.state,
        }

    def _prepare_state(self, acked_seq: int) -> tuple[int, bytes]:
        """Seal the state document as it is now (on the loop): (generation, line)."""
        generation = self._generation + 1
        nonce, ciphertext = self._sealer.seal(self.id, "state", generation, _dumps(self._state_doc(acked_seq)))
        body = _dumps({"v": STATE_FORMAT, "g": generation, "n": _b64(nonce), "c": _b64(ciphertext)})
        self._generation = generation
        return generation, body + b"\n"

    def _commit_state(self, generation: int, body: bytes) -> None:
        """Replace state.bin with a prepared state, atomically (any thread). A state
        older than the one on disk is dropped: saves may finish out of order."""
        with self._state_lock:
            if generation <= self._committed:
                return
            self.sync()  # the state must never claim a seq the disk does not hold
            try:
                atomic_write(self._dir / STATE_NAME, body)
            except OSError as exc:
                logger.error("session %s: cannot save its state: %s", self.id, exc)
                raise errors.StorageError(_STORAGE_MESSAGE) from None
            self._committed = generation

    def _write_state(self, acked_seq: int) -> None:
        """Seal the state document and replace state.bin atomically."""
        self._commit_state(*self._prepare_state(acked_seq))

    def save_state(self) -> None:
        """Seal `state`, seqs and timestamps to state.bin (tmp + fsync + rename).

        Raises:
            errors.StorageError: the disk refused; the previous state file stays.
            TypeError, ValueError: `state` is not JSON-safe (a bug in the caller).
        """
        self._write_state(self.acked_seq)

    async def save_state_async(self) -> None:
        """`save_state` with its three fsyncs in a worker thread (on the loop): the
        state is sealed now, as it is, and the event loop keeps streaming while the
        disk works. Raises as `save_state` does."""
        prepared = self._prepare_state(self.acked_seq)
        await asyncio.to_thread(self._commit_state, *prepared)

    def touch(self) -> None:
        """Mark the session active now (saved with the next `save_state`)."""
        self.last_active = time.time()

    def release_fd(self) -> None:
        """Close the append descriptor without waiting for a fsync (any thread): what
        was written is with the OS, `sync` still flushes it, and the next append
        reopens the file."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def has_fd(self) -> bool:
        """Whether the buffer's append descriptor is open."""
        return self._fd is not None

    def close(self) -> None:
        """fsync and close the buffer; a later append reopens it."""
        try:
            self.sync()
        except errors.StorageError:
            pass  # logged by sync; closing must not fail
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    # -- recovery ----------------------------------------------------------------

    def _load_buffer(self) -> None:
        """Rebuild the in-memory buffer and `last_seq` from disk (see the module doc)."""
        path = self._dir / BUFFER_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        good = data.rfind(b"\n") + 1
        if good < len(data):
            logger.warning("session %s: dropping a torn last line (%d bytes)", self.id, len(data) - good)
            try:
                with open(path, "r+b") as handle:
                    handle.truncate(good)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                logger.error("session %s: cannot truncate a torn line: %s", self.id, exc)
                self._broken = True
        lines = [self._parse_line(raw + b"\n") for raw in data[:good].split(b"\n")[:-1]]
        self._scan(lines)

    def _parse_line(self, raw: bytes) -> _Line:
        """Parse and authenticate one line; never raises."""
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _Line(raw, -1, None)
        if not isinstance(record, dict):
            return _Line(raw, -1, None)
        claimed = record.get("s")
        if isinstance(claimed, bool) or not isinstance(claimed, int):
            return _Line(raw, -1, None)
        try:
            nonce, ciphertext = _unb64(record.get("n")), _unb64(record.get("c"))
            event = json.loads(self._sealer.open(self.id, "event", claimed, nonce, ciphertext))
        except (errors.CorruptRecord, ValueError, binascii.Error, UnicodeDecodeError):
            return _Line(raw, claimed, None)
        if set(record) != {"s", "n", "c"} or not isinstance(event, dict) or event.get("seq") != claimed:
            return _Line(raw, claimed, None)
        return _Line(raw, claimed, event)

    def _scan(self, lines: list[_Line]) -> None:
        """Lay the lines onto seq slots, withholding whatever is out of place."""
        acked = self.acked_seq
        first_current = next(
            (i for i, ln in enumerate(lines) if ln.event is not None and ln.claimed > acked),
            len(lines),
        )
        last_stale = max((i for i, ln in enumerate(lines[:first_current]) if ln.event is not None), default=-1)
        if first_current < len(lines) and lines[first_current].claimed == acked + 1:
            skip = first_current  # all before the first unacked record is trim left-over
        else:
            skip = last_stale + 1  # unreadable lines after the left-overs hold unacked slots
        anomalies = sum(1 for ln in lines[:skip] if ln.event is None)
        expected = acked + 1
        for line in lines[skip:]:
            if line.event is None:
                self._entries.append(_Entry(expected, expected, None, line.raw))
                self._his.append(expected)
                expected += 1
                anomalies += 1
                continue
            seq = line.claimed
            if seq < expected:
                logger.warning("session %s: withheld an out-of-place record (seq %d)", self.id, seq)
                anomalies += 1
                continue
            if seq > expected:
                self._entries.append(_Entry(expected, seq - 1, None, b""))
                self._his.append(seq - 1)
                anomalies += 1
            self._entries.append(_Entry(seq, seq, line.event, line.raw))
            self._his.append(seq)
            expected = seq + 1
        if self.last_seq >= expected:  # records missing at the end
            self._entries.append(_Entry(expected, self.last_seq, None, b""))
            self._his.append(self.last_seq)
            anomalies += 1
        self.last_seq = max(self.last_seq, expected - 1)
        if anomalies:
            logger.warning(
                "session %s: %d integrity problem(s) in its buffer; affected events are "
                "replayed as corrupt_record errors",
                self.id,
                anomalies,
            )
        self.integrity_problems = anomalies


def _read_state(directory: Path, session_id: str, sealer: Sealer) -> tuple[dict[str, Any], int]:
    """Open a session's state.bin; returns (document, generation).

    Raises:
        errors.SessionNotFound: there is no session folder.
        errors.CorruptRecord: state.bin is missing, damaged or not this session's.
    """
    if not directory.is_dir():
        raise errors.SessionNotFound("No session with that id exists.")
    corrupt = errors.CorruptRecord("This session's stored state failed its integrity check; it cannot be resumed.")
    try:
        record = json.loads((directory / STATE_NAME).read_bytes())
        generation = record["g"]
        plaintext = sealer.open(session_id, "state", generation, _unb64(record["n"]), _unb64(record["c"]))
        doc = json.loads(plaintext)
    except FileNotFoundError:
        logger.error("session %s: state.bin is missing", session_id)
        raise corrupt from None
    except (errors.CorruptRecord, ValueError, KeyError, TypeError, binascii.Error):
        logger.error("session %s: state.bin failed its integrity check", session_id)
        raise corrupt from None
    fields_ok = (
        isinstance(doc, dict)
        and doc.get("id") == session_id
        and isinstance(doc.get("state"), dict)
        and all(isinstance(doc.get(k), int) for k in ("last_seq", "acked_seq"))
        and all(isinstance(doc.get(k), (int, float)) for k in ("created", "last_active"))
    )
    if not fields_ok:
        logger.error("session %s: state.bin has an unexpected shape", session_id)
        raise corrupt
    return doc, generation


class SessionStore:
    """All sessions under one folder: create, find (with recovery), sync, expire.

    Sessions are cached in memory once loaded; `_lock` guards the cache so that
    `sync_dirty` (worker thread) and `expire_idle` can run beside the event loop.
    """

    #: Seconds after its last append that a session's buffer descriptor is closed.
    IDLE_CLOSE_SECONDS = 30.0

    def __init__(
        self,
        root: Path,
        sealer: Sealer,
        *,
        ttl_seconds: float | None = 7 * 24 * 3600,
        max_open_buffers: int = 256,
        journal: SeqJournal | None = None,
    ) -> None:
        """Open (creating if needed) the sessions folder.

        Args:
            root: the sessions folder, normally `<var>/sessions`.
            sealer: seals every record and state.
            ttl_seconds: idle time after which a session expires; None: never.
            max_open_buffers: buffer files kept open at once; beyond it the least
                recently appended one is closed (reopened by its next append), so
                many short-lived sessions cannot use up the process's descriptors.
            journal: where each session's highest seq and state generation are kept
                outside its folder, so a rollback of its files is detected; None: not
                detected.
        """
        self._root = Path(root)
        self._sealer = sealer
        self._ttl = ttl_seconds
        self._lock = threading.RLock()
        self._cache: dict[str, Session] = {}
        self.max_open_buffers = max(1, max_open_buffers)
        # Sessions whose buffer descriptor may be open, least recently appended first.
        self._open: OrderedDict[str, Session] = OrderedDict()
        self._open_lock = threading.Lock()
        self._journal = journal
        self._journaled: dict[str, tuple[int, int]] = {}
        self._root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self._sweep_leftovers()

    def _sweep_leftovers(self) -> None:
        """Remove half-created and half-deleted folders left by a crash."""
        for child in self._root.iterdir():
            if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and child.is_dir():
                logger.info("removing left-over %s", child.name)
                shutil.rmtree(child, ignore_errors=True)

    def _expired(self, last_active: float, now: float) -> bool:
        return self._ttl is not None and now - last_active > self._ttl

    def create(self) -> Session:
        """A new session: uuid4 id, empty buffer, state saved.

        The folder is built under a temporary name and renamed into place, so a crash
        never leaves a half-made session.

        Raises:
            errors.StorageError: the disk refused.
        """
        session_id = str(uuid.uuid4())
        final = self._root / session_id
        staging = self._root / f"{_TMP_PREFIX}{session_id}"
        now = time.time()
        try:
            staging.mkdir(mode=_DIR_MODE)
            session = Session(session_id, staging, self._sealer, created=now, last_active=now)
            atomic_write(staging / BUFFER_NAME, b"")
            session.save_state()
            os.rename(staging, final)
            _fsync_dir(self._root)
        except (OSError, errors.StorageError) as exc:
            logger.error("cannot create a session: %s", exc)
            shutil.rmtree(staging, ignore_errors=True)
            raise errors.StorageError(_STORAGE_MESSAGE) from None
        session._dir = final
        session.on_append = self._appended
        with self._lock:
            self._cache[session_id] = session
        logger.info("session %s created", session_id)
        return session

    def get(self, session_id: str) -> Session:
        """The session with this id, from memory or recovered from disk.

        Raises:
            errors.SessionNotFound: unknown id, or not a canonical UUID string.
            errors.SessionExpired: (loading from disk) idle past the TTL; it has been
                deleted. Sessions already in memory are left to `expire_idle`.
            errors.CorruptRecord: its state file failed authentication (kept on disk).
        """
        sid = _canonical_id(session_id)
        if sid is None:
            raise errors.SessionNotFound("No session with that id exists.")
        now = time.time()
        with self._lock:
            session = self._cache.get(sid)
            if session is None:
                directory = self._root / sid
                doc, generation = _read_state(directory, sid, self._sealer)
                if self._expired(float(doc["last_active"]), now):
                    self._delete(sid)
                    raise errors.SessionExpired("This session expired after being idle too long.")
                mark = self._journal.get(sid) if self._journal is not None else None
                if mark is not None and generation < mark[1]:
                    logger.error(
                        "session %s: state.bin is older than the journal says (generation %d < %d): "
                        "an older copy was put back",
                        sid,
                        generation,
                        mark[1],
                    )
                    raise errors.CorruptRecord(
                        "This session's stored state is older than the server wrote (rolled back); "
                        "it cannot be resumed."
                    )
                if mark is not None and mark[0] > doc["last_seq"]:
                    # Seqs up to the journal's were handed out: never again. Those the
                    # buffer lacks are replayed as corrupt_record (see _scan).
                    doc["last_seq"] = mark[0]
                session = Session(
                    sid,
                    directory,
                    self._sealer,
                    created=float(doc["created"]),
                    last_active=float(doc["last_active"]),
                    last_seq=doc["last_seq"],
                    acked_seq=doc["acked_seq"],
                    state=doc["state"],
                    generation=generation,
                )
                session._load_buffer()
                session.on_append = self._appended
                self._cache[sid] = session
                logger.info(
                    "session %s recovered from disk (last_seq %d, acked_seq %d)",
                    sid,
                    session.last_seq,
                    session.acked_seq,
                )
            # A session already in memory is expired only by expire_idle, which knows
            # which sessions are busy: get() must not delete one under a live client.
            return session

    def exists(self, session_id: str) -> bool:
        """Whether a session with this id is in memory or on disk (TTL not checked)."""
        sid = _canonical_id(session_id)
        if sid is None:
            return False
        with self._lock:
            return sid in self._cache or (self._root / sid / STATE_NAME).is_file()

    def ids(self) -> list[str]:
        """Ids of all sessions on disk or in memory, sorted."""
        with self._lock:
            found = set(self._cache)
            for child in self._root.iterdir():
                if _canonical_id(child.name) is not None and child.is_dir():
                    found.add(child.name)
        return sorted(found)

    def _appended(self, session: Session) -> None:
        """Keep at most `max_open_buffers` buffer descriptors open (LRU)."""
        victims: list[Session] = []
        with self._open_lock:
            self._open[session.id] = session
            self._open.move_to_end(session.id)
            while len(self._open) > self.max_open_buffers:
                _, victim = self._open.popitem(last=False)
                victims.append(victim)
        for victim in victims:
            victim.release_fd()

    def _forget_open(self, session_id: str) -> None:
        with self._open_lock:
            self._open.pop(session_id, None)

    def open_buffers(self) -> int:
        """How many sessions may hold an open buffer descriptor now."""
        with self._open_lock:
            return len(self._open)

    def close_idle_buffers(self, now: float | None = None) -> int:
        """Close the buffer descriptors of sessions with no append for
        `IDLE_CLOSE_SECONDS`; returns how many were closed (any thread)."""
        now = time.time() if now is None else now
        with self._open_lock:
            idle = [s for s in self._open.values() if now - s.last_active > self.IDLE_CLOSE_SECONDS]
            for session in idle:
                del self._open[session.id]
        for session in idle:
            session.release_fd()
        return len(idle)

    def sync_dirty(self) -> None:
        """fsync every session with unsynced writes; safe from a worker thread.

        Failures are logged, not raised: this is a periodic flusher, and the session
        keeps its writes marked unsynced for the next call.
        """
        with self._lock:
            sessions = list(self._cache.values())
        marks = {s.id: (s.last_seq, s._committed) for s in sessions}  # before the fsyncs
        for session in sessions:
            if session.dirty:
                try:
                    session.sync()
                except errors.StorageError:
                    marks.pop(session.id, None)  # logged by Session.sync; not durable yet
        self._journal_marks(marks)
        self.close_idle_buffers()

    def _journal_marks(self, marks: dict[str, tuple[int, int]], *, live_only: bool = True) -> None:
        """Record durable (last_seq, generation) marks that changed (any thread);
        `live_only`: skip sessions deleted meanwhile."""
        if self._journal is None:
            return
        with self._lock:
            changed = {
                sid: m
                for sid, m in marks.items()
                if self._journaled.get(sid) != m and (sid in self._cache or not live_only)
            }
        if not changed:
            return
        try:
            self._journal.record(changed)
        except OSError as exc:
            logger.error("cannot write the seq journal: %s", exc)
            return
        with self._lock:
            self._journaled.update(changed)

    def expire_idle(self, busy: Iterable[str] = frozenset(), now: float | None = None) -> list[str]:
        """Delete sessions idle past the TTL, except `busy` ones; returns their ids.

        Args:
            busy: ids in use (a job running or a client connected); never expired.
            now: the current time (time.time()); None: now.
        """
        if self._ttl is None:
            return []
        now = time.time() if now is None else now
        busy = set(busy)
        expired: list[str] = []
        for sid in self.ids():
            if sid in busy:
                continue
            with self._lock:
                session = self._cache.get(sid)
                if session is not None:
                    last_active = session.last_active
                else:
                    try:
                        doc, _ = _read_state(self._root / sid, sid, self._sealer)
                    except errors.LLMWSError:
                        continue  # corrupt or gone: never delete what we cannot read
                    last_active = float(doc["last_active"])
                if self._expired(last_active, now):
                    self._delete(sid)
                    expired.append(sid)
        if expired:
            logger.info("expired %d idle session(s)", len(expired))
        return expired

    def delete(self, session_id: str) -> bool:
        """Delete a session from memory and disk; False if there was none."""
        sid = _canonical_id(session_id)
        if sid is None or not self.exists(sid):
            return False
        self._delete(sid)
        return True

    def _delete(self, sid: str) -> None:
        """Remove a session from memory and disk (rename first: a crash leaves no half)."""
        with self._lock:
            session = self._cache.pop(sid, None)
            self._forget_open(sid)
            self._journaled.pop(sid, None)
            if self._journal is not None:
                self._journal.forget(sid)
            if session is not None:
                session.close()
            directory = self._root / sid
            trash = self._root / f"{_TRASH_PREFIX}{sid}-{secrets.token_hex(4)}"
            try:
                os.rename(directory, trash)
            except FileNotFoundError:
                return
            except OSError as exc:
                logger.error("session %s: cannot delete: %s", sid, exc)
                return
            _fsync_dir(self._root)
            shutil.rmtree(trash, ignore_errors=True)
            logger.info("session %s deleted", sid)

    def close_all(self) -> None:
        """Save every cached session's state, fsync and close its buffer."""
        with self._lock:
            sessions = list(self._cache.values())
            self._cache.clear()
        with self._open_lock:
            self._open.clear()
        for session in sessions:
            try:
                session.save_state()
            except Exception:  # shutdown must close every session whatever one of them does
                logger.exception("session %s: state not saved at shutdown", session.id)
            session.close()
        self._journal_marks({s.id: (s.last_seq, s._committed) for s in sessions}, live_only=False)
