"""The sealed-buffer reader against random damage: truncation, flipped bytes,
reordered, duplicated, deleted and spliced records (hypothesis over mutations of a
real buffer written by SessionStore).

The property: after any damage, reopening the session never returns text that was
not written (every replayed event is the original event of its seq, byte for byte),
never replays an event twice, and whatever is missing or changed is reported
(a `corrupt_record` in the replay, or at least a counted integrity problem).
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import BUFFER_NAME, SessionStore

SECRET = "zebra-marmalade-9931"
N_EVENTS = 12


class Corpus:
    """A real session (A) of N_EVENTS events, and another session (B) to splice from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sealer = Sealer(b"s" * 32)
        store = SessionStore(root / "sessions", self.sealer)
        a, b = store.create(), store.create()
        self.originals: dict[int, dict[str, Any]] = {}
        for i in range(N_EVENTS):
            kind = "start" if i == 0 else ("done" if i == N_EVENTS - 1 else "token")
            ev = a.append({"type": kind, "request_id": "r", "data": f"t{i} {SECRET} \u00e9\u4e2d"})
            self.originals[ev["seq"]] = ev
            b.append({"type": "token", "request_id": "r", "data": f"other {i}"})
        a.save_state()  # as at `done`: the state knows every seq
        b.save_state()
        a.sync()
        b.sync()
        self.sid = a.id
        self.lines_a = (root / "sessions" / a.id / BUFFER_NAME).read_bytes().splitlines(keepends=True)
        self.lines_b = (root / "sessions" / b.id / BUFFER_NAME).read_bytes().splitlines(keepends=True)
        store.close_all()
        self.session_dir = root / "sessions" / a.id


@pytest.fixture(scope="module")
def corpus() -> Any:
    root = Path(tempfile.mkdtemp(prefix="llmws-sealed-"))
    yield Corpus(root)
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- mutations
# Each mutation works on the buffer as a list of lines (bytes with their newline),
# except the byte-level ones, which work on the joined bytes.

truncate = st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True))
flip = st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255))
swap = st.tuples(st.just("swap"), st.integers(0, 10**6), st.integers(0, 10**6))
delete = st.tuples(st.just("delete"), st.integers(0, 10**6))
duplicate = st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(0, 10**6))
splice = st.tuples(st.just("splice"), st.integers(0, 10**6), st.integers(0, 10**6))
insert_other = st.tuples(st.just("insert_other"), st.integers(0, 10**6), st.integers(0, 10**6))
reseq = st.tuples(st.just("reseq"), st.integers(0, 10**6), st.integers(-3, 3).filter(bool))
mutation = st.one_of(truncate, flip, swap, delete, duplicate, splice, insert_other, reseq)


def apply(data: bytes, op: tuple[Any, ...], other: list[bytes]) -> bytes:
    """One mutation of the buffer bytes."""
    kind = op[0]
    if kind == "truncate":
        return data[: int(op[1] * len(data))] if data else data
    if kind == "flip":
        if not data:
            return data
        pos = int(op[1] * len(data))
        return data[:pos] + bytes([data[pos] ^ op[2]]) + data[pos + 1 :]
    lines = data.splitlines(keepends=True)
    if not lines:
        return data
    i = op[1] % len(lines)
    if kind == "swap":
        j = op[2] % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(op[2] % (len(lines) + 1), lines[i])
    elif kind == "splice":  # replace a record with the other session's
        lines[i] = other[op[2] % len(other)]
    elif kind == "insert_other":
        lines.insert(i, other[op[2] % len(other)])
    elif kind == "reseq":  # change the seq in clear, keep nonce and ciphertext
        try:
            record = json.loads(lines[i])
            record["s"] = int(record["s"]) + op[2]
            lines[i] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        except (ValueError, KeyError, TypeError):
            pass
    return b"".join(lines)


def decoded(data: bytes) -> list[Any]:
    """What each line means to a reader (seq, nonce, ciphertext), ignoring base64
    spellings that decode to the same bytes; undecodable lines stay raw."""
    out: list[Any] = []
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
            out.append(
                (
                    rec["s"],
                    base64.b64decode(rec["n"]),
                    base64.b64decode(rec["c"]),
                    tuple(sorted(rec)),
                )
            )
        except Exception:
            out.append(line)
    return out


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_buffer_never_yields_garbage_and_is_detected(corpus: Corpus, ops: list[tuple[Any, ...]]) -> None:
    """Any damage to a session's buffer file is detected on resume; no altered text is ever replayed, nothing twice."""
    original = b"".join(corpus.lines_a)
    data = original
    for op in ops:
        data = apply(data, op, corpus.lines_b)

    work = Path(tempfile.mkdtemp(prefix="llmws-mut-"))
    try:
        shutil.copytree(corpus.session_dir, work / "sessions" / corpus.sid)
        (work / "sessions" / corpus.sid / BUFFER_NAME).write_bytes(data)
        store = SessionStore(work / "sessions", corpus.sealer)
        session = store.get(corpus.sid)
        replay = session.replay(0)

        corrupt = [e for e in replay if e.get("type") == "error" and e.get("code") == "corrupt_record"]
        authentic = [e for e in replay if e not in corrupt]
        for ev in authentic:
            assert ev == corpus.originals.get(ev["seq"]), f"replayed an event that was never written: {ev}"
        seqs = [e["seq"] for e in authentic]
        assert seqs == sorted(set(seqs)), f"an event replayed twice or out of order: {seqs}"
        for ev in corrupt:
            assert SECRET not in json.dumps(ev)
        if set(seqs) != set(corpus.originals):
            assert corrupt, f"events {sorted(set(corpus.originals) - set(seqs))} vanished silently after {ops}"
        if decoded(data) != decoded(original):
            assert corrupt or session.integrity_problems, f"damage {ops} went unnoticed"
        else:
            assert replay == list(corpus.originals.values())
        # A seq is never reused after damage.
        assert session.last_seq >= N_EVENTS
        assert session.append({"type": "token", "data": "after"})["seq"] > N_EVENTS
        store.close_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_undamaged_buffer_replays_exactly(corpus: Corpus) -> None:
    """Without damage the reopened session replays every event exactly and reports no problem."""
    work = Path(tempfile.mkdtemp(prefix="llmws-mut-"))
    try:
        shutil.copytree(corpus.session_dir, work / "sessions" / corpus.sid)
        session = SessionStore(work / "sessions", corpus.sealer).get(corpus.sid)
        assert session.replay(0) == list(corpus.originals.values())
        assert session.integrity_problems == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
