"""The sealed prefix store: KV states on disk, bound to their owner and model."""

from __future__ import annotations

import os
from pathlib import Path

from llmws_core.engine.prefixes import PrefixStore
from llmws_core.sessions.crypto import Sealer

KEY = bytes(range(32))


def store(tmp_path: Path, **kw: object) -> PrefixStore:
    return PrefixStore(tmp_path / "prefixes", Sealer(KEY), max_bytes=kw.pop("max_bytes", 10**9), **kw)  # type: ignore[arg-type]


def test_saved_state_loads_back_for_its_owner_and_model_only(tmp_path: Path) -> None:
    """A stored prefix comes back whole for the same owner and model, and for nobody else."""
    s = store(tmp_path)
    state = os.urandom(5000)
    s.save("m1", "alice", list(range(100)), state)
    s.flush()
    fresh = store(tmp_path)  # as after a restart
    assert fresh.load("m1", "alice") == (list(range(100)), state)
    assert fresh.load("m1", "bob") is None
    assert fresh.load("m2", "alice") is None


def test_nothing_readable_on_disk(tmp_path: Path) -> None:
    """Neither the owner's name nor the token ids nor the state appear in plaintext on disk."""
    s = store(tmp_path)
    state = b"SECRET-KV-STATE" * 100
    s.save("m1", "session-1234", [424242] * 40, state)
    s.flush()
    files = list((tmp_path / "prefixes").iterdir())
    assert len(files) == 1 and "session-1234" not in files[0].name
    data = files[0].read_bytes()
    assert b"SECRET-KV-STATE" not in data and b"424242" not in data and b"session-1234" not in data
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"


def test_tampered_or_swapped_file_is_refused_and_deleted(tmp_path: Path) -> None:
    """An edited file, or one copied over another owner's, never loads; it is deleted."""
    s = store(tmp_path)
    s.save("m1", "alice", [1] * 40, b"a" * 1000)
    s.save("m1", "bob", [2] * 40, b"b" * 1000)
    s.flush()
    root = tmp_path / "prefixes"
    alice, bob = (root / PrefixStore._name("m1", o) for o in ("alice", "bob"))
    raw = bytearray(alice.read_bytes())
    raw[-5] ^= 1
    alice.write_bytes(bytes(raw))
    assert store(tmp_path).load("m1", "alice") is None
    assert not alice.exists()
    alice.write_bytes(bob.read_bytes())  # bob's file under alice's name
    assert store(tmp_path).load("m1", "alice") is None


def test_pending_save_is_what_load_returns(tmp_path: Path) -> None:
    """A load right after a save sees the new state even before it reaches the disk."""
    s = store(tmp_path)
    s.save("m1", "alice", [1] * 40, b"old" * 100)
    s.flush()
    s.save("m1", "alice", [1] * 50, b"new" * 100)
    assert s.load("m1", "alice") == ([1] * 50, b"new" * 100)
    s.flush()
    assert store(tmp_path).load("m1", "alice") == ([1] * 50, b"new" * 100)


def test_oldest_files_go_beyond_the_size_cap(tmp_path: Path) -> None:
    """Beyond max_bytes the least recently used prefixes are deleted."""
    s = store(tmp_path, max_bytes=25_000)
    for i in range(4):
        s.save("m1", f"owner{i}", [i] * 40, os.urandom(10_000))
        s.flush()
        path = tmp_path / "prefixes" / PrefixStore._name("m1", f"owner{i}")
        os.utime(path, (1000 + i, 1000 + i))
    s.save("m1", "owner9", [9] * 40, os.urandom(10_000))
    s.flush()
    assert s.total_bytes() <= 25_000
    assert s.load("m1", "owner9") is not None
    assert s.load("m1", "owner0") is None


def test_ttl_deletes_stale_files_at_start(tmp_path: Path) -> None:
    """Files untouched for longer than the session TTL are gone at the next start."""
    s = store(tmp_path)
    s.save("m1", "alice", [1] * 40, b"x" * 100)
    s.flush()
    path = tmp_path / "prefixes" / PrefixStore._name("m1", "alice")
    os.utime(path, (1, 1))
    assert store(tmp_path, ttl_seconds=3600).load("m1", "alice") is None
    assert not path.exists()
