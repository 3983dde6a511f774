"""Sealing of session records: the master key and AES-256-GCM with bound context.

Why: a conversation is private, and a file on disk can be read, edited, reordered
or spliced by anything that gets at the disk. Every record the store writes is
sealed here so that nothing readable lands on disk and any change is detected.

- **Master key**: 32 random bytes, taken from the environment variable
  ``LLMWS_MASTER_KEY`` (standard base64 of exactly 32 bytes) or else from
  ``<var>/keys/master.key`` (the same base64 text, one line), which is created on
  first start with mode 0600 in a 0700 directory. Losing the key makes every
  stored session unreadable (by design); keep a copy to move sessions elsewhere.
- **Per-session key**: HKDF-SHA256(master, salt=None, info=b"llmws-session:" +
  session_id), 32 bytes. A record copied into another session cannot open there.
- **Record**: AES-256-GCM with a fresh random 96-bit nonce per record; the
  associated data is ``["llmws/1", session_id, kind, seq]`` as compact JSON, so a
  record moved to another session, kind ("event" or "state") or position fails
  authentication. The ciphertext includes GCM's 16-byte tag.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from llmws_core import errors

logger = logging.getLogger("llmws.sessions.crypto")

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_FILE_NAME = "master.key"
KINDS = frozenset({"event", "state", "prefix", "journal"})
_AAD_VERSION = "llmws/1"
# Derived keys are cached so that sealing a token costs one AES-GCM call, not an
# HKDF; bounded so that a long-running daemon does not keep every id it ever saw.
_KEY_CACHE_SIZE = 1024

_KEY_HELP = (
    "must be the standard base64 encoding of exactly 32 random bytes, e.g. the output of "
    '`python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"`'
)


def _decode_key(text: str, source: str) -> bytes:
    """Decode a base64 master key, refusing anything that is not exactly 32 bytes.

    The message names the source but never the value (it is a secret).
    """
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"The master key in {source} is not valid base64: it {_KEY_HELP}.") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"The master key in {source} decodes to {len(key)} bytes, not {KEY_BYTES}: it {_KEY_HELP}.")
    return key


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (best effort where unsupported)."""
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


def _tighten(path: Path, mode: int) -> None:
    """Restrict `path` to `mode` if it is looser, with a warning (a key must not be shared)."""
    current = path.stat().st_mode & 0o777
    if current & ~mode:
        logger.warning("tightening permissions of %s from %o to %o", path, current, mode)
        os.chmod(path, mode)


def private_dir(path: Path) -> None:
    """Create `path` (and its parents) as a folder only this user can enter (0700).

    An existing folder with looser permissions is tightened, with a warning: other
    local users could otherwise list session ids, keys or models in it.

    Raises:
        SystemExit: the folder belongs to another user or cannot be made private,
            with a message that says what to fix.
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = path.stat().st_uid
        if hasattr(os, "getuid") and owner != os.getuid():
            raise SystemExit(
                f"LLMWS refuses to use {path}: it belongs to another user (uid {owner}). Use a --var-dir of your own."
            )
        _tighten(path, 0o700)
    except OSError as exc:
        raise SystemExit(
            f"LLMWS cannot make {path} private to this user (mode 0700): {exc.strerror}. "
            "Fix its permissions (chmod 700) or use another --var-dir."
        ) from None


def _create_key_file(path: Path) -> bytes:
    """Write a new random key to `path` atomically, without clobbering a concurrent one.

    The key goes to a private temporary file first (so a crash never leaves a
    half-written key that would lock the user out), then is hard-linked into place,
    which fails if another process won the race; then that process's key is used.
    """
    key = os.urandom(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added: make it exact
        os.write(fd, base64.b64encode(key) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        logger.info("another process created %s first; using its key", path)
        return _decode_key(path.read_text("ascii"), str(path))
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    logger.info("created a new master key in %s", path)
    return key


def load_or_create_master_key(keys_dir: Path, env_var: str = "LLMWS_MASTER_KEY") -> bytes:
    """Return the 32-byte master key, creating `<keys_dir>/master.key` on first start.

    Args:
        keys_dir: the key folder (normally `<var>/keys`); created with mode 0700.
        env_var: an environment variable that, when set and not blank, supplies the
            key instead of the file (then no file is read or created).

    Raises:
        ValueError: the variable or the file does not hold base64 of exactly 32 bytes.
            A bad file is never replaced: that would make every session unreadable.
    """
    value = os.environ.get(env_var)
    if value is not None and value.strip():
        return _decode_key(value, f"environment variable {env_var}")
    keys_dir = Path(keys_dir)
    private_dir(keys_dir)
    path = keys_dir / KEY_FILE_NAME
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        return _create_key_file(path)
    except UnicodeDecodeError:
        raise ValueError(f"The master key in {path} is not valid base64: it {_KEY_HELP}.") from None
    _tighten(path, 0o600)
    return _decode_key(text, str(path))


def _aad(session_id: str, kind: str, seq: int) -> bytes:
    """The associated data: JSON, so no two different contexts encode alike."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty string")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("seq must be a non-negative int")
    return _aad_prefix(session_id, kind) + b"%d]" % seq


@functools.lru_cache(maxsize=4096)
def _aad_prefix(session_id: str, kind: str) -> bytes:
    """`[version, session_id, kind,` as JSON: the part of the AAD that a session's
    records share (sealing runs once per streamed token)."""
    whole = json.dumps([_AAD_VERSION, session_id, kind, 0], separators=(",", ":")).encode()
    return whole[: -len(b"0]")]


class Sealer:
    """Seals and opens records with per-session keys derived from one master key.

    Thread-safe: the daemon seals from the event loop thread while other threads
    may open records (recovery, expiry).
    """

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != KEY_BYTES:
            raise ValueError(f"the master key must be exactly {KEY_BYTES} bytes")
        self._master = bytes(master_key)
        self._lock = threading.Lock()
        self._ciphers: OrderedDict[str, AESGCM] = OrderedDict()

    def _cipher(self, session_id: str) -> AESGCM:
        """The AES-GCM instance for one session's derived key (cached, LRU-bounded)."""
        with self._lock:
            cipher = self._ciphers.get(session_id)
            if cipher is not None:
                self._ciphers.move_to_end(session_id)
                return cipher
        derived = HKDF(
            algorithm=hashes.SHA256(),
            length=KEY_BYTES,
            salt=None,
            info=b"llmws-session:" + session_id.encode("utf-8"),
        ).derive(self._master)
        cipher = AESGCM(derived)
        with self._lock:
            self._ciphers[session_id] = cipher
            self._ciphers.move_to_end(session_id)
            while len(self._ciphers) > _KEY_CACHE_SIZE:
                self._ciphers.popitem(last=False)
        return cipher

    def seal(self, session_id: str, kind: str, seq: int, plaintext: bytes) -> tuple[bytes, bytes]:
        """Encrypt `plaintext` for (session_id, kind, seq).

        Returns:
            (nonce, ciphertext): a fresh random 12-byte nonce, and the ciphertext with
            its 16-byte tag appended.
        """
        aad = _aad(session_id, kind, seq)
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._cipher(session_id).encrypt(nonce, bytes(plaintext), aad)

    def open(self, session_id: str, kind: str, seq: int, nonce: bytes, ciphertext: bytes) -> bytes:
        """Decrypt a record sealed for exactly (session_id, kind, seq).

        Raises:
            errors.CorruptRecord: the record was edited, damaged, or sealed for another
                session, kind or position.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            # The seq comes from disk here: a damaged one is a corrupt record, not a bug.
            raise errors.CorruptRecord("A stored record failed its integrity check.")
        aad = _aad(session_id, kind, seq)
        if len(nonce) != NONCE_BYTES:
            raise errors.CorruptRecord("A stored record failed its integrity check.")
        try:
            return self._cipher(session_id).decrypt(nonce, bytes(ciphertext), aad)
        except InvalidTag:
            raise errors.CorruptRecord("A stored record failed its integrity check.") from None
