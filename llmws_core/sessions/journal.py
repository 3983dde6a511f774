"""The seq journal: each session's highest seq and state generation, kept outside
the session folders, so that putting back an older copy of a session is detected.

A session's files authenticate each other but not their age: an older `state.bin`
and `buffer.jsonl` of the same session, restored from a backup while the daemon
was stopped, are authentic. The journal (`<var>/journal.bin`) remembers, for every
session, the highest seq handed out and the generation of the state last written;
on load, a session whose files are behind the journal is a rollback. Seqs then
continue after the journal's (never reused), the missing events are replayed as
`corrupt_record`, and an older state is refused like a damaged one.

Format: one sealed line per batch, `{"n": "<b64>", "c": "<b64>"}`, each a JSON
object `{session_id: [last_seq, generation], ...}` of the sessions that changed.
Lines are sealed for ("journal", "journal", line number), so a line cannot be
moved. Loading takes the highest values of every authentic line; a torn or
unauthentic line is skipped with a warning. The file is rewritten compacted (one
line) at start and every `COMPACT_AFTER` lines. It is written after the buffers it describes are fsynced, so it
never claims a seq that the disk does not hold.

Limit: whoever can replace the journal too (same user, root) can roll back both;
the journal defeats restoring a session folder, not a whole `var/`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
from pathlib import Path

from .. import errors
from .crypto import Sealer

logger = logging.getLogger("llmws.sessions.journal")

JOURNAL_ID = "journal"
#: Lines appended before the journal is rewritten as one (about 4 minutes of streaming).
COMPACT_AFTER = 1000


class SeqJournal:
    """Highest (seq, state generation) per session id, durable and sealed."""

    def __init__(self, path: Path, sealer: Sealer) -> None:
        self._path = Path(path)
        self._sealer = sealer
        self._lock = threading.Lock()
        self._marks: dict[str, tuple[int, int]] = {}
        self._lines = 0
        self._load()
        self._compact()

    def get(self, session_id: str) -> tuple[int, int] | None:
        """(last_seq, generation) recorded for the session, or None."""
        with self._lock:
            return self._marks.get(session_id)

    def record(self, updates: dict[str, tuple[int, int]]) -> None:
        """Durably raise the marks of these sessions (any thread; one write, one fsync).

        Raises:
            OSError: the disk refused; the marks in memory are raised anyway.
        """
        with self._lock:
            changed = {}
            for sid, (seq, gen) in updates.items():
                old = self._marks.get(sid, (0, 0))
                new = (max(old[0], seq), max(old[1], gen))
                if new != old:
                    self._marks[sid] = changed[sid] = new
            if not changed:
                return
            self._append(changed)
        if self._lines > COMPACT_AFTER:
            self._compact()

    def forget(self, session_id: str) -> None:
        """Drop a deleted session's mark (any thread; best effort on disk)."""
        with self._lock:
            if self._marks.pop(session_id, None) is None:
                return
            try:
                self._append({session_id: None})
            except OSError as exc:
                logger.warning("seq journal: cannot record a deletion: %s", exc)

    def _append(self, marks: dict[str, tuple[int, int] | None]) -> None:
        """Append one sealed line and fsync it (caller holds `_lock`)."""
        line = self._seal_line(self._lines, marks)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._lines += 1

    def _seal_line(self, index: int, marks: dict[str, tuple[int, int] | None]) -> bytes:
        plaintext = json.dumps(
            {k: None if v is None else list(v) for k, v in marks.items()}, separators=(",", ":")
        ).encode()
        nonce, ciphertext = self._sealer.seal(JOURNAL_ID, "journal", index, plaintext)
        return b'{"n":"%s","c":"%s"}\n' % (base64.b64encode(nonce), base64.b64encode(ciphertext))

    def _load(self) -> None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        bad = 0
        lines = data.split(b"\n")[:-1]
        self._lines = len(lines)
        for index, raw in enumerate(lines):
            try:
                record = json.loads(raw)
                plaintext = self._sealer.open(
                    JOURNAL_ID,
                    "journal",
                    index,
                    base64.b64decode(record["n"], validate=True),
                    base64.b64decode(record["c"], validate=True),
                )
                marks = json.loads(plaintext)
                for sid, mark in marks.items():
                    if mark is None:  # the session was deleted
                        self._marks.pop(sid, None)
                        continue
                    seq, gen = mark
                    old = self._marks.get(sid, (0, 0))
                    self._marks[sid] = (max(old[0], int(seq)), max(old[1], int(gen)))
            except (errors.CorruptRecord, ValueError, KeyError, TypeError, binascii.Error):
                bad += 1
        if bad:
            logger.warning("seq journal: %d line(s) failed their integrity check and were skipped", bad)

    def _compact(self) -> None:
        """Rewrite the journal as one line (tmp + fsync + rename)."""
        from .store import atomic_write  # the store's atomic replace

        with self._lock:
            body = self._seal_line(0, self._marks) if self._marks else b""
            try:
                atomic_write(self._path, body)
            except OSError as exc:
                logger.error("seq journal: cannot rewrite %s: %s", self._path, exc)
                return
            self._lines = 1 if body else 0
