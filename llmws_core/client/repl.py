"""`python llm.py` / `llmws-chat`: one-shot prompts and the interactive prompt-toolkit REPL.

One-shot (`--prompt TEXT`, `-` reads stdin) prints the streamed reply and exits;
scripts can ask for the raw events with `--json`. Without `--prompt` it is an
interactive chat in the spirit of `ollama run`: history, multi-line input,
streamed tokens, Ctrl-C stops a reply (not the program), slash commands with
completion. The client library underneath reconnects and resumes by itself, so a
dropped connection only shows a short notice and the reply carries on.

Everything the model says is escaped before it reaches the terminal: a model (or
whoever wrote its prompt) must not be able to move the cursor, retitle the window
or hide text with control sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import mimetypes
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .client import (
    DEFAULT_URL,
    ClientState,
    ConnectFailedError,
    InferenceStream,
    LLMWSClientError,
    LLMWSConnectionError,
    LLMWSEnhancedClient,
)

logger = logging.getLogger("llmws.client.repl")

EXIT_OK = 0
EXIT_ERROR = 1  # the server reported an error, or the reply was cut short
EXIT_USAGE = 2  # argparse's own code for bad flags
EXIT_CONNECTION = 3  # the server could not be reached or the connection was lost
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

HISTORY_FILE = "~/.llmws_history"

# --------------------------------------------------------------------------- safe text

# C0 controls except tab and newline, DEL, C1 controls, and the bidirectional overrides
# and isolates that can make text read differently from what it is ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """Make model text safe to print: control characters become visible `\\xNN` escapes.

    Tabs and newlines stay as they are; ESC, carriage return, backspace, BEL, DEL, C1
    controls and bidi overrides do not reach the terminal.
    """
    return _UNSAFE.sub(_escape_char, text)


def json_line(event: dict[str, Any]) -> str:
    """One event as a JSON line that is safe on a terminal (C1/bidi escaped too)."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return re.sub("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]", lambda m: f"\\u{ord(m.group()):04x}", text)


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command line of `llm.py` / `llmws-chat`."""
    parser = argparse.ArgumentParser(
        prog="llm.py",
        description="Chat with an LLMWS daemon: an interactive REPL, or one prompt with --prompt.",
        epilog="Inside the REPL, type /help for the commands.",
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("LLMWS_SERVER", DEFAULT_URL),
        metavar="URL",
        help=f"WebSocket address of the daemon (default: $LLMWS_SERVER or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLMWS_API_KEY"),
        metavar="KEY",
        help="API key for the daemon (default: $LLMWS_API_KEY)",
    )
    # The original client's way to name the daemon; they build --server's URL.
    parser.add_argument("--host", help="daemon host (with --port: instead of --server)")
    parser.add_argument("--port", type=int, help="daemon WebSocket port (default 8765 with --host)")
    parser.add_argument("--session", metavar="ID", help="resume this session (its conversation)")
    parser.add_argument(
        "-p",
        "--prompt",
        metavar="TEXT",
        help="send one prompt, print the reply and exit; '-' reads the prompt from stdin",
    )
    parser.add_argument("-s", "--system", metavar="TEXT", help="system prompt for the conversation")
    parser.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="attach an image file to the prompt (repeatable; needs a vision model)",
    )
    parser.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        dest="max_new_tokens",
        type=int,
        metavar="N",
        help="stop the reply after N tokens",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the reply once it is complete")
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --prompt: print every server event as one JSON object per line",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="client log level, on stderr (default: WARNING)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags (argparse exits with code 2 on misuse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.prompt is None:
        parser.error("--json needs --prompt (it is for scripts)")
    if args.host is not None or args.port is not None:
        host = args.host or "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        args.server = f"ws://{host}:{args.port or 8765}"
    if not re.match(r"^wss?://", args.server):
        parser.error(f"--server must be a ws:// or wss:// URL, not {args.server!r}")
    if args.image and args.prompt is None:
        parser.error("--image needs --prompt")
    return args


def parse_config_items(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` words from `/config` into a dict; values parse as JSON where they can.

    `temperature=0.2` -> 0.2, `stop=["\\n"]` -> a list, `seed=null` -> None, `stop=END` -> "END".
    """
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        config[key] = value
    return config


# --------------------------------------------------------------------------- output


class Console:
    """Writes to a text stream, remembering whether the cursor is at a line start."""

    def __init__(self, stream: TextIO, *, color: bool | None = None) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", lambda: False)()
        self.color = isatty and os.environ.get("NO_COLOR") is None if color is None else color
        self.is_tty = isatty
        self.at_line_start = True
        #: The stream's reader went away (a closed pipe); output is dropped from then on.
        self.broken = False

    def write(self, text: str) -> None:
        if not text or self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            # `llm.py --json ... | head`: the reader left. Stop writing, and point the file
            # descriptor at /dev/null so the interpreter's final flush does not complain.
            self.broken = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
            return
        self.at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        """Finish the current line, if anything is on it."""
        if not self.at_line_start:
            self.write("\n")

    def line(self, text: str = "") -> None:
        """Print `text` on a line of its own."""
        if not self.at_line_start:
            self.write("\n")
        self.write(text + "\n")

    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def dim(self, text: str) -> str:
        return self.style(text, "2")

    def bold(self, text: str) -> str:
        return self.style(text, "1")

    def red(self, text: str) -> str:
        return self.style(text, "31")

    def notice(self, text: str) -> None:
        self.line(self.dim(f"[{text}]"))

    def error(self, text: str) -> None:
        self.line(self.red(f"error: {text}"))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(fraction: float | None, width: int = 24) -> str:
    """A text bar like `[########----------------]`."""
    if fraction is None:
        return "[" + "?" * width + "]"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(event: dict[str, Any], width: int = 24) -> str:
    """One line for a `download_progress` event: file, bar, percent, sizes, rate, ETA."""
    done, total = event.get("done"), event.get("total")
    fraction = done / total if isinstance(done, int | float) and total else None
    percent = f"{fraction * 100:5.1f}%" if fraction is not None else "   ?%"
    name = escape_control(str(event.get("file") or ""))[-32:]
    rate = event.get("rate")
    rate_text = f"{human_bytes(rate)}/s" if isinstance(rate, int | float) else "?/s"
    return (
        f"{name} {bar(fraction, width)} {percent} "
        f"{human_bytes(done)}/{human_bytes(total)} {rate_text} ETA {human_duration(event.get('eta'))}"
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mem_pair(info: dict[str, Any]) -> tuple[float | None, float | None]:
    """(used MB, total MB) from a resources section, whatever its exact key names."""

    def find(names: Sequence[str]) -> float | None:
        for name in names:
            value = _number(info.get(name))
            if value is not None:
                if name.endswith("_gb"):
                    return value * 1024
                if name.endswith("_bytes"):
                    return value / 2**20
                return value
        return None

    used = find(["memory_used_mb", "used_mb", "vram_used_mb", "memory_used_bytes", "used_bytes"])
    total = find(["memory_total_mb", "total_mb", "vram_total_mb", "memory_total_bytes", "total_bytes"])
    return used, total


def resources_lines(res: dict[str, Any], width: int = 24) -> list[str]:
    """The `resources` event as a small table with memory bars."""
    lines: list[str] = []
    gpus = res.get("gpus") or []
    if not gpus:
        lines.append(f"{'GPU':<8} none (CPU inference)")
    for i, gpu in enumerate(gpus if isinstance(gpus, list) else []):
        if not isinstance(gpu, dict):
            continue
        used, total = _mem_pair(gpu)
        frac = used / total if used is not None and total else None
        name = escape_control(str(gpu.get("name", "")))
        extra = []
        if _number(gpu.get("utilization_pct")) is not None:
            extra.append(f"util {gpu['utilization_pct']:.0f}%")
        if _number(gpu.get("temperature_c")) is not None:
            extra.append(f"{gpu['temperature_c']:.0f}°C")
        if _number(gpu.get("power_w")) is not None:
            extra.append(f"{gpu['power_w']:.0f} W")
        mem = f"{(used or 0) / 1024:.1f}/{(total or 0) / 1024:.1f} GB" if total else "? GB"
        lines.append(f"{'GPU ' + str(gpu.get('index', i)):<8} {name}")
        lines.append(f"{'':<8} VRAM {bar(frac, width)} {mem}  {'  '.join(extra)}".rstrip())
    ram = res.get("ram")
    if isinstance(ram, dict):
        used, total = _mem_pair(ram)
        frac = used / total if used is not None and total else None
        lines.append(f"{'RAM':<8} {bar(frac, width)} {(used or 0) / 1024:.1f}/{(total or 0) / 1024:.1f} GB")
    cpu = res.get("cpu")
    if isinstance(cpu, dict):
        pct = _number(cpu.get("percent"))
        lines.append(
            f"{'CPU':<8} {bar(pct / 100 if pct is not None else None, width)} "
            f"{pct if pct is not None else '?'}% of {cpu.get('count', '?')} cores"
        )
    proc = res.get("process")
    if isinstance(proc, dict):
        rss = _number(proc.get("rss_mb"))
        lines.append(
            f"{'Process':<8} pid {proc.get('pid', '?')}, "
            f"{rss / 1024 if rss is not None else 0:.2f} GB resident, "
            f"{proc.get('threads', '?')} threads"
        )
    model = res.get("model")
    if isinstance(model, dict) and model:
        lines.append(f"{'Model':<8} {escape_control(_model_name(model))}")
    if res.get("max_context") is not None:
        lines.append(f"{'Context':<8} {res['max_context']} tokens max")
    return lines


def _model_name(model: dict[str, Any] | None) -> str:
    if not model:
        return "(none)"
    return str(model.get("name") or model.get("path") or "(unnamed)")


def models_lines(models: list[dict[str, Any]]) -> list[str]:
    """The `models_list` as a table; the loaded model is marked with `*`."""
    if not models:
        return ["No models found. Put one in models/ or use /download REPO DIR."]
    rows = [("", "NAME", "FORMAT", "SIZE", "SOURCE")]
    for m in models:
        size = _number(m.get("size_mb"))
        rows.append(
            (
                "*" if m.get("loaded") else "",
                escape_control(str(m.get("name", ""))),
                escape_control(str(m.get("format", ""))),
                f"{size:.0f} MB" if size is not None else "?",
                escape_control(str(m.get("source", ""))),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# --------------------------------------------------------------------------- one-shot


def _generation_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Per-request settings given on the command line (None: the session's own)."""
    return {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
    }


def read_images(paths: Sequence[str] | None) -> list[dict[str, str]] | None:
    """Image files as prompt images (base64 with their media type), or None.

    Raises:
        ValueError: a file cannot be read or is not an image."""
    if not paths:
        return None
    images = []
    for path in paths:
        media_type = mimetypes.guess_type(path)[0] or ""
        if not media_type.startswith("image/"):
            raise ValueError(f"{path} is not an image file")
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        images.append({"data": base64.b64encode(data).decode("ascii"), "media_type": media_type})
    return images


#: What to tell someone whose daemon is not there.
NOT_RUNNING_HINT = "is the daemon running? Start it with `make run` (or `python llmws.py`)."


def _read_prompt(value: str, stdin: TextIO) -> str:
    return stdin.read() if value == "-" else value


async def run_once(
    args: argparse.Namespace,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Send one prompt and print the reply (or the raw events with --json)."""
    out = Console(stdout or sys.stdout, color=False)
    err = Console(stderr or sys.stderr)
    prompt = _read_prompt(args.prompt, stdin or sys.stdin)
    if not prompt.strip():
        err.line("llm.py: the prompt is empty")
        return EXIT_USAGE
    try:
        images = read_images(getattr(args, "image", None))
    except ValueError as exc:
        err.line(f"llm.py: {exc}")
        return EXIT_USAGE

    def on_event(event: dict[str, Any]) -> None:
        out.write(json_line(event) + "\n")

    def on_unsolicited(event: dict[str, Any]) -> None:
        if not args.json and event.get("type") in ("notice", "warning", "error"):
            err.notice(escape_control(str(event.get("message", ""))))

    def on_connection(state: str, info: dict[str, Any]) -> None:
        if args.json:
            return
        if state == "reconnecting" and info.get("attempt") == 1:
            err.notice("connection lost; reconnecting")
        elif state == "resumed":
            err.notice("reconnected; resuming")

    client = LLMWSEnhancedClient(
        args.server,
        api_key=args.api_key,
        on_event=on_event if args.json else None,
        on_unsolicited=on_unsolicited,
        on_connection=on_connection,
    )
    loop = asyncio.get_running_loop()
    stream_box: list[InferenceStream] = []
    interrupts = 0
    main_task = asyncio.current_task()

    def on_sigint() -> None:
        # First Ctrl-C stops the generation (the daemon answers with done: cancelled);
        # a second one stops waiting for that.
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and stream_box:
            asyncio.ensure_future(stream_box[0].cancel())
        elif main_task is not None:
            main_task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await client.connect(session_id=args.session)
        if args.session and not client.welcome.get("resumed") and not args.json:
            err.notice(f"session {args.session} could not be resumed; started {client.session_id}")
        async with client.stream(prompt, args.system, images=images, **_generation_flags(args)) as stream:
            stream_box.append(stream)
            async for token in stream:
                if not args.json and not args.no_stream:
                    out.write(escape_control(token))
                if out.broken:
                    break  # nobody reads the reply any more: leaving the block cancels it
        if not args.json:
            if args.no_stream:
                out.write(escape_control(stream.text))
            out.end_line()
        for warning in stream.warnings if not args.json else []:
            err.notice(escape_control(warning))
        if err.is_tty and not args.json:
            # Shown to people, not scripts: how to continue this conversation.
            err.notice(f"session {client.session_id}")
        reason = stream.finish_reason
        if out.broken:
            return EXIT_OK
        if reason == "cancelled" or interrupts:
            err.notice("cancelled")
            return EXIT_INTERRUPTED
        if reason == "interrupted":
            err.line("llm.py: the reply was interrupted (the server restarted)")
            return EXIT_ERROR
        if reason == "length" and not args.json:
            err.notice("stopped at max_new_tokens")
        return EXIT_OK
    except asyncio.CancelledError:
        err.notice("cancelled")
        return EXIT_INTERRUPTED
    except ConnectFailedError as exc:
        err.line(f"llm.py: {exc.message}")
        err.line(f"llm.py: {NOT_RUNNING_HINT}")
        return EXIT_CONNECTION
    except LLMWSConnectionError as exc:
        err.line(f"llm.py: {exc.message}")
        return EXIT_CONNECTION
    except LLMWSClientError as exc:
        err.line(f"llm.py: {exc.message} [{exc.code}]")
        return EXIT_ERROR
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await client.disconnect()


# --------------------------------------------------------------------------- the REPL

COMMANDS: dict[str, str] = {
    "/help": "show this help",
    "/config": "/config key=value ...  set generation settings (no args: show them)",
    "/resources": "GPU, RAM and CPU use, with memory bars",
    "/models": "list the models the server has",
    "/switch": "/switch NAME  load another model",
    "/download": "/download REPO DIR  download a model (Ctrl-C stops it)",
    "/delete": "/delete NAME  delete a model",
    "/session": "show the session id (use it with --session to come back)",
    "/status": "show the server's status",
    "/reset": "forget the conversation",
    "/cancel": "stop whatever the session is generating",
    "/system": "/system TEXT  set the system prompt (/system alone shows it, /system off clears)",
    "/quit": "leave (Ctrl-D also works)",
}
CONFIG_KEYS = ("temperature=", "top_p=", "top_k=", "max_new_tokens=", "stop=", "seed=")


def _make_completer(repl: Repl) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class CommandCompleter(Completer):
        """Completes command names, model names after /switch and /delete, config keys."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Any]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                for name in COMMANDS:
                    if name.startswith(text):
                        yield Completion(name, -len(text), display_meta=COMMANDS[name][:40])
                return
            command, _, rest = text.partition(" ")
            word = rest.rsplit(" ", 1)[-1]
            if command in ("/switch", "/delete") and " " not in rest:
                for name in repl.model_names:
                    if name.startswith(word):
                        yield Completion(name, -len(word))
            elif command == "/config":
                for key in CONFIG_KEYS:
                    if key.startswith(word) and "=" not in word:
                        yield Completion(key, -len(word))

    return CommandCompleter()


def _make_key_bindings() -> Any:
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event: Any) -> None:
        """Enter sends, except after a trailing backslash, which continues on a new line."""
        buf = event.current_buffer
        doc = buf.document
        if doc.is_cursor_at_the_end and doc.text.endswith("\\"):
            buf.delete_before_cursor(1)
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: Any) -> None:
        """Esc+Enter (or Alt+Enter) inserts a newline."""
        event.current_buffer.insert_text("\n")

    return kb


def _cancelled_from_outside() -> bool:
    """Inside `except CancelledError`: True when this task itself is being cancelled (leave),
    False when only the work it awaited was (a Ctrl-C: report it and carry on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _KeyWatcher:
    """While a reply streams, read keys from the terminal: Ctrl-C cancels, others are kept.

    The prompt is not on screen then, so nothing else reads the keyboard. Raw mode keeps
    Ctrl-C a key press (not SIGINT) on a real terminal; typed-ahead keys are handed back
    to prompt-toolkit so they appear at the next prompt.
    """

    def __init__(self, input_: Any, on_interrupt: Callable[[], None]) -> None:
        self.input = input_
        self.on_interrupt = on_interrupt
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _KeyWatcher:
        from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
        from prompt_toolkit.keys import Keys

        def take(key_presses: list[Any]) -> None:
            keep = []
            for key_press in key_presses:
                if key_press.key in (Keys.ControlC, Keys.SIGINT):
                    self.on_interrupt()
                else:
                    keep.append(key_press)
            if keep:
                store_typeahead(self.input, keep)

        try:
            self._stack.enter_context(self.input.raw_mode())
            self._stack.enter_context(self.input.attach(lambda: take(self.input.read_keys())))
            # Keys the prompt read after the accepted line (Enter, then Ctrl-C in one read)
            # were kept by prompt-toolkit as typeahead: a Ctrl-C among them is for this work.
            take(get_typeahead(self.input))
        except Exception:  # not a terminal we can read: SIGINT still works
            logger.debug("cannot watch the keyboard during generation", exc_info=True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()


class Repl:
    """The interactive chat. Build it with a connected-or-not client; `run()` returns an exit code.

    Args:
        client: the library client (its hooks are set here).
        stdout: where replies and command output go (the prompt itself goes to `output`).
        input, output: prompt-toolkit input/output; None uses the terminal. Tests pass a
            pipe input and `DummyOutput`.
        history_path: the history file; None keeps history in memory only.
        system: the system prompt sent with each turn.
        stream: print tokens as they arrive (False: print each reply when complete).
        session_id: resume this session when connecting.
        request_config: generation settings sent with every turn (from the command line).
    """

    def __init__(
        self,
        client: LLMWSEnhancedClient,
        *,
        stdout: TextIO | None = None,
        input: Any = None,
        output: Any = None,
        history_path: str | os.PathLike[str] | None = HISTORY_FILE,
        system: str | None = None,
        stream: bool = True,
        session_id: str | None = None,
        request_config: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.request_config = {k: v for k, v in (request_config or {}).items() if v is not None}
        self.console = Console(stdout or sys.stdout)
        self.input = input
        self.output = output
        self.history_path = history_path
        self.system = system
        self.streaming = stream
        self.session_id = session_id
        self.model_names: list[str] = []
        self._prompt_session: Any = None
        self._busy = False
        # Ctrl-C handlers of the work in progress, innermost last (see _interruptible).
        self._interrupts: list[Callable[[], None]] = []
        self._at_prompt = False
        self._pending_interrupt = False  # a SIGINT after a line's Enter, before its work began
        self._sigint_routed = False
        client.on_unsolicited = self._on_unsolicited
        client.on_connection = self._on_connection

    # ------------------------------------------------------------------ notices

    async def _show(self, text: str) -> None:
        """Print a line, above the prompt if the prompt is on screen."""
        app = getattr(self._prompt_session, "app", None)
        if app is not None and app.is_running:
            from prompt_toolkit.application import run_in_terminal

            await run_in_terminal(lambda: self.console.line(text))
        else:
            self.console.line(text)

    async def _on_unsolicited(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token" and self._busy is False:
            # A reply from before this connection (resumed session) finishing now.
            self.console.write(escape_control(str(event.get("data", ""))))
        elif kind in ("notice", "warning"):
            await self._show(self.console.dim(f"[{escape_control(str(event.get('message', '')))}]"))
        elif kind == "error":
            await self._show(self.console.red(f"error: {escape_control(str(event.get('message', '')))}"))
        elif kind == "done":
            self.console.end_line()
        elif kind == "model_switched":
            name = _model_name(event.get("model"))
            await self._show(self.console.dim(f"[model switched to {escape_control(name)}]"))

    async def _on_connection(self, state: str, info: dict[str, Any]) -> None:
        if state == "reconnecting" and info.get("attempt") == 1:
            await self._show(self.console.dim("[connection lost; reconnecting...]"))
        elif state == "resumed":
            await self._show(self.console.dim("[reconnected; resuming]"))
        elif state == "new_session":
            await self._show(self.console.dim(f"[the server lost the session; new session {info.get('session_id')}]"))
        elif state == "lost":
            await self._show(self.console.red("[connection lost; will retry on the next input]"))

    # ------------------------------------------------------------------ main loop

    def _make_prompt_session(self) -> Any:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history: Any = InMemoryHistory()
        if self.history_path is not None:
            path = Path(self.history_path).expanduser()
            try:
                path.touch(mode=0o600, exist_ok=True)
                history = FileHistory(str(path))
            except OSError:
                logger.warning("cannot write the history file %s; keeping history in memory", path)
        return PromptSession(
            message=">>> ",
            multiline=True,
            prompt_continuation="... ",
            history=history,
            completer=_make_completer(self),
            complete_while_typing=True,
            key_bindings=_make_key_bindings(),
            input=self.input,
            output=self.output,
            enable_history_search=False,
        )

    async def run(self) -> int:
        """Connect, greet, then read and handle lines until /quit or Ctrl-D."""
        try:
            await self.client.connect(session_id=self.session_id)
        except ConnectFailedError as exc:
            self.console.error(exc.message)
            self.console.error(NOT_RUNNING_HINT)
            return EXIT_CONNECTION
        except LLMWSConnectionError as exc:
            self.console.error(exc.message)
            return EXIT_CONNECTION
        except LLMWSClientError as exc:
            self.console.error(f"{exc.message} [{exc.code}]")
            return EXIT_ERROR
        self._greet()
        self._prompt_session = self._make_prompt_session()
        try:
            # SIGINT is ours for the whole session, not prompt-toolkit's between prompts: it
            # restores Python's default handler when a prompt ends, and a Ctrl-C landing there
            # (the terminal briefly out of raw mode) would end the REPL.
            with self._routing_sigint():
                while True:
                    self._at_prompt, self._pending_interrupt = True, False
                    try:
                        text = await self._prompt_session.prompt_async(handle_sigint=False)
                    except KeyboardInterrupt:
                        continue  # Ctrl-C at the prompt clears the line, like a shell
                    except EOFError:
                        break
                    finally:
                        self._at_prompt = False
                    if not await self.handle(text):
                        break
        finally:
            await self.client.disconnect()
        return EXIT_OK

    def _greet(self) -> None:
        client = self.client
        model = escape_control(_model_name(client.model))
        resumed = client.welcome.get("resumed")
        if self.session_id and not resumed:
            self.console.notice(f"session {self.session_id} could not be resumed")
        self.console.line(
            f"Connected to {client.url} - model {self.console.bold(model)}, "
            f"context {client.max_context or '?'} tokens - session {client.session_id}"
            + (" (resumed)" if resumed else "")
        )
        self.console.line(self.console.dim("Type /help for commands, Ctrl-D or /quit to leave."))

    async def _ensure_connected(self) -> bool:
        """After the client gave up reconnecting, try once more when the user acts."""
        if self.client.state is ClientState.OPEN or self.client.state is ClientState.RECONNECTING:
            return True
        try:
            await self.client.connect(self.client.session_id, self.client.last_seq)
        except LLMWSClientError as exc:
            self.console.error(exc.message)
            return False
        self.console.notice("reconnected")
        return True

    async def handle(self, text: str) -> bool:
        """Handle one input line; False means leave."""
        line = text.strip()
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit", "/bye"):
                return False
            handler = self._commands().get(command)
            if handler is None:
                self.console.error(f"unknown command {escape_control(command)}; try /help")
                return True
            if not await self._ensure_connected():
                return True
            await self._guarded(handler(rest.strip()))
            return True
        if line.startswith("//"):
            text = text.lstrip()[1:]  # `//x` sends a message that starts with `/x`
        if await self._ensure_connected():
            await self._guarded(self.chat(text))
        return True

    async def _guarded(self, work: Any) -> None:
        """Run a command or a chat turn; errors become one red line.

        Ctrl-C is watched for the whole of it, not only while a reply streams: a press while
        a command waits for the daemon (or before a reply's first token) stops that work and
        comes back to the prompt, as in a shell, instead of ending the REPL.
        """
        try:
            await self._interruptible(work, None)
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            self.console.notice("interrupted")
        except LLMWSConnectionError as exc:
            self.console.error(exc.message)
        except LLMWSClientError as exc:
            self.console.error(f"{escape_control(exc.message)} [{exc.code}]")
        except ValueError as exc:
            self.console.error(str(exc))

    async def _interruptible(self, work: Any, on_first: Callable[[], Any] | None) -> Any:
        """Await `work` while Ctrl-C is watched: the first press calls `on_first` (if given),
        the next one (or the first, without `on_first`) cancels the work.

        Calls nest: a press goes to the innermost work in progress. The outermost call owns the
        keyboard watcher, and SIGINT is routed to `_interrupt` (by `run` for the whole session,
        else here), so no moment between two nested calls is left with Python's default SIGINT,
        which would end the REPL.
        """
        task = asyncio.ensure_future(work)
        presses = 0

        def interrupt() -> None:
            nonlocal presses
            presses += 1
            if presses == 1 and on_first is not None:
                result = on_first()
                if asyncio.iscoroutine(result):
                    asyncio.ensure_future(result)
            else:
                task.cancel()

        self._interrupts.append(interrupt)
        try:
            if len(self._interrupts) > 1:
                return await task
            if self._pending_interrupt:
                self._pending_interrupt = False
                interrupt()
            with self._routing_sigint(), _KeyWatcher(self.input_for_keys(), self._interrupt):
                return await task
        finally:
            self._interrupts.remove(interrupt)

    def _interrupt(self) -> None:
        """A Ctrl-C (key press or SIGINT): for the innermost work in progress."""
        if self._interrupts:
            self._interrupts[-1]()
        elif not self._at_prompt:
            # Between a line's Enter and the start of its work: the press is for that work.
            self._pending_interrupt = True

    @contextlib.contextmanager
    def _routing_sigint(self) -> Iterator[None]:
        """SIGINT calls _interrupt while inside (nested entries keep the outer handler)."""
        loop = asyncio.get_running_loop()
        routed = False
        if not self._sigint_routed:
            # Not the main thread, or no signals here: key presses still work.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGINT, self._interrupt)
                routed = self._sigint_routed = True
        try:
            yield
        finally:
            if routed:
                self._sigint_routed = False
                loop.remove_signal_handler(signal.SIGINT)

    def input_for_keys(self) -> Any:
        if self._prompt_session is not None:
            return self._prompt_session.input
        return self.input

    async def chat(self, text: str) -> None:
        """One turn: stream the reply, Ctrl-C cancels it."""
        self._busy = True
        try:
            async with self.client.stream(text, self.system, **self.request_config) as stream:

                async def consume() -> None:
                    async for token in stream:
                        if self.streaming:
                            self.console.write(escape_control(token))

                try:
                    await self._interruptible(consume(), stream.cancel)
                except asyncio.CancelledError:
                    if _cancelled_from_outside():
                        raise
                    self.console.notice("stopped waiting for the reply")
                    return
            if not self.streaming:
                self.console.write(escape_control(stream.text))
            reason = stream.finish_reason
            if reason == "cancelled":
                self.console.notice("cancelled")
            elif reason == "length":
                self.console.notice("stopped at max_new_tokens; /config max_new_tokens=N for more")
            elif reason == "interrupted":
                self.console.notice("interrupted: the server restarted during this reply")
            else:
                self.console.end_line()
            for warning in stream.warnings:
                self.console.notice(escape_control(warning))
        finally:
            self._busy = False

    # ------------------------------------------------------------------ commands

    def _commands(self) -> dict[str, Callable[[str], Any]]:
        return {
            "/help": self.cmd_help,
            "/config": self.cmd_config,
            "/resources": self.cmd_resources,
            "/models": self.cmd_models,
            "/switch": self.cmd_switch,
            "/download": self.cmd_download,
            "/delete": self.cmd_delete,
            "/session": self.cmd_session,
            "/status": self.cmd_status,
            "/reset": self.cmd_reset,
            "/cancel": self.cmd_cancel,
            "/system": self.cmd_system,
        }

    async def cmd_help(self, _: str) -> None:
        for name, text in COMMANDS.items():
            self.console.line(f"  {name:<11} {text}")
        self.console.line("  Enter sends; a trailing \\ or Esc+Enter adds a line; Ctrl-C stops a reply.")

    async def cmd_config(self, rest: str) -> None:
        updates = parse_config_items(shlex.split(rest)) if rest else {}
        config = await self.client.set_config(**updates)
        shown = {k: v for k, v in config.items() if v is not None}
        self.console.line(
            "  ".join(f"{k}={escape_control(json.dumps(v, ensure_ascii=False))}" for k, v in shown.items())
            or "(server defaults)"
        )

    async def cmd_resources(self, _: str) -> None:
        for line in resources_lines(await self.client.get_resources()):
            self.console.line(line)

    async def _refresh_models(self) -> list[dict[str, Any]]:
        models = await self.client.list_models()
        self.model_names = [str(m.get("name")) for m in models if m.get("name")]
        return models

    async def cmd_models(self, _: str) -> None:
        for line in models_lines(await self._refresh_models()):
            self.console.line(line)

    async def _resolve_model(self, name: str) -> str:
        """A model name as listed -> its path (the daemon also accepts names)."""
        for m in await self._refresh_models():
            if name in (m.get("name"), m.get("path")):
                return str(m.get("path") or name)
        return name

    async def cmd_switch(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /switch NAME (see /models)")
        path = await self._resolve_model(rest)
        self.console.notice(f"loading {escape_control(rest)}")

        def progress(event: dict[str, Any]) -> None:
            if event.get("type") == "model_loading" and event.get("message"):
                self.console.notice(escape_control(str(event["message"])))

        event = await self._interruptible(self.client.switch_model(path, on_progress=progress), None)
        self.console.line(
            f"Model {self.console.bold(escape_control(_model_name(event.get('model'))))} loaded; "
            f"context {event.get('max_context', '?')} tokens"
        )

    async def cmd_download(self, rest: str) -> None:
        parts = shlex.split(rest)
        if len(parts) != 2:
            raise ValueError("usage: /download REPO DIR")
        repo, target = parts
        width = 24
        last_plain = [0.0]

        def progress(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "download_started":
                self.console.notice(f"download {event.get('job_id', '')} started")
            elif kind == "download_progress":
                line = progress_line(event, width)
                if self.console.is_tty:
                    # Redraw one line in place.
                    self.console.stream.write("\r\x1b[2K" + line)
                    self.console.stream.flush()
                    self.console.at_line_start = False
                else:
                    done, total = event.get("done") or 0, event.get("total") or 0
                    step = total / 10 if total else 0
                    if not step or done - last_plain[0] >= step or done >= total:
                        last_plain[0] = done
                        self.console.line(line)
            elif kind == "log" and event.get("message"):
                self.console.line(self.console.dim(escape_control(str(event["message"]))))

        try:
            event = await self._interruptible(self.client.download_model(repo, target, on_progress=progress), None)
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            self.console.notice("download cancelled")
            return
        self.console.line(f"Downloaded to {escape_control(str(event.get('path', target)))}")

    async def cmd_delete(self, rest: str) -> None:
        if not rest:
            raise ValueError("usage: /delete NAME (see /models)")
        event = await self.client.delete_model(rest)
        self.console.line(f"Deleted {escape_control(str(event.get('model_name', rest)))}")
        await self._refresh_models()

    async def cmd_session(self, _: str) -> None:
        client = self.client
        self.console.line(f"session  {client.session_id}")
        self.console.line(f"server   {client.url}")
        self.console.line(f"model    {escape_control(_model_name(client.model))}")
        self.console.line(f"last_seq {client.last_seq}")
        self.console.line(self.console.dim(f"resume with: llm.py --session {client.session_id}"))

    async def cmd_status(self, _: str) -> None:
        status = await self.client.get_status()
        for key, value in status.items():
            if key in ("type", "request_id"):
                continue
            if key == "model":
                value = _model_name(value if isinstance(value, dict) else None)
            self.console.line(f"{key:<16} {escape_control(str(value))}")

    async def cmd_reset(self, _: str) -> None:
        await self.client.reset()
        self.console.line("Conversation forgotten.")

    async def cmd_cancel(self, _: str) -> None:
        await self.client.cancel()
        self.console.line("Cancel sent.")

    async def cmd_system(self, rest: str) -> None:
        if not rest:
            self.console.line(f"system prompt: {escape_control(self.system)}" if self.system else "no system prompt")
        elif rest == "off":
            self.system = None
            self.console.line("System prompt cleared.")
        else:
            self.system = rest
            self.console.line("System prompt set.")


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python llm.py` and `llmws-chat`; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(name)s: %(levelname)s: %(message)s")
    try:
        if args.prompt is not None:
            return asyncio.run(run_once(args))
        if not sys.stdin.isatty():
            # Piped input without --prompt: treat stdin as the prompt, like `--prompt -`.
            args.prompt = "-"
            return asyncio.run(run_once(args))
        client = LLMWSEnhancedClient(args.server, api_key=args.api_key)
        repl = Repl(
            client,
            system=args.system,
            stream=not args.no_stream,
            session_id=args.session,
            request_config=_generation_flags(args),
        )
        return asyncio.run(repl.run())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
