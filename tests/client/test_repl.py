"""`llm.py` / `llmws-chat`: flags, safe printing, one-shot mode and the interactive REPL.

The REPL is driven for real through prompt-toolkit's pipe input (keys typed into
it, Ctrl-C included) with its screen output discarded; what the user reads
(replies, command output) goes to a text stream the tests inspect. Unit tests use
the fake daemon of test_client; integration tests at the end use the real daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llmws_core.client.client import LLMWSEnhancedClient
from llmws_core.client.repl import (
    EXIT_CONNECTION,
    Repl,
    escape_control,
    json_line,
    parse_args,
    parse_config_items,
    progress_line,
    resources_lines,
    run_once,
)

from .test_client import REPO, TIMEOUT, FakeDaemon

# --------------------------------------------------------------------------- pure functions


def test_escape_control_neutralises_terminal_sequences() -> None:
    """Escape sequences, CR, BEL and bidi overrides in model text are shown, not obeyed."""
    evil = "red\x1b[31mtext\x07\rover\u202eevil\x9b2J\x7f"
    safe = escape_control(evil)
    assert safe == "red\\x1b[31mtext\\x07\\x0dover\\u202eevil\\x9b2J\\x7f"
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in safe)


def test_escape_control_keeps_ordinary_text() -> None:
    """Newlines, tabs, accents, CJK and emoji print unchanged."""
    text = "Hello,\n\tcafé 日本語 🙂 ½"
    assert escape_control(text) == text


def test_json_line_is_valid_json_without_raw_controls() -> None:
    """--json lines parse back to the same event and carry no raw control characters."""
    event = {"type": "token", "data": "a\x1b[2Jb\x9bc\u202ed", "seq": 3}
    line = json_line(event)
    assert json.loads(line) == event
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in line)


def test_default_flags() -> None:
    """Without flags the client talks to ws://127.0.0.1:8765 and opens the REPL."""
    args = parse_args([])
    assert args.server == "ws://127.0.0.1:8765"
    assert args.prompt is None and args.session is None and not args.json


def test_all_flags_parse() -> None:
    """Every documented flag is accepted."""
    args = parse_args(
        [
            "--server",
            "ws://h:1",
            "--api-key",
            "k",
            "--session",
            "S",
            "--prompt",
            "-",
            "--system",
            "sys",
            "--no-stream",
            "--json",
        ]
    )
    assert (args.server, args.api_key, args.session, args.prompt, args.system) == (
        "ws://h:1",
        "k",
        "S",
        "-",
        "sys",
    )
    assert args.no_stream and args.json


@pytest.mark.parametrize("argv", [["--json"], ["--server", "http://127.0.0.1:8765"], ["--bogus"]])
def test_bad_flags_exit_with_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Misused flags exit with code 2 and a usage message."""
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_config_items_parse_as_json_where_possible() -> None:
    """/config values are numbers, lists or strings as typed."""
    assert parse_config_items(["temperature=0.2", "top_k=5", 'stop=["x"]', "stop2=END"]) == {
        "temperature": 0.2,
        "top_k": 5,
        "stop": ["x"],
        "stop2": "END",
    }
    with pytest.raises(ValueError):
        parse_config_items(["temperature"])


def test_resources_table_has_gpu_memory_bars() -> None:
    """/resources shows each GPU's memory as a bar with used/total."""
    res = {
        "gpus": [
            {
                "index": 0,
                "name": "H100",
                "memory_total_mb": 81920.0,
                "memory_used_mb": 40960.0,
                "utilization_pct": 30,
                "temperature_c": 40,
            }
        ],
        "cpu": {"percent": 12.5, "count": 16},
        "ram": {"total_mb": 131072.0, "used_mb": 32768.0},
        "process": {"rss_mb": 512.0, "pid": 42, "threads": 9},
        "model": {"name": "SmolLM2"},
        "max_context": 8192,
    }
    text = "\n".join(resources_lines(res, width=10))
    assert "H100" in text
    assert "[#####-----] 40.0/80.0 GB" in text
    assert "RAM      [##--------] 32.0/128.0 GB" in text
    assert "SmolLM2" in text and "8192" in text


def test_progress_line_shows_rate_and_eta() -> None:
    """The download bar shows percent, sizes, rate and ETA."""
    line = progress_line(
        {"file": "m.gguf", "done": 50 * 2**20, "total": 200 * 2**20, "rate": 10 * 2**20, "eta": 75},
        width=8,
    )
    assert line == "m.gguf [##------]  25.0% 50.0 MB/200.0 MB 10.0 MB/s ETA 1:15"


# --------------------------------------------------------------------------- one-shot


def _args(url: str, **kw: Any) -> argparse.Namespace:
    argv = ["--server", url]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, value]
    return parse_args(argv)


async def test_one_shot_prints_the_streamed_reply() -> None:
    """--prompt prints the reply (control characters escaped) and exits 0."""
    async with FakeDaemon(tokens=["Hel", "lo", "\x1b[2J!"]) as daemon:
        out, err = io.StringIO(), io.StringIO()
        code = await run_once(_args(daemon.url, prompt="Hi"), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert out.getvalue() == "Hello\\x1b[2J!\n"


async def test_one_shot_reads_the_prompt_from_stdin() -> None:
    """--prompt - sends what stdin holds."""
    async with FakeDaemon(tokens=["ok"]) as daemon:
        out = io.StringIO()
        code = await run_once(
            _args(daemon.url, prompt="-", system="S"),
            stdin=io.StringIO("from stdin\n"),
            stdout=out,
            stderr=io.StringIO(),
        )
    assert code == 0
    inference = next(m for m in daemon.received if m["type"] == "inference")
    assert inference["prompt"] == {"system": "S", "user": "from stdin\n"}


async def test_one_shot_json_prints_every_event() -> None:
    """--json prints the raw events, one JSON object per line, welcome to done."""
    async with FakeDaemon(tokens=["a", "b"]) as daemon:
        out = io.StringIO()
        code = await run_once(_args(daemon.url, prompt="Hi", json=True), stdout=out, stderr=io.StringIO())
    assert code == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "welcome" and kinds[-1] == "done"
    assert "".join(e["data"] for e in events if e["type"] == "token") == "ab"


async def test_one_shot_server_error_exits_nonzero_with_one_line() -> None:
    """A server error exits 1 with the server's message on one line."""
    err_event = {"code": "context_too_long", "message": "Context too long (9 tokens). Max: 2."}
    async with FakeDaemon(error=err_event) as daemon:
        out, err = io.StringIO(), io.StringIO()
        code = await run_once(_args(daemon.url, prompt="Hi"), stdout=out, stderr=err)
    assert code == 1
    assert err.getvalue().strip().splitlines() == ["llm.py: Context too long (9 tokens). Max: 2. [context_too_long]"]


def test_unreachable_server_exits_nonzero_without_traceback() -> None:
    """python llm.py --prompt against a dead port prints one line and exits non-zero."""
    result = subprocess.run(
        [sys.executable, "llm.py", "--server", "ws://127.0.0.1:1", "--prompt", "hi"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_CONNECTION
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "llm.py: Cannot reach the LLMWS server at ws://127.0.0.1:1.",
        "llm.py: is the daemon running? Start it with `make run` (or `python llmws.py`).",
    ]


# --------------------------------------------------------------------------- the REPL


class ReplDriver:
    """Types into a running Repl through a pipe and waits for what it prints."""

    def __init__(self, repl: Repl, pipe: Any, out: io.StringIO) -> None:
        self.repl, self.pipe, self.out = repl, pipe, out
        self.task: asyncio.Task[int] | None = None

    def type(self, text: str) -> None:
        self.pipe.send_text(text)

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.out.getvalue()):
                return self.out.getvalue()
            if self.task is not None and self.task.done():
                break
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out; output so far:\n{self.out.getvalue()}")

    async def wait_text(self, text: str, timeout: float = TIMEOUT) -> str:
        return await self.wait_for(lambda out: text in out, timeout)


@asynccontextmanager
async def running_repl(url: str, **repl_kw: Any) -> AsyncIterator[ReplDriver]:
    """A Repl on a pipe input, started; /quit is typed and the exit code checked on leaving."""
    out = io.StringIO()
    with create_pipe_input() as pipe:
        client = LLMWSEnhancedClient(url, reconnect_delay=0.05)
        repl = Repl(client, stdout=out, input=pipe, output=DummyOutput(), history_path=None, **repl_kw)
        driver = ReplDriver(repl, pipe, out)
        driver.task = asyncio.create_task(repl.run())
        try:
            await driver.wait_text("Type /help")
            yield driver
            driver.type("/quit\r")
            assert await asyncio.wait_for(driver.task, TIMEOUT) == 0
        finally:
            if not driver.task.done():
                driver.task.cancel()


async def test_repl_streams_a_reply_to_a_prompt() -> None:
    """Typing a prompt and Enter prints the streamed reply, then a fresh prompt works."""
    async with FakeDaemon(tokens=["Hello", " there", "\x1b]0;pwned\x07"]) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("Hi model\r")
            out = await repl.wait_text("Hello there\\x1b]0;pwned\\x07\n")
            assert "\x1b" not in out.split("Type /help")[1]
            repl.type("second\r")
            await repl.wait_for(lambda o: o.count("Hello there") == 2)
    prompts = [m["prompt"]["user"] for m in daemon.received if m["type"] == "inference"]
    assert prompts == ["Hi model", "second"]


async def test_repl_trailing_backslash_continues_the_line() -> None:
    """A trailing backslash makes a multi-line message; Esc+Enter inserts a newline too."""
    async with FakeDaemon(tokens=["ok"]) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("line one\\\r")
            repl.type("line two\x1b\rline three\r")
            await repl.wait_text("ok\n")
    prompts = [m["prompt"]["user"] for m in daemon.received if m["type"] == "inference"]
    assert prompts == ["line one\nline two\nline three"]


async def test_repl_session_command_shows_the_session_id() -> None:
    """/session prints the session id and how to resume it."""
    async with FakeDaemon() as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("/session\r")
            out = await repl.wait_text("resume with:")
            assert "session  sess-1" in out
            assert "--session sess-1" in out


async def test_repl_commands_help_config_models_system() -> None:
    """/help lists commands; /config, /models and /system talk to the daemon or the session."""
    async with FakeDaemon(tokens=["fine"]) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("/help\r")
            await repl.wait_text("/download")
            repl.type("/config temperature=0.1 top_k=3\r")
            await repl.wait_text("top_k=3")
            repl.type("/models\r")
            await repl.wait_text("fake-model")
            repl.type("/system Answer in French.\r")
            await repl.wait_text("System prompt set.")
            repl.type("Hi\r")
            await repl.wait_text("fine\n")
            repl.type("/nonsense\r")
            await repl.wait_text("unknown command /nonsense")
    config = next(m for m in daemon.received if m["type"] == "config")
    assert config["data"] == {"temperature": 0.1, "top_k": 3}
    inference = next(m for m in daemon.received if m["type"] == "inference")
    assert inference["prompt"] == {"system": "Answer in French.", "user": "Hi"}


async def test_repl_ctrl_c_cancels_the_generation_not_the_program() -> None:
    """Ctrl-C during a reply cancels it on the daemon; the REPL keeps going."""
    tokens = [f"w{i} " for i in range(500)]
    async with FakeDaemon(tokens=tokens, token_delay=0.01) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("Write a long story\r")
            await repl.wait_text("w3 ")
            repl.type("\x03")
            await repl.wait_text("[cancelled]")
            assert any(m["type"] == "cancel" for m in daemon.received)
            daemon.tokens = ["still here"]
            repl.type("/session\r")
            await repl.wait_text("resume with:")
            repl.type("again\r")
            await repl.wait_text("still here")
    assert "w499" not in repl.out.getvalue()


async def test_repl_ctrl_c_while_a_command_waits_returns_to_the_prompt() -> None:
    """Ctrl-C while a command waits for the daemon (key press or SIGINT) stops that command
    with a notice; the REPL keeps serving instead of exiting."""
    async with FakeDaemon() as daemon:  # it never answers get_status: /status waits
        async with running_repl(daemon.url) as repl:

            async def status_requests(n: int) -> None:
                while daemon.sent_types().count("get_status") < n:
                    await asyncio.sleep(0.01)

            repl.type("/status\r")
            await asyncio.wait_for(status_requests(1), TIMEOUT)
            repl.type("\x03")  # a key press (the terminal in raw mode)
            await repl.wait_text("[interrupted]")
            repl.type("/status\r")
            await asyncio.wait_for(status_requests(2), TIMEOUT)
            os.kill(os.getpid(), signal.SIGINT)  # a SIGINT (the terminal not in raw mode)
            await repl.wait_for(lambda out: out.count("[interrupted]") == 2)
            repl.type("/session\r")
            await repl.wait_text("resume with:")
            assert not repl.task.done()


async def test_repl_ctrl_c_typed_right_after_enter_is_not_lost() -> None:
    """Enter then Ctrl-C read together (a fast typist, a busy machine): the prompt keeps the
    Ctrl-C as typeahead, and it still stops the turn before anything is generated."""
    async with FakeDaemon(tokens=[f"w{i} " for i in range(500)], token_delay=0.01) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("Write a long story\r\x03")
            await repl.wait_text("[interrupted]")
            repl.type("/session\r")
            await repl.wait_text("resume with:")
            assert "inference" not in daemon.sent_types()
            assert "w1 " not in repl.out.getvalue()


async def test_repl_sigint_between_enter_and_the_work_stops_that_work() -> None:
    """A SIGINT after a line was accepted but before its work began is kept for that work
    (it stops it before it sends anything), not dropped and not fatal."""
    out = io.StringIO()
    with create_pipe_input() as pipe:
        client = LLMWSEnhancedClient("ws://127.0.0.1:9")
        repl = Repl(client, stdout=out, input=pipe, output=DummyOutput(), history_path=None)
        ran: list[int] = []

        async def work() -> None:
            ran.append(1)

        repl._interrupt()  # what the SIGINT handler calls: no prompt up, no work yet
        await repl._guarded(work())
        assert "[interrupted]" in out.getvalue() and ran == []
        await repl._guarded(work())  # the press was used up: the next line's work runs
        assert ran == [1]


async def test_repl_survives_a_dropped_connection_mid_reply() -> None:
    """A drop mid-reply shows a short notice and the reply completes without duplicates."""
    tokens = [f"t{i} " for i in range(20)]
    async with FakeDaemon(tokens=tokens, token_delay=0.005, drop_after=5, replay_overlap=3) as daemon:
        async with running_repl(daemon.url) as repl:
            repl.type("Hi\r")
            out = await repl.wait_text("t19 ")
            assert "reconnected" in out
            reply = out.split("Type /help", 1)[1]
            for token in tokens:
                assert reply.count(token) == 1, token


# --------------------------------------------------------------------------- real daemon


def _llm(args: list[str], *, stdin: str | None = None, home: Any = None) -> Any:
    env = {**os.environ, "HOME": str(home)} if home is not None else None
    return subprocess.run(
        [sys.executable, "llm.py", *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 12,
        env=env,
    )


def test_real_one_shot_prompt_prints_reply(shared_daemon: Any) -> None:
    """`python llm.py --prompt Hello` prints the model's reply and exits 0."""
    result = _llm(["--server", shared_daemon.ws_url, "--prompt", "Hello", "--max-new-tokens", "16"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_real_one_shot_reads_stdin(shared_daemon: Any) -> None:
    """`echo hi | python llm.py --prompt -` answers the piped prompt and exits 0."""
    result = _llm(["--server", shared_daemon.ws_url, "--prompt", "-", "--max-new-tokens", "16"], stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_real_one_shot_session_continues_the_conversation(shared_daemon: Any) -> None:
    """--session ID continues a session: the daemon resumes it with the first turn kept."""
    first = _llm(
        [
            "--server",
            shared_daemon.ws_url,
            "--prompt",
            "My name is Zorblax.",
            "--json",
            "--max-new-tokens",
            "16",
        ]
    )
    assert first.returncode == 0, first.stderr
    events = [json.loads(line) for line in first.stdout.splitlines()]
    session_id = events[0]["session_id"]
    assert events[-1]["type"] == "done"
    second = _llm(
        [
            "--server",
            shared_daemon.ws_url,
            "--session",
            session_id,
            "--prompt",
            "What is my name?",
            "--json",
            "--max-new-tokens",
            "16",
        ]
    )
    assert second.returncode == 0, second.stderr
    welcome = json.loads(second.stdout.splitlines()[0])
    assert welcome["resumed"] is True and welcome["session_id"] == session_id
    assert welcome["history_messages"] == 2


async def test_real_repl_prompt_command_and_ctrl_c(shared_daemon: Any) -> None:
    """The REPL against the real model: a streamed reply, /session, Ctrl-C stopping a reply."""
    async with running_repl(shared_daemon.ws_url, request_config={"temperature": 0}) as repl:
        repl.type("/config max_new_tokens=24\r")
        await repl.wait_text("max_new_tokens=24")
        mark = len(repl.out.getvalue())
        repl.type("Say hello.\r")
        await repl.wait_for(lambda o: len(o) > mark + 3, TIMEOUT * 6)
        # Typed while the reply streams: runs once the reply is complete.
        repl.type("/session\r")
        out = await repl.wait_text("resume with:", TIMEOUT * 6)
        reply = out[mark:].split("session  ", 1)[0]
        assert reply.strip() and reply.endswith("\n")
        assert f"session  {repl.repl.client.session_id}" in out
        repl.type("/config max_new_tokens=2000\r")
        await repl.wait_text("max_new_tokens=2000")
        mark = len(repl.out.getvalue())
        repl.type("Write a very long story about a dragon and a knight.\r")
        await repl.wait_for(lambda o: len(o) > mark + 40, TIMEOUT * 6)
        repl.type("\x03")
        out = await repl.wait_text("[cancelled]", TIMEOUT * 3)
        status = await repl.repl.client.get_status()
        assert status["requests"] == []  # nothing is generating any more


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_real_repl_in_a_terminal(shared_daemon: Any, tmp_path: Any) -> None:
    """`python llm.py` in a real terminal (tmux): reply streams, Ctrl-C cancels, history saved."""
    name = f"llmws-test-{os.getpid()}"
    # The pane outlives the REPL (its exit status is printed, then the shell sleeps), so a
    # REPL that leaves early shows its last screen and status instead of an empty pane.
    command = (
        f"cd {shlex.quote(str(REPO))} && HOME={shlex.quote(str(tmp_path))} "
        f"{shlex.quote(sys.executable)} llm.py --server {shared_daemon.ws_url} --temperature 0"
        '; echo "[repl exited $?]"; sleep 600'
    )
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", command], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout

    def wait(predicate: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = screen()
            if predicate(text):
                return text
            if "[repl exited" in text:
                raise AssertionError(f"the REPL left early; screen:\n{text}")
            time.sleep(0.2)
        raise AssertionError(f"timed out; screen:\n{screen()}")

    def keys(*args: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", name, *args], check=True)

    try:
        wait(lambda s: "Type /help" in s, TIMEOUT * 3)
        keys("/config max_new_tokens=2000", "Enter")
        # The daemon's answer, not the typed line (a slow REPL shows it twice: echoed, then
        # at the prompt).
        wait(
            lambda s: any("max_new_tokens=2000" in x and "/config" not in x for x in s.splitlines()),
            TIMEOUT * 3,
        )
        keys("Write a very long story about a dragon.", "Enter")
        # The reply has begun: text after the last "dragon." (the prompt line, or the story).
        wait(lambda s: "dragon." in s and len(s.rsplit("dragon.", 1)[-1].strip()) > 40, TIMEOUT * 6)
        keys("C-c")
        wait(lambda s: "[cancelled]" in s, TIMEOUT * 3)
        keys("/session", "Enter")
        wait(lambda s: "resume with:" in s, TIMEOUT * 3)
        keys("C-d")
        wait(lambda s: "[repl exited 0]" in s, TIMEOUT * 3)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    history = (tmp_path / ".llmws_history").read_text()
    assert "Write a very long story about a dragon." in history
