"""The sealed session store: durability, recovery, tamper detection, ack, expiry.

No sockets: these tests drive `SessionStore` directly and edit its files the way a
crash or an attacker would.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from llmws_core import errors
from llmws_core.sessions import store as store_mod
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import BUFFER_NAME, STATE_NAME, SessionStore, corrupt_event

SECRET = "purple-elephant-4471"


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(b"k" * 32)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def store(root: Path, sealer: Sealer) -> SessionStore:
    return SessionStore(root, sealer)


def _fill(session, n: int, start: int = 1) -> list[dict]:
    return [session.append({"type": "token", "data": f"tok{i} {SECRET}"}) for i in range(start, start + n)]


def _reopen(root: Path, sealer: Sealer, sid: str, **kw):
    """A fresh store on the same folder, as after a SIGKILL (nothing closed or saved)."""
    return SessionStore(root, sealer, **kw).get(sid)


def _buffer(root: Path, sid: str) -> Path:
    return root / sid / BUFFER_NAME


def _lines(root: Path, sid: str) -> list[bytes]:
    return _buffer(root, sid).read_bytes().splitlines(keepends=True)


def _put_lines(root: Path, sid: str, lines: list[bytes]) -> None:
    _buffer(root, sid).write_bytes(b"".join(lines))


def _edit_record(line: bytes, field: str) -> bytes:
    """Flip one bit inside the decoded nonce or ciphertext of a buffer line."""
    record = json.loads(line)
    raw = bytearray(base64.b64decode(record[field]))
    raw[len(raw) // 2] ^= 0x04
    record[field] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(record).encode() + b"\n"


def _seqs(events: list[dict]) -> list[int]:
    return [e["seq"] for e in events]


def _no_secret_in(events: list[dict], secret: str) -> bool:
    return all(secret not in json.dumps(e) for e in events)


# -- basics -------------------------------------------------------------------


def test_append_replay_roundtrip(store):
    """Appended events come back in order with consecutive seqs, from memory."""
    session = store.create()
    assert session.last_seq == 0 and session.acked_seq == 0
    original = {"type": "token", "data": "hi"}
    sent = session.append(original)
    assert sent == {"type": "token", "data": "hi", "seq": 1}
    assert "seq" not in original  # the caller's dict is not modified
    sent["data"] = "changed by the caller"
    more = _fill(session, 3, start=2)
    assert _seqs(more) == [2, 3, 4]
    replayed = session.replay(0)
    assert replayed[0] == {"type": "token", "data": "hi", "seq": 1}
    assert replayed[1:] == more
    assert _seqs(session.replay(2)) == [3, 4]
    assert session.replay(4) == []


def test_reopen_after_crash_recovers_everything(root, sealer, store):
    """After a kill without shutdown, a new daemon replays every event that was sent and continues the seq."""
    first = store.create()
    second = store.create()
    a = _fill(first, 5)
    b = _fill(second, 2)
    # no close_all, no save_state: simulate SIGKILL
    again = SessionStore(root, sealer)
    assert sorted(again.ids()) == sorted([first.id, second.id])
    ra, rb = again.get(first.id), again.get(second.id)
    assert ra.replay(0) == a and rb.replay(0) == b
    assert ra.last_seq == 5 and ra.integrity_problems == 0
    assert ra.append({"type": "done"})["seq"] == 6


def test_torn_last_line_is_dropped_and_truncated(root, sealer, store):
    """A half-written last line from a crash is dropped silently and the session keeps working."""
    session = store.create()
    events = _fill(session, 3)
    good_size = _buffer(root, session.id).stat().st_size
    with open(_buffer(root, session.id), "ab") as handle:
        handle.write(b'{"s":4,"n":"AAAA","c":"Zm9v')  # no newline: torn
    recovered = _reopen(root, sealer, session.id)
    assert recovered.replay(0) == events
    assert _buffer(root, session.id).stat().st_size == good_size
    assert recovered.append({"type": "token", "data": "x"})["seq"] == 4
    assert _seqs(_reopen(root, sealer, session.id).replay(0)) == [1, 2, 3, 4]


def test_state_roundtrip(root, sealer, store):
    """History and config saved in the session state come back after a restart."""
    session = store.create()
    session.state["history"] = [{"role": "user", "content": "héllo ✓"}]
    session.state["config"] = {"temperature": 0.5, "max_new_tokens": 64}
    session.append({"type": "token", "data": "t"})
    session.save_state()
    assert not session.dirty  # the buffer is durable before the state names its seq
    recovered = _reopen(root, sealer, session.id)
    assert recovered.state == session.state
    assert recovered.created == session.created
    assert recovered.last_active == session.last_active


def test_no_plaintext_on_disk(tmp_path, root, sealer, store):
    """No conversation text (events, history, config) can be found in any file on disk."""
    session = store.create()
    _fill(session, 4)
    session.state["history"] = [{"role": "user", "content": f"tell me about {SECRET}"}]
    session.state["config"] = {"system": f"You know {SECRET}"}
    session.save_state()
    session.ack(2)
    store.close_all()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {BUFFER_NAME, STATE_NAME}
    for line in _lines(root, session.id):
        assert set(json.loads(line)) == {"s", "n", "c"}  # the documented line format
    assert set(json.loads((root / session.id / STATE_NAME).read_bytes())) == {"v", "g", "n", "c"}
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data
        assert b"tell me" not in data and b"tok3" not in data
    assert SECRET in json.dumps(_reopen(root, sealer, session.id).state)


# -- tamper detection ---------------------------------------------------------


@pytest.mark.parametrize("field", ["c", "n"])
def test_flipped_byte_in_record_is_reported(root, sealer, store, field):
    """An edited stored event is replaced by a corrupt_record error, never shown as text."""
    session = store.create()
    session.append({"type": "token", "data": "one"})
    session.append({"type": "token", "data": f"two {SECRET}"})
    session.append({"type": "token", "data": "three"})
    lines = _lines(root, session.id)
    lines[1] = _edit_record(lines[1], field)
    _put_lines(root, session.id, lines)
    replayed = _reopen(root, sealer, session.id).replay(0)
    assert replayed[1] == corrupt_event(2)
    assert [e.get("data") for e in replayed] == ["one", None, "three"]
    assert _no_secret_in(replayed, SECRET)


def test_flipped_byte_in_seq_field_is_reported(root, sealer, store):
    """Changing the seq written in clear makes the record fail its check instead of moving it."""
    session = store.create()
    _fill(session, 3)
    lines = _lines(root, session.id)
    assert lines[1].startswith(b'{"s":2,')
    lines[1] = b'{"s":3,' + lines[1][len(b'{"s":2,') :]
    _put_lines(root, session.id, lines)
    recovered = _reopen(root, sealer, session.id)
    replayed = recovered.replay(0)
    assert _seqs(replayed) == [1, 2, 3]
    assert replayed[1] == corrupt_event(2)
    assert replayed[2]["data"].startswith("tok3")
    assert recovered.integrity_problems >= 1


def test_reordered_lines_are_reported(root, sealer, store):
    """Swapped records are detected: the stream reports an error and stays in seq order."""
    session = store.create()
    _fill(session, 4)
    lines = _lines(root, session.id)
    lines[1], lines[2] = lines[2], lines[1]
    _put_lines(root, session.id, lines)
    replayed = _reopen(root, sealer, session.id).replay(0)
    seqs = _seqs(replayed)
    assert seqs == sorted(set(seqs))  # strictly increasing: nothing shown twice
    assert corrupt_event(2) in replayed
    assert not any(e.get("data", "").startswith("tok2") for e in replayed)


def test_line_spliced_from_another_session_is_reported(root, sealer, store):
    """A record copied from another conversation is never shown in this one."""
    mine, theirs = store.create(), store.create()
    _fill(mine, 3)
    theirs.append({"type": "token", "data": "x"})
    theirs.append({"type": "token", "data": "their private words"})
    lines = _lines(root, mine.id)
    lines[1] = _lines(root, theirs.id)[1]  # same seq (2), other session
    _put_lines(root, mine.id, lines)
    replayed = _reopen(root, sealer, mine.id).replay(0)
    assert replayed[1] == corrupt_event(2)
    assert _no_secret_in(replayed, "their private words")


def test_line_spliced_from_another_position_is_reported(root, sealer, store):
    """A record of the same session copied over another position is detected, not replayed twice."""
    session = store.create()
    _fill(session, 4)
    lines = _lines(root, session.id)
    lines[1] = lines[3]  # seq 4's record where seq 2 was
    _put_lines(root, session.id, lines)
    replayed = _reopen(root, sealer, session.id).replay(0)
    assert replayed[0]["seq"] == 1 and replayed[1] == corrupt_event(2)
    seqs = _seqs(replayed)
    assert seqs == sorted(set(seqs))
    assert sum(1 for e in replayed if e.get("data", "").startswith("tok4")) == 1


def test_deleted_middle_line_is_reported(root, sealer, store):
    """A record removed from the middle shows up as a corrupt_record error at its seq."""
    session = store.create()
    _fill(session, 5)
    lines = _lines(root, session.id)
    del lines[2]
    _put_lines(root, session.id, lines)
    replayed = _reopen(root, sealer, session.id).replay(0)
    assert _seqs(replayed) == [1, 2, 3, 4, 5]
    assert replayed[2] == corrupt_event(3)
    # a client that already has seq 1 still learns of the gap; one past it does not
    assert _reopen(root, sealer, session.id).replay(3)[0]["seq"] == 4


def test_wide_gap_is_one_error_and_honours_after_seq(root, sealer, store):
    """Several records deleted together give one error, placed after what the client has."""
    session = store.create()
    _fill(session, 6)
    lines = _lines(root, session.id)
    del lines[1:4]  # seqs 2..4
    _put_lines(root, session.id, lines)
    recovered = _reopen(root, sealer, session.id)
    assert _seqs(recovered.replay(0)) == [1, 2, 5, 6]
    assert recovered.replay(2)[0] == corrupt_event(3)
    assert recovered.replay(4)[0]["seq"] == 5


def test_deleted_first_line_after_ack_is_reported(root, sealer, store):
    """Removing the oldest unacknowledged record is detected too."""
    session = store.create()
    _fill(session, 5)
    session.ack(2)
    lines = _lines(root, session.id)
    assert json.loads(lines[0])["s"] == 3
    _put_lines(root, session.id, lines[1:])
    replayed = _reopen(root, sealer, session.id).replay(0)
    assert replayed[0] == corrupt_event(3)
    assert _seqs(replayed) == [3, 4, 5]


def test_deleted_last_lines_are_reported_and_seq_not_reused(root, sealer, store):
    """Records cut from the end (once the state knew of them) are reported, and their seqs never reused."""
    session = store.create()
    _fill(session, 5)
    session.save_state()
    _put_lines(root, session.id, _lines(root, session.id)[:3])
    recovered = _reopen(root, sealer, session.id)
    assert recovered.replay(3) == [corrupt_event(4)]
    assert recovered.last_seq == 5
    assert recovered.append({"type": "done"})["seq"] == 6


def test_tampered_state_is_refused_and_kept(root, sealer, store):
    """An edited state file is reported as corrupt, and the session folder is not deleted."""
    session = store.create()
    session.save_state()
    path = root / session.id / STATE_NAME
    record = json.loads(path.read_bytes())
    raw = bytearray(base64.b64decode(record["c"]))
    raw[0] ^= 1
    record["c"] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(record))
    with pytest.raises(errors.CorruptRecord):
        SessionStore(root, sealer).get(session.id)
    assert path.exists()


def test_state_of_another_session_is_refused(root, sealer, store):
    """A state file copied from another session does not open."""
    a, b = store.create(), store.create()
    (root / a.id / STATE_NAME).write_bytes((root / b.id / STATE_NAME).read_bytes())
    with pytest.raises(errors.CorruptRecord):
        SessionStore(root, sealer).get(a.id)


# -- ack ------------------------------------------------------------------------


def test_ack_trims_and_persists(root, sealer, store):
    """Acknowledged events are forgotten in memory and on disk, also after a restart."""
    session = store.create()
    _fill(session, 5)
    assert session.ack(3) == 3
    assert _seqs(session.replay(0)) == [4, 5]
    assert len(_lines(root, session.id)) == 2
    recovered = _reopen(root, sealer, session.id)
    assert recovered.acked_seq == 3 and recovered.last_seq == 5
    assert _seqs(recovered.replay(0)) == [4, 5]
    assert recovered.integrity_problems == 0
    assert recovered.append({"type": "done"})["seq"] == 6


def test_ack_all_clamps_and_ignores_old(store):
    """ack without seq takes everything; beyond last_seq clamps; an older ack changes nothing."""
    session = store.create()
    _fill(session, 3)
    assert session.ack(1) == 1
    assert session.ack(0) == 1
    assert session.ack(99) == 3
    assert session.replay(0) == []
    _fill(session, 2, start=4)
    assert session.ack() == 5
    assert session.acked_seq == 5 and session.replay(0) == []


def test_ack_interrupted_before_trim_recovers_cleanly(root, sealer, store, monkeypatch):
    """A crash between saving the ack and trimming the file loses nothing and reports nothing."""
    session = store.create()
    _fill(session, 5)

    def fail() -> None:
        raise OSError(errno.EIO, "simulated crash before the rewrite")

    monkeypatch.setattr(session, "_rewrite_buffer", fail)
    assert session.ack(3) == 3
    assert len(_lines(root, session.id)) == 5  # not trimmed
    recovered = _reopen(root, sealer, session.id)
    assert _seqs(recovered.replay(0)) == [4, 5]
    assert recovered.integrity_problems == 0


def test_ack_keeps_reporting_unacked_corruption(root, sealer, store):
    """Trimming keeps a corrupt record that was not yet acknowledged, so it stays reported."""
    session = store.create()
    _fill(session, 4)
    lines = _lines(root, session.id)
    lines[2] = _edit_record(lines[2], "c")
    _put_lines(root, session.id, lines)
    recovered = _reopen(root, sealer, session.id)
    recovered.ack(1)
    again = _reopen(root, sealer, session.id).replay(0)
    assert again[1] == corrupt_event(3)
    assert _seqs(again) == [2, 3, 4]


# -- failures and durability ----------------------------------------------------


def test_write_error_raises_storage_error_and_session_stays_readable(root, sealer, store, monkeypatch):
    """A full disk fails the append with storage_error; earlier events still replay and the seq is not lost."""
    session = store.create()
    events = _fill(session, 2)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", full)
    with pytest.raises(errors.StorageError) as info:
        session.append({"type": "token", "data": "lost"})
    assert "No space" not in info.value.message
    monkeypatch.undo()
    assert session.last_seq == 2
    assert session.replay(0) == events
    assert session.append({"type": "token", "data": "after"})["seq"] == 3
    recovered = _reopen(root, sealer, session.id)
    assert _seqs(recovered.replay(0)) == [1, 2, 3] and recovered.integrity_problems == 0


def test_partial_write_is_undone(root, sealer, store, monkeypatch):
    """A write that stops half-way leaves no broken line behind for later appends."""
    session = store.create()
    _fill(session, 1)
    real_write = os.write
    calls = {"n": 0}

    def half_then_fail(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", half_then_fail)
    with pytest.raises(errors.StorageError):
        session.append({"type": "token", "data": "lost"})
    monkeypatch.undo()
    session.append({"type": "token", "data": "kept"})
    recovered = _reopen(root, sealer, session.id)
    assert [e["data"] for e in recovered.replay(0)] == ["tok1 " + SECRET, "kept"]
    assert recovered.integrity_problems == 0


def test_sync_dirty_fsyncs_once_per_dirty_session(store, monkeypatch):
    """Appends never fsync; sync_dirty does one fsync per session with new writes, none when clean."""
    busy1, busy2, idle = store.create(), store.create(), store.create()
    count = {"n": 0}
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        count["n"] += 1
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", counting)
    _fill(busy1, 50)
    _fill(busy2, 7)
    assert count["n"] == 0
    store.sync_dirty()
    assert count["n"] == 2
    assert not busy1.dirty and not busy2.dirty and not idle.dirty
    store.sync_dirty()
    assert count["n"] == 2


def test_sync_dirty_from_a_thread_while_appending(root, sealer, store):
    """Syncing from a worker thread during fast appends loses and corrupts nothing."""
    session = store.create()
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            store.sync_dirty()

    worker = threading.Thread(target=flusher)
    worker.start()
    try:
        for i in range(1500):
            session.append({"type": "token", "data": str(i)})
            if i == 700:
                session.ack(300)
    finally:
        stop.set()
        worker.join()
    recovered = _reopen(root, sealer, session.id)
    assert _seqs(recovered.replay(0)) == list(range(301, 1501))
    assert recovered.integrity_problems == 0


def test_close_all_then_reopen(root, sealer, store):
    """A clean shutdown saves state and buffers; a restart sees the same sessions."""
    session = store.create()
    events = _fill(session, 3)
    session.state["history"] = ["x"]
    store.close_all()
    recovered = _reopen(root, sealer, session.id)
    assert recovered.replay(0) == events and recovered.state == {"history": ["x"]}


# -- ids and expiry ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "not-a-uuid",
        "",
        "../../etc/passwd",
        str(uuid.uuid4()).upper(),
        uuid.uuid4().hex,
        "{" + str(uuid.uuid4()) + "}",
        str(uuid.uuid4()) + "/..",
    ],
)
def test_malformed_ids_are_not_found(store, bad):
    """Ids that are not canonical UUIDs are unknown sessions, never paths."""
    with pytest.raises(errors.SessionNotFound) as info:
        store.get(bad)
    assert type(info.value) is errors.SessionNotFound
    assert store.exists(bad) is False


def test_unknown_id_is_not_found(store):
    """A well-formed id that was never created is reported as not found."""
    sid = str(uuid.uuid4())
    with pytest.raises(errors.SessionNotFound):
        store.get(sid)
    assert not store.exists(sid)


def test_expired_session_raises_and_is_deleted(root, sealer):
    """A session idle past its TTL is refused as expired and its files are gone."""
    store = SessionStore(root, sealer, ttl_seconds=60)
    session = store.create()
    _fill(session, 2)
    session.last_active = time.time() - 120
    session.save_state()
    fresh = SessionStore(root, sealer, ttl_seconds=60)
    assert fresh.exists(session.id)
    with pytest.raises(errors.SessionExpired):
        fresh.get(session.id)
    assert not (root / session.id).exists()
    with pytest.raises(errors.SessionNotFound):
        fresh.get(session.id)
    assert [p.name for p in root.iterdir()] == []


def test_idle_session_in_memory_is_left_to_the_sweep(root, sealer):
    """A session in memory is not deleted by a lookup (a client may be attached); the sweep expires it."""
    store = SessionStore(root, sealer, ttl_seconds=60)
    session = store.create()
    session.last_active -= 61
    assert store.get(session.id) is session
    assert store.expire_idle() == [session.id]
    assert not (root / session.id).exists()
    with pytest.raises(errors.SessionNotFound):
        store.get(session.id)


def test_expire_idle_spares_busy_and_fresh_sessions(root, sealer):
    """The idle sweep deletes only sessions past the TTL that nobody is using, in memory or on disk."""
    store = SessionStore(root, sealer, ttl_seconds=60)
    old, busy, fresh = store.create(), store.create(), store.create()
    for s in (old, busy):
        s.last_active = time.time() - 120
        s.save_state()
    fresh.touch()
    assert store.expire_idle(busy={busy.id}) == [old.id]  # sessions in memory
    assert sorted(store.ids()) == sorted([busy.id, fresh.id])
    restarted = SessionStore(root, sealer, ttl_seconds=60)  # sessions known only on disk
    assert restarted.expire_idle(busy={busy.id}) == []
    assert restarted.expire_idle() == [busy.id]
    assert restarted.expire_idle(now=time.time() + 3600) == [fresh.id]
    assert restarted.ids() == []


def test_leftovers_of_interrupted_create_are_swept(root, sealer, store):
    """A folder half-made by a crash during create is not a session and is cleaned up."""
    (root / f".tmp-{uuid.uuid4()}").mkdir()
    session = store.create()
    again = SessionStore(root, sealer)
    assert again.ids() == [session.id]
    assert sorted(p.name for p in root.iterdir()) == [session.id]


def test_files_are_private(root, store):
    """Session folders and files are readable by the owner only."""
    session = store.create()
    _fill(session, 1)
    session.ack()
    assert (root / session.id).stat().st_mode & 0o077 == 0
    for path in (root / session.id).iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


_WRITER = """
import sys
from pathlib import Path
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import SessionStore

store = SessionStore(Path(sys.argv[1]), Sealer(b"k" * 32))
session = store.create()
print(session.id, flush=True)
i = 0
while True:
    i += 1
    sent = session.append({"type": "token", "data": "t%d" % i})
    print(sent["seq"], flush=True)  # "sent to the client" only after append returned
    if i % 50 == 0:
        store.sync_dirty()
"""


def test_sigkill_loses_nothing_that_was_sent(root, sealer):
    """A daemon killed with SIGKILL mid-stream comes back with every event it had sent."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert proc.stdout is not None
        sid = proc.stdout.readline().strip()
        last_sent = 0
        while last_sent < 400:
            last_sent = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:  # anything printed before the kill landed was sent too
            if line.strip():
                last_sent = int(line)
    finally:
        proc.kill()
        proc.wait()
    recovered = SessionStore(root, sealer).get(sid)
    replayed = recovered.replay(0)
    assert recovered.integrity_problems == 0
    assert recovered.last_seq >= last_sent
    assert _seqs(replayed) == list(range(1, recovered.last_seq + 1))
    assert replayed[last_sent - 1]["data"] == f"t{last_sent}"


# -- the fast paths: one JSON per event, disk work off the event loop ------------------


def test_buffer_line_is_the_json_of_its_record(store):
    """The hand-formatted buffer line is byte for byte the JSON the format describes."""
    nonce, ciphertext = os.urandom(12), os.urandom(40)
    line = store_mod._encode_line(17, nonce, ciphertext)
    assert line == store_mod._dumps({"s": 17, "n": store_mod._b64(nonce), "c": store_mod._b64(ciphertext)}) + b"\n"


def test_appended_event_carries_the_json_that_was_sealed(root, sealer, store):
    """What a socket sends for an event (`frame`) is exactly what the buffer holds sealed."""
    session = store.create()
    event = session.append({"type": "token", "data": 'héllo "quoted"'})
    assert json.loads(event.frame) == event
    record = json.loads(_lines(root, session.id)[0])
    opened = sealer.open(session.id, "event", record["s"], base64.b64decode(record["n"]), base64.b64decode(record["c"]))
    assert opened == event.frame


def _hold_fsync(monkeypatch, *, which: str) -> tuple[threading.Event, threading.Event]:
    """Make the first fsync called from a worker thread inside `which` wait for a release."""
    entered, release = threading.Event(), threading.Event()
    real = os.fsync
    held = []

    def fsync(fd: int) -> None:
        import traceback

        if (
            not held
            and threading.current_thread() is not threading.main_thread()
            and any(f.name == which for f in traceback.extract_stack())
        ):
            held.append(fd)
            entered.set()
            assert release.wait(10)
        real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    return entered, release


def test_ack_keeps_what_is_appended_while_the_buffer_is_rewritten(root, sealer, store, monkeypatch):
    """Tokens streamed while an ack rewrites the buffer (in a worker thread) are all
    there after a SIGKILL, in order, with nothing reported missing."""
    import asyncio

    session = store.create()
    _fill(session, 5)
    entered, release = _hold_fsync(monkeypatch, which="_rewrite_buffer")

    async def scenario() -> None:
        ack = asyncio.create_task(session.ack_async(3))
        assert await asyncio.to_thread(entered.wait, 10)
        _fill(session, 4, start=6)  # the loop keeps streaming meanwhile
        release.set()
        assert await ack == 3
        _fill(session, 2, start=10)

    asyncio.run(scenario())
    recovered = _reopen(root, sealer, session.id)
    assert _seqs(recovered.replay(0)) == list(range(4, 12))
    assert [e["data"].split()[0] for e in recovered.replay(0)] == [f"tok{i}" for i in range(4, 12)]
    assert recovered.integrity_problems == 0


def test_state_save_does_not_hold_up_the_event_loop(root, sealer, store, monkeypatch):
    """While a state save waits on a slow disk, the loop keeps running other work."""
    import asyncio

    session = store.create()
    entered, release = _hold_fsync(monkeypatch, which="_commit_state")
    session.state["history"] = [{"role": "user", "content": "kept"}]

    async def scenario() -> None:
        save = asyncio.create_task(session.save_state_async())
        assert await asyncio.to_thread(entered.wait, 10)
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        _fill(session, 1)  # appends work while the save is held
        assert ticks == 5 and not save.done()
        release.set()
        await save

    asyncio.run(scenario())
    assert _reopen(root, sealer, session.id).state["history"] == [{"role": "user", "content": "kept"}]


def test_a_state_save_that_finishes_late_never_replaces_a_newer_one(root, sealer, store, monkeypatch):
    """Two saves in flight, the older one slower: the state on disk is the newer."""
    import asyncio

    session = store.create()
    entered, release = _hold_fsync(monkeypatch, which="_commit_state")

    async def scenario() -> None:
        session.state["n"] = 1
        first = asyncio.create_task(session.save_state_async())
        assert await asyncio.to_thread(entered.wait, 10)  # the first save is stuck in fsync
        session.state["n"] = 2
        second = asyncio.create_task(session.save_state_async())
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert _reopen(root, sealer, session.id).state["n"] == 2


def test_saves_committed_out_of_order_keep_the_newest(root, sealer, store):
    """A state sealed earlier but written last (worker threads race) is dropped."""
    session = store.create()
    session.state["n"] = 1
    older = session._prepare_state(session.acked_seq)
    session.state["n"] = 2
    newer = session._prepare_state(session.acked_seq)
    session._commit_state(*newer)
    session._commit_state(*older)
    assert _reopen(root, sealer, session.id).state["n"] == 2


def test_a_sync_returns_only_once_earlier_writes_are_on_disk(root, sealer, store, monkeypatch):
    """Two threads sync one buffer: the second waits for the first's fsync instead of
    returning at once (a state saved after it must never name an unsynced seq)."""
    session = store.create()
    _fill(session, 3)
    entered, release = _hold_fsync(monkeypatch, which="sync")
    first = threading.Thread(target=session.sync)
    first.start()
    assert entered.wait(10)
    second_done = threading.Event()
    second = threading.Thread(target=lambda: (session.sync(), second_done.set()))
    second.start()
    assert not second_done.wait(0.3), "a sync returned while the buffer's fsync was still running"
    release.set()
    first.join(10)
    second.join(10)
    assert second_done.is_set()
    assert not session.dirty


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count descriptors")
def test_open_buffer_files_are_bounded_and_closed_ones_reopen(root, sealer):
    """300 sessions that each wrote an event hold at most `max_open_buffers` descriptors; a closed buffer reopens on its next append and its events survive a reload."""
    store = SessionStore(root, sealer, max_open_buffers=16)
    before = _open_fds()
    sessions = [store.create() for _ in range(300)]
    for s in sessions:
        s.append({"type": "reset_done"})
    assert store.open_buffers() <= 16
    assert _open_fds() - before <= 16 + 2
    first = sessions[0]
    assert not first.has_fd
    first.append({"type": "pong"})  # reopens
    first.sync()
    store.sync_dirty()  # syncs the ones whose descriptor was closed, through a new one
    assert not any(s.dirty for s in sessions)
    store.close_all()
    again = SessionStore(root, sealer)
    assert [e["type"] for e in again.get(first.id).replay(0)] == ["reset_done", "pong"]


def test_idle_buffers_are_closed(root, sealer):
    """A buffer with no write for a while gives its descriptor back."""
    store = SessionStore(root, sealer)
    s = store.create()
    s.append({"type": "reset_done"})
    assert s.has_fd
    assert store.close_idle_buffers(now=time.time() + SessionStore.IDLE_CLOSE_SECONDS + 1) == 1
    assert not s.has_fd and store.open_buffers() == 0


def _journaled_store(root: Path, sealer: Sealer) -> SessionStore:
    from llmws_core.sessions.journal import SeqJournal

    return SessionStore(root, sealer, journal=SeqJournal(root.parent / "journal.bin", sealer))


def test_a_buffer_put_back_from_earlier_never_reuses_a_seq(root, sealer):
    """An older buffer.jsonl restored after seqs 6..10 were handed out: the reload continues at 11 and replays 6..10 as corrupt_record."""
    store = _journaled_store(root, sealer)
    s = store.create()
    _fill(s, 5)
    s.save_state()
    store.sync_dirty()
    old_buffer = (root / s.id / BUFFER_NAME).read_bytes()
    _fill(s, 5, start=6)
    store.sync_dirty()  # the journal now says seq 10
    s.close()  # killed: no state save after seq 5
    (root / s.id / BUFFER_NAME).write_bytes(old_buffer)
    again = _journaled_store(root, sealer).get(s.id)
    assert again.last_seq == 10 and again.integrity_problems >= 1
    replay = again.replay(5)
    assert replay == [corrupt_event(6)]
    assert again.append({"type": "pong"})["seq"] == 11


def test_a_whole_session_put_back_from_earlier_is_refused(root, sealer, tmp_path):
    """An older copy of a session's folder (state and buffer) restored over a newer one is refused as corrupt, not resumed with seqs the client saw."""
    import shutil

    store = _journaled_store(root, sealer)
    s = store.create()
    _fill(s, 3)
    s.save_state()
    store.sync_dirty()
    shutil.copytree(root / s.id, tmp_path / "backup")
    _fill(s, 3, start=4)
    s.save_state()
    store.close_all()
    shutil.rmtree(root / s.id)
    shutil.copytree(tmp_path / "backup", root / s.id)
    with pytest.raises(errors.CorruptRecord):
        _journaled_store(root, sealer).get(s.id)


def test_the_journal_survives_restarts_and_forgets_deleted_sessions(root, sealer):
    """Marks are kept across reopenings (compacted), and a deleted session's mark goes with it."""
    from llmws_core.sessions.journal import SeqJournal

    store = _journaled_store(root, sealer)
    keep, drop = store.create(), store.create()
    _fill(keep, 4)
    _fill(drop, 2)
    store.sync_dirty()
    store._delete(drop.id)
    store.close_all()
    journal = SeqJournal(root.parent / "journal.bin", sealer)
    assert journal.get(keep.id)[0] == 4 and journal.get(drop.id) is None
    assert len((root.parent / "journal.bin").read_bytes().splitlines()) == 1


def test_the_journal_is_compacted_as_it_grows(root, sealer, monkeypatch):
    """Past COMPACT_AFTER appended lines the journal is rewritten as one, keeping every mark."""
    from llmws_core.sessions import journal as journal_mod

    monkeypatch.setattr(journal_mod, "COMPACT_AFTER", 5)
    j = journal_mod.SeqJournal(root.parent / "journal.bin", sealer)
    for i in range(1, 9):
        j.record({"a": (i, 1), "b": (i * 2, 1)})
    assert len((root.parent / "journal.bin").read_bytes().splitlines()) <= 5
    again = journal_mod.SeqJournal(root.parent / "journal.bin", sealer)
    assert again.get("a") == (8, 1) and again.get("b") == (16, 1)
