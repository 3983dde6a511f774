"""Sealed KV prefixes on disk: a session's prompt state outlives its RAM slot and the daemon.

The llama.cpp backend keeps each session's KV prefix in a slot in RAM. When the
slot is given to another session (eviction), when the model is unloaded (switch,
shutdown) and when `/restore_cache` asks for it, the slot's state is written here,
sealed like session records: AES-256-GCM under a key derived from the owner (the
session id, or the HTTP caller's principal), with the owner bound in as associated
data. The owner's next turn — after an eviction or a restart — loads it instead of
prefilling its history again.

A file holds the token ids its KV covers, so the engine reuses only the part that
is a real prefix of the new prompt; a stale file is still correct, just shorter.
Files are named by a digest of (model, owner), so neither a session id nor a key
digest appears in a name; they are pruned least-recently-used beyond `max_bytes`
and after the session TTL. A file that fails its integrity check is deleted and
the prompt is prefilled: it is never loaded.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import struct
import threading
import time
from pathlib import Path

from .. import errors
from ..sessions.crypto import NONCE_BYTES, Sealer
from ..sessions.store import atomic_write

logger = logging.getLogger("llmws.engine.prefixes")

MAGIC = b"LLMWSKV1"
SUFFIX = ".kv"
_KIND = "prefix"


class PrefixStore:
    """Sealed KV-state files of (model, owner) prefixes under one folder.

    Thread-safe. `save` returns at once: sealing and writing happen on one
    background thread, and a `load` of the same owner meanwhile gets the pending
    state, never an older file.
    """

    def __init__(self, root: Path, sealer: Sealer, *, max_bytes: int, ttl_seconds: float | None = None) -> None:
        """Args:
        root: the folder (created 0700).
        sealer: the sessions' sealer (one master key for all of the daemon's data).
        max_bytes: total size kept; the least recently used files go first. 0 disables saving.
        ttl_seconds: files untouched for longer are deleted (at start and by `prune_expired`, which the daemon calls with its session expiry); None keeps them.
        """
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sealer = sealer
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[list[int], bytes]] = {}  # file name -> what is being written
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmws-prefixes")
        self._futures: set[concurrent.futures.Future[None]] = set()
        self.ttl_seconds = ttl_seconds
        for leftover in self.root.glob("*" + SUFFIX + ".tmp"):
            leftover.unlink(missing_ok=True)  # a write cut short by a crash
        self.prune_expired()

    # ------------------------------------------------------------------ public

    def save(self, model_id: str, owner: str, tokens: list[int], state: bytes) -> None:
        """Seal and write `state` (the KV of `tokens`) for `owner`, in the background."""
        if self.max_bytes <= 0 or not tokens or not state:
            return
        name = self._name(model_id, owner)
        with self._lock:
            self._pending[name] = (list(tokens), state)
            future = self._writer.submit(self._write, name, model_id, owner)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def load(self, model_id: str, owner: str) -> tuple[list[int], bytes] | None:
        """(tokens, state) saved for `owner` with this model, or None."""
        name = self._name(model_id, owner)
        with self._lock:
            pending = self._pending.get(name)
        if pending is not None:
            return pending
        path = self.root / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("cannot read a stored prefix: %s", exc)
            return None
        try:
            tokens, state = self._open(data, model_id, owner)
        except errors.CorruptRecord:
            logger.warning("a stored prefix failed its integrity check; deleted, the prompt is prefilled")
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        return tokens, state

    def flush(self, timeout: float | None = 60.0) -> None:
        """Wait until every save so far is on disk."""
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures, timeout=timeout)

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._files())

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _name(model_id: str, owner: str) -> str:
        digest = hashlib.sha256(json.dumps([model_id, owner]).encode("utf-8")).hexdigest()[:40]
        return digest + SUFFIX

    @staticmethod
    def _aad_owner(model_id: str, owner: str) -> str:
        # The sealer derives its key from this string and binds it as associated
        # data: a file copied to another owner's (or model's) name does not open.
        return json.dumps(["prefix", model_id, owner])

    def _write(self, name: str, model_id: str, owner: str) -> None:
        with self._lock:
            item = self._pending.get(name)
        if item is None:
            return
        tokens, state = item
        header = json.dumps({"tokens": tokens}, separators=(",", ":")).encode()
        plaintext = struct.pack("<I", len(header)) + header + state
        try:
            nonce, ciphertext = self._sealer.seal(self._aad_owner(model_id, owner), _KIND, 0, plaintext)
            atomic_write(self.root / name, MAGIC + nonce + ciphertext)
            logger.debug("stored a prefix of %d tokens (%d bytes)", len(tokens), len(ciphertext))
        except OSError as exc:
            logger.warning("cannot store a prefix (the prompt will be prefilled next time): %s", exc)
        finally:
            with self._lock:
                if self._pending.get(name) is item:
                    del self._pending[name]
        self._prune()

    def _open(self, data: bytes, model_id: str, owner: str) -> tuple[list[int], bytes]:
        head = len(MAGIC) + NONCE_BYTES
        if len(data) < head or not data.startswith(MAGIC):
            raise errors.CorruptRecord("A stored prefix failed its integrity check.")
        nonce, ciphertext = data[len(MAGIC) : head], data[head:]
        plaintext = self._sealer.open(self._aad_owner(model_id, owner), _KIND, 0, nonce, ciphertext)
        try:
            (n,) = struct.unpack_from("<I", plaintext)
            tokens = json.loads(plaintext[4 : 4 + n])["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ValueError("tokens")
        except (struct.error, ValueError, KeyError, TypeError):
            # Authentic but not ours to read (a format from another version).
            raise errors.CorruptRecord("A stored prefix failed its integrity check.") from None
        return tokens, plaintext[4 + n :]

    def _files(self) -> list[tuple[Path, int, float]]:
        out = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            if entry.name.endswith(SUFFIX):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _prune(self) -> None:
        files = sorted(self._files(), key=lambda f: f[2])  # oldest first
        total = sum(size for _, size, _ in files)
        while files and total > self.max_bytes:
            path, size, _ = files.pop(0)
            path.unlink(missing_ok=True)
            total -= size

    def prune_expired(self) -> None:
        """Delete prefixes untouched for longer than the TTL (their sessions expired too)."""
        if self.ttl_seconds is None:
            return
        cutoff = time.time() - self.ttl_seconds
        for path, _, mtime in self._files():
            if mtime < cutoff:
                path.unlink(missing_ok=True)
