"""The web client's rendering, conversations and controls in headless Chromium.

Replies are rendered from a real daemon with the real embedded model, except in the two
tests that need exact model output (hostile markup, a reply streamed in known steps): there a
small scripted peer speaking the LLMWS protocol stands in for the daemon, as a compromised
model or server would. Screenshots of each state go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from . import test_web_client as base
from .test_web_client import (
    ARTIFACTS,
    CHROMIUM,
    MS,
    REPO,
    _new_page,
    _open_ui,
    _send,
    _set_max_tokens,
    _state,
    _wait_connected,
)

browser = base.browser  # the headless chromium fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]

CODE_PROMPT = "Write a Python function that adds two numbers. Answer with a code block."
TABLE_PROMPT = "Show a table of three planets and their sizes in Markdown."


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web_{name}.png"), full_page=False)


def _wait_done(page: Any, count: int, timeout: int = 90) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('.msg.assistant[data-state=\"done\"]').length === {count}",
        timeout=timeout * MS,
    )


def _history(daemon: Any, session: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{daemon.http_url}/v1/sessions/{session}/history", timeout=30)
    r.raise_for_status()
    return r.json()["messages"]


# --------------------------------------------------------------------------- a scripted peer


class ScriptedServer:
    """A WebSocket peer that speaks the LLMWS protocol and streams replies it is given.

    `replies` is a list of replies, each a list of token strings; each token `None` pauses the
    stream until the next of `resumes` is set."""

    def __init__(self, replies: list[list[str | None]]) -> None:
        self.replies = list(replies)
        self.resumes = [threading.Event() for _ in range(4)]
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(lambda: self._stop and self._stop.set_result(None))
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        async with serve(self._handle, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop

    async def _handle(self, ws: ServerConnection) -> None:
        seq = 0

        async def emit(event: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            await ws.send(json.dumps({**event, "seq": seq}))

        await ws.recv()
        await ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "session_id": "5f0c6a52-3d8e-4c1b-9a55-2b7f8f0e7c11",
                    "resumed": False,
                    "model": {"name": "scripted"},
                    "max_context": 2048,
                    "last_seq": 0,
                }
            )
        )
        async for frame in ws:
            msg = json.loads(frame)
            if msg.get("type") != "inference" or not self.replies:
                continue
            rid = msg["request_id"]
            await emit(
                {"type": "start", "request_id": rid, "tokens_in": 5, "max_tokens": 512, "prompt": msg["prompt"]["user"]}
            )
            tokens = self.replies.pop(0)
            pauses = iter(self.resumes)
            for token in tokens:
                if token is None:
                    await asyncio.to_thread(next(pauses).wait, 30)
                    continue
                await emit({"type": "token", "request_id": rid, "data": token})
                await asyncio.sleep(0.01)
            await emit({"type": "done", "request_id": rid, "total_tokens": len(tokens), "finish_reason": "stop"})


def _open_from_disk(browser: Any, url: str) -> Any:
    page = _new_page(browser)
    page.goto((REPO / "web_client_enhanced.html").as_uri())
    page.fill("#server", url)
    page.press("#server", "Enter")
    _wait_connected(page)
    return page


def _chunks(text: str, size: int = 3) -> list[str | None]:
    return [text[i : i + size] for i in range(0, len(text), size)]


HOSTILE = "\n\n".join(
    [
        "Hello <img src=x onerror=\"window.pwned='img'\"> there",
        "<script>window.pwned='script'</script>",
        "[a javascript link](javascript:window.pwned='link')",
        "<a href=\"javascript:window.pwned='rawlink'\">raw link</a>",
        "<svg onload=\"window.pwned='svg'\"><circle r=5></circle></svg>",
        "<iframe src=\"javascript:window.pwned='iframe'\"></iframe>",
        "![pic](x\" onerror=\"window.pwned='mdimg')",
        "[data](data:text/html,<script>window.pwned='data'</script>)",
        "<details open ontoggle=\"window.pwned='details'\"><summary>x</summary></details>",
        "<style>body{display:none}</style><form action=x><input autofocus onfocus=\"window.pwned='input'\"></form>",
        "```html\n<script>window.pwned='code'</script>\n```",
        "```js\" onmouseover=\"window.pwned='lang'\nlet a = 1;\n```",
        "[ok](https://example.com/) and `<b>inline</b>`",
        "$\\href{javascript:window.pwned='tex'}{click}$ and $\\htmlClass{x}{y}$",
    ]
)


def test_hostile_reply_is_rendered_inert(browser: Any) -> None:
    """A reply full of markup and script (streamed in pieces) renders as text and runs nothing."""
    with ScriptedServer([_chunks(HOSTILE, 5)]) as server:
        page = _open_from_disk(browser, server.url)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        _send(page, "Say something nasty.")
        _wait_done(page, 1, 30)
        page.wait_for_timeout(300)  # an onerror or ontoggle would fire by now
        bubble = page.locator(".msg.assistant .bubble")
        for tag in ("img", "script", "svg", "iframe", "style", "form", "input", "details"):
            assert bubble.locator(tag).count() == 0, f"<{tag}> reached the page"
        hrefs = bubble.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert [h for h in hrefs if h is not None] == ["https://example.com/"], hrefs
        for link in bubble.locator("a").all():
            link.click(modifiers=["Shift"]) if link.get_attribute("href") is None else None
        assert page.evaluate("() => window.pwned") is None
        assert dialogs == []
        text = bubble.text_content() or ""
        assert "<script>window.pwned='script'</script>" in text, "raw HTML is shown as text"
        assert "<b>inline</b>" in text
        code = bubble.locator("pre code").first.text_content() or ""
        assert "<script>window.pwned='code'</script>" in code
        assert page.locator("a[href='https://example.com/']").get_attribute("rel") == "noopener noreferrer nofollow"
        _shot(page, "hostile")
        assert page.js_errors == []


def test_streaming_renders_finished_blocks_once(browser: Any) -> None:
    """While a reply streams, finished blocks are rendered and highlighted once and stay put."""
    first = "Here is code:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nAnd a table:\n\n"
    rest = (
        "| planet | size |\n|---|---|\n| Earth | 1 |\n| Mars | 0.5 |\n\n"
        "Euler: $e^{i\\pi}+1=0$, for $5 and $10.\n\n$$\\int_0^1 x\\,dx = \\frac{1}{2}$$\n\n"
    )
    code_start, code_more, code_end = "```js\nlet x = 1;\n", "let y = 2;\n", "```\n\nDone."
    tokens = [
        *_chunks(first),
        None,
        *_chunks(rest),
        *_chunks(code_start),
        None,
        *_chunks(code_more),
        None,
        *_chunks(code_end),
    ]
    with ScriptedServer([tokens]) as server:
        page = _open_from_disk(browser, server.url)
        _send(page, "Show me.")
        # The code block is followed by another block, so it is final and highlighted already.
        page.wait_for_selector(".msg.assistant[data-state='streaming'] pre code.hljs .hljs-keyword", timeout=20 * MS)
        page.evaluate("() => { document.querySelector('.msg.assistant pre').dataset.mark = 'first'; }")
        assert page.locator(".msg.assistant table").count() == 0
        _shot(page, "streaming")
        server.resumes[0].set()
        # A code block being written keeps its box: only its text grows.
        page.wait_for_function(
            "() => { const c = document.querySelector('.msg.assistant .tail pre code');"
            " return c && c.textContent === 'let x = 1;'; }",
            timeout=20 * MS,
        )
        page.evaluate("() => { document.querySelector('.msg.assistant .tail pre code').dataset.mark = 'open'; }")
        server.resumes[1].set()
        page.wait_for_function(
            "() => { const c = document.querySelector('.msg.assistant .tail pre code');"
            " return c && c.textContent === 'let x = 1;\\nlet y = 2;'; }",
            timeout=20 * MS,
        )
        assert page.locator(".msg.assistant .tail pre code[data-mark='open']").count() == 1
        server.resumes[2].set()
        _wait_done(page, 1, 30)
        assert page.locator(".msg.assistant pre[data-mark='first']").count() == 1, (
            "the finished code block was not rendered again"
        )
        assert page.locator(".msg.assistant pre").count() == 2
        assert page.locator(".msg.assistant pre code.language-js").text_content() == "let x = 1;\nlet y = 2;"
        assert page.locator(".msg.assistant table td").all_text_contents() == ["Earth", "1", "Mars", "0.5"]
        # Math is typeset (inline and display); dollars of money are left alone.
        assert page.locator(".msg.assistant .llmws-math .katex").count() == 2
        assert page.locator(".msg.assistant .llmws-math.display .katex-display").count() == 1
        assert "for $5 and $10." in (page.locator(".msg.assistant .bubble").text_content() or "")
        _shot(page, "markdown_done")
        assert page.evaluate("() => window.llmws.text(0)") == first + rest + code_start + code_more + code_end
        assert page.js_errors == []


def test_phone_width_has_conversations_and_panels_as_drawers(browser: Any) -> None:
    """At phone width the conversations open as a drawer, and nothing spills sideways."""
    with ScriptedServer([_chunks("A **short** reply with `code`.")]) as server:
        page = _new_page(browser, width=390, height=800)
        page.goto((REPO / "web_client_enhanced.html").as_uri())
        assert page.locator("#convs").bounding_box()["x"] < 0, "the drawer starts closed"
        page.click("#panelToggle")
        page.fill("#server", server.url)
        page.press("#server", "Enter")
        _wait_connected(page)
        page.click("#closeSide")
        _send(page, "Hi")
        _wait_done(page, 1, 30)
        assert page.locator(".msg.assistant strong").inner_text() == "short"
        page.click("#convToggle")
        page.wait_for_function("() => document.getElementById('convs').getBoundingClientRect().x >= 0")
        assert page.locator("#convList .conv .open").all_inner_texts() == ["Hi"]
        page.wait_for_timeout(250)
        _shot(page, "phone_conversations")
        page.click("#newConv")
        page.wait_for_function("() => document.getElementById('convs').getBoundingClientRect().x < 0")
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        assert page.js_errors == []


# --------------------------------------------------------------------------- the real model


def test_real_replies_render_highlighted_code_a_table_and_their_facts(browser: Any, daemon: Any) -> None:
    """The embedded model's code block is highlighted with a Copy button, its table is a table,
    and each reply shows tokens, speed, time to first token, model and finish reason."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 120)
    _send(page, CODE_PROMPT)
    _wait_done(page, 1)
    code = page.locator(".msg.assistant pre code.hljs")
    assert code.count() >= 1 and "language-python" in (code.first.get_attribute("class") or "")
    assert code.first.locator(".hljs-keyword").count() >= 1, "keywords are highlighted"
    assert page.locator(".msg.assistant pre .codebar button.copy-code").count() >= 1
    assert "```" not in (page.locator(".msg.assistant .bubble").first.text_content() or "")
    meta = page.locator(".msg.assistant .meta").first
    assert meta.locator(".fact-tokens").inner_text().endswith("tokens")
    assert "tok/s" in meta.locator(".fact-tps").inner_text()
    assert "first token" in meta.locator(".fact-ttft").inner_text()
    assert "SmolLM2" in meta.locator(".fact-model").inner_text()
    assert meta.locator(".fact-finish").inner_text() in ("stop", "length")
    _shot(page, "code")

    page.click("#newConv")  # the same question in a fresh conversation each time
    page.wait_for_function("() => window.llmws.state.connected && !document.querySelector('.msg')", timeout=20 * MS)
    _send(page, TABLE_PROMPT)
    _wait_done(page, 1)
    table = page.locator(".msg.assistant table")
    assert table.count() == 1 and table.locator("th").count() >= 2 and table.locator("td").count() >= 4
    _shot(page, "table")
    assert page.js_errors == []


def test_conversations_survive_reload_restart_and_other_tabs(browser: Any, daemon: Any) -> None:
    """Two conversations switch, come back after a reload, in another tab, and after a browser
    restart, where one whose cached transcript is gone is rebuilt from the server."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 8)
    _send(page, "Name a fruit.")
    _wait_done(page, 1)
    first = _state(page)["sessionId"]
    first_reply = page.evaluate("() => window.llmws.text(0)")

    page.click("#newConv")
    page.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId && window.llmws.state.sessionId !== '{first}'",
        timeout=20 * MS,
    )
    assert page.locator(".msg").count() == 0, "a new conversation starts empty"
    _send(page, "Name a color.")
    _wait_done(page, 1)
    second = _state(page)["sessionId"]
    titles = page.locator("#convList .conv .open").all_inner_texts()
    assert titles == ["Name a color.", "Name a fruit."], "titled by their first message, newest first"

    page.click(f"#convList .conv[data-id='{first}'] .open")
    page.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId === '{first}'", timeout=20 * MS
    )
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["Name a fruit."]
    assert page.locator("#convList .conv[aria-current='true']").get_attribute("data-id") == first

    page.reload()
    _wait_connected(page)
    assert _state(page)["sessionId"] == first
    assert page.locator("#convList .conv").count() == 2
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["Name a fruit."]

    tab = page.context.new_page()
    tab.goto(daemon.http_url + "/ui")
    _wait_connected(tab)
    tab.click(f"#convList .conv[data-id='{second}'] .open")
    tab.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId === '{second}'", timeout=20 * MS
    )
    assert tab.locator(".msg.user .bubble").all_inner_texts() == ["Name a color."]
    second_reply = tab.evaluate("() => window.llmws.text(0)")
    tab.close()
    page.reload()
    _wait_connected(page)
    assert _state(page)["sessionId"] == first, "a tab keeps its own conversation across reloads"

    # A browser restart: a new context with what the browser keeps on disk (localStorage), less
    # the cached transcripts, so the page must ask the server for them.
    saved = page.context.storage_state()
    page.context.close()
    for origin in saved["origins"]:
        origin["localStorage"] = [e for e in origin["localStorage"] if not e["name"].startswith("llmws.transcript")]
    context = browser.new_context(bypass_csp=True, storage_state=saved, viewport={"width": 1280, "height": 860})
    again = context.new_page()
    errors: list[str] = []
    again.on("pageerror", lambda exc: errors.append(str(exc)))
    again.goto(daemon.http_url + "/ui")
    _wait_connected(again)
    # The conversation used last is the one shown.
    again.wait_for_selector(".msg.assistant[data-state='done']", timeout=20 * MS)
    assert _state(again)["sessionId"] == first
    assert again.locator(".msg.user .bubble").all_inner_texts() == ["Name a fruit."]
    assert again.evaluate("() => window.llmws.text(0)") == first_reply
    assert again.locator("#convList .conv .open").all_inner_texts() == ["Name a color.", "Name a fruit."]
    again.click(f"#convList .conv[data-id='{second}'] .open")
    again.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId === '{second}'"
        " && document.querySelector('.msg.assistant[data-state=\"done\"]')",
        timeout=20 * MS,
    )
    assert again.locator(".msg.user .bubble").all_inner_texts() == ["Name a color."]
    assert again.evaluate("() => window.llmws.text(0)") == second_reply
    _shot(again, "conversations")
    # The rebuilt conversation goes on where it was: the model still has the history.
    _send(again, "And another one?")
    _wait_done(again, 2)
    assert [m["role"] for m in _history(daemon, second)] == ["user", "assistant", "user", "assistant"]
    assert errors == []


def test_rename_search_and_delete_remove_the_session_from_disk(browser: Any, daemon: Any) -> None:
    """A conversation is renamed and found by search; deleting one, open or not, deletes its
    session folder on the server."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 6)
    _send(page, "Hello there.")
    _wait_done(page, 1)
    first = _state(page)["sessionId"]
    page.click("#newConv")
    page.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId !== '{first}'", timeout=20 * MS
    )
    _send(page, "Good morning.")
    _wait_done(page, 1)
    second = _state(page)["sessionId"]
    sessions = daemon.var_dir / "sessions"
    assert (sessions / first).is_dir() and (sessions / second).is_dir()

    row = page.locator(f"#convList .conv[data-id='{first}']")
    row.hover()
    row.locator("button.rename").click()
    page.fill("#convList input.rename", "Greetings test")
    page.press("#convList input.rename", "Enter")
    assert page.locator(f"#convList .conv[data-id='{first}'] .open").inner_text() == "Greetings test"
    page.fill("#convSearch", "greet")
    assert page.locator("#convList .conv .open").all_inner_texts() == ["Greetings test"]
    page.fill("#convSearch", "")
    _shot(page, "sidebar")

    # Deleting a conversation that is not open (the page reaches its session on its own).
    row = page.locator(f"#convList .conv[data-id='{first}']")
    row.hover()
    row.locator("button.delete").click()
    row.locator("button.delete").click()
    page.wait_for_function(f"() => !document.querySelector(\"#convList .conv[data-id='{first}']\")", timeout=20 * MS)
    page.wait_for_function(f"() => !window.llmws.conversations().some(c => c.id === '{first}')", timeout=5 * MS)
    assert not (sessions / first).exists()
    assert _state(page)["sessionId"] == second, "the open conversation stays open"

    # Deleting the open conversation: the page moves to a new one.
    row = page.locator(f"#convList .conv[data-id='{second}']")
    row.locator("button.delete").click()
    row.locator("button.delete").click()
    page.wait_for_function(
        f"() => window.llmws.state.connected && window.llmws.state.sessionId && window.llmws.state.sessionId !== '{second}'",
        timeout=20 * MS,
    )
    assert not (sessions / second).exists()
    assert page.locator(".msg").count() == 0
    assert all(c["id"] not in (first, second) for c in page.evaluate("() => window.llmws.conversations()"))
    assert page.js_errors == []


def test_regenerate_and_edit_resend_change_the_session_history(browser: Any, daemon: Any) -> None:
    """Regenerate replaces the last reply, and an edited message replaces the turn, in the page
    and in the history the model sees."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 8)
    _send(page, "Name a fruit.")
    _wait_done(page, 1)
    _send(page, "Name a color.")
    _wait_done(page, 2)
    session = _state(page)["sessionId"]
    assert len(_history(daemon, session)) == 4

    page.click("#tab-config")
    page.fill("#temperature", "1.5")  # a different reply is likely, not needed
    page.click("#tab-connection")
    last = page.locator(".msg.assistant").nth(1)
    old = last.get_attribute("data-request-id")
    last.locator("button.regen").click()
    page.wait_for_function(
        f"() => !document.querySelector(\"[data-request-id='{old}']\")"
        " && document.querySelectorAll('.msg.assistant').length === 2"
        " && document.querySelectorAll('.msg.assistant')[1].dataset.state === 'done'"
        " && document.querySelectorAll('.msg.user').length === 2",
        timeout=60 * MS,
    )
    page.wait_for_timeout(200)
    history = _history(daemon, session)
    assert [m["content"] for m in history if m["role"] == "user"] == ["Name a fruit.", "Name a color."]
    assert history[3]["content"] == page.evaluate("() => window.llmws.text(1)"), "the new reply is the one kept"
    assert page.locator(".msg.assistant").first.locator("button.regen").is_hidden(), "only the last reply regenerates"

    page.locator(".msg.user").first.locator("button.edit").click()
    page.fill(".msg.user .edit-box textarea", "Name a vegetable.")
    _shot(page, "editing")
    page.click(".msg.user .edit-box .save-edit")
    page.wait_for_function(
        "() => document.querySelectorAll('.msg.user').length === 1"
        " && document.querySelectorAll('.msg.assistant').length === 1"
        " && document.querySelector('.msg.assistant[data-state=\"done\"]')",
        timeout=60 * MS,
    )
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["Name a vegetable."]
    page.wait_for_timeout(200)
    history = _history(daemon, session)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "Name a vegetable."
    assert page.js_errors == []


def test_export_theme_and_attachments(browser: Any, daemon: Any, tmp_path: Path) -> None:
    """Export gives the conversation as Markdown and JSON; the theme follows the system and
    toggles; a text file goes into the message and an image is refused with a reason."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 8)
    page.click("#tab-config")
    page.fill("#systemPrompt", "You are terse.")
    page.click("#tab-connection")
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is plum.\n")
    page.set_input_files("#fileInput", str(notes))
    page.wait_for_selector("#attachments .chip:has-text('notes.txt')")
    _send(page, "What is the secret word?")
    _wait_done(page, 1)
    sent = page.locator(".msg.user .bubble").inner_text()
    assert sent.startswith("What is the secret word?") and "notes.txt" in sent and "The secret word is plum." in sent
    assert page.locator("#attachments .chip").count() == 0
    reply = page.evaluate("() => window.llmws.text(0)")

    with page.expect_download() as dl:
        page.click("#exportMd")
    md = Path(dl.value.path()).read_text()
    assert dl.value.suggested_filename.endswith(".md")
    assert md.startswith("# What is the secret word?")
    assert "You are terse." in md and "## You" in md and "## Assistant" in md and reply.strip() in md
    with page.expect_download() as dl:
        page.click("#exportJson")
    data = json.loads(Path(dl.value.path()).read_text())
    assert data["session_id"] == _state(page)["sessionId"]
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["messages"][2]["content"] == reply
    assert data["messages"][2]["finish_reason"] in ("stop", "length") and data["messages"][2]["tokens"] >= 1

    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    page.set_input_files("#fileInput", str(image))
    page.wait_for_selector(".notice:has-text('does not accept images')")
    assert page.locator("#attachments .chip").count() == 0

    bg = "() => getComputedStyle(document.body).backgroundColor"
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate(bg)
    page.emulate_media(color_scheme="light")
    light = page.evaluate(bg)
    assert dark != light, "the theme follows the system"
    page.click("#themeToggle")  # system -> dark
    assert page.evaluate(bg) == dark and page.get_attribute("html", "data-theme") == "dark"
    assert (
        page.evaluate("() => getComputedStyle(document.querySelector('.msg.assistant .bubble')).color")
        != "rgb(27, 31, 42)"
    )
    page.wait_for_timeout(300)  # let the buttons' colour transition end before the picture
    _shot(page, "dark")
    page.click("#themeToggle")  # dark -> light
    assert page.evaluate(bg) == light
    page.reload()
    assert page.get_attribute("html", "data-theme") == "light", "the choice is kept"
    page.click("#themeToggle")  # light -> system
    assert page.get_attribute("html", "data-theme") is None
    assert page.js_errors == []
