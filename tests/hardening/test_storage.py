"""Write failures: the daemon's var folder on a tiny filesystem that fills up.

While the disk is full a client gets a clear `storage_error` (never silence, never
`internal_error`), the connection keeps serving, what was stored stays readable, and
once space is back the session goes on with contiguous seqs and nothing corrupted.

Needs `mount -t tmpfs` (root in a sandbox or CI container); skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonProcess
from ..wire import Peer


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    return res.returncode == 0


def _fill(folder: Path) -> Path:
    """Write a filler file until the filesystem refuses; return it."""
    filler = folder / "filler.bin"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 512)
    return filler


@pytest.fixture
def small_disk_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon whose var folder is a 4 MiB tmpfs."""
    root = tmp_path / "d"
    root.mkdir()
    var = root / "var"
    if not _mount_tmpfs(var, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    d = DaemonProcess(root, [], None, {"model": {"max_context_cap": 1024}})
    try:
        d.start()
        yield d
    finally:
        d.kill()
        subprocess.run(["umount", "-l", str(var)], capture_output=True)


def _seqd(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["seq"]: e for e in events if "seq" in e}


@pytest.mark.slow
async def test_full_disk_gives_storage_error_and_keeps_session_readable(
    small_disk_daemon: DaemonProcess,
) -> None:
    """On a full disk, inference and config get storage_error, the socket serves, and nothing stored is lost or corrupted."""
    d = small_disk_daemon
    peer = await Peer.open(d.ws_url)
    sid = peer.welcome["session_id"]
    await peer.infer("Say hi.", "before", temperature=0, max_new_tokens=3)
    stored = _seqd(peer.events)

    filler = _fill(d.var_dir)
    try:
        await peer.send(
            {
                "type": "inference",
                "prompt": "Say hi again.",
                "request_id": "full",
                "config": {"temperature": 0, "max_new_tokens": 3},
            }
        )
        err = (await peer.until("error", 40, request_id="full"))[-1]
        assert err["code"] == "storage_error", err
        await peer.send({"type": "config", "data": {"temperature": 0.5}, "request_id": "cfg"})
        err = (await peer.until("error", 30, request_id="cfg"))[-1]
        assert err["code"] == "storage_error", err
        await peer.send({"type": "ping", "request_id": "alive"})
        await peer.until("pong", 30, request_id="alive")
        # The session stays readable while the disk is full (the error itself may
        # have found room in the buffer file's last page: then it is stored too).
        stored = _seqd(peer.events)
        reader = await Peer.open(d.ws_url, {"session_id": sid, "last_seq": 0})
        assert reader.welcome["resumed"] is True
        await reader.send({"type": "ping", "request_id": "end"})
        backlog = _seqd(await reader.until("pong", 30, request_id="end"))
        assert backlog == stored
        await reader.close()
        # A new session cannot be created: the refusal is clear, not a crash.
        async_err = None
        try:
            newcomer = await Peer.open(d.ws_url)
            await newcomer.close()
        except AssertionError as exc:  # the first frame was an error, not a welcome
            async_err = str(exc)
        if async_err is not None:
            assert "storage_error" in async_err, async_err
    finally:
        filler.unlink()

    # Space is back: the conversation goes on where it was, seqs contiguous.
    text, events = await peer.infer("Say hi once more.", "after", temperature=0, max_new_tokens=3)
    assert events[-1]["type"] == "done"
    await peer.close()
    again = await Peer.open(d.ws_url, {"session_id": sid, "last_seq": 0})
    await again.send({"type": "ping", "request_id": "end2"})
    backlog = [e for e in await again.until("pong", 30, request_id="end2") if "seq" in e]
    seqs = [e["seq"] for e in backlog]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert not any(e.get("code") == "corrupt_record" for e in backlog)
    by_seq = _seqd(backlog)
    for seq, event in stored.items():
        assert by_seq[seq] == event
    assert any(e.get("type") == "done" and e.get("request_id") == "after" for e in backlog)
    await again.close()
    log = d.log_path.read_text(errors="replace")
    assert "connection handler crashed" not in log
    assert d.proc is not None and d.proc.poll() is None
