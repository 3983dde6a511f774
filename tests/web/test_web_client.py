"""The browser client (`web_client_enhanced.html`) in headless Chromium against a real daemon.

Uses Debian's chromium (`apt-get install -y chromium`) through Playwright's Python API with its
executable path set, so no browser is ever downloaded. Skipped with a reason when it is missing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
# One knob to slow every wait down on a loaded machine (milliseconds, as Playwright counts).
SCALE = float(os.environ.get("LLMWS_TEST_TIMEOUT_SCALE", "1"))
MS = int(1000 * SCALE)

# A prompt that makes even a 135M model talk for a while, so a reload lands mid-reply.
LONG_PROMPT = "Count from 1 to 300, separated by commas. Do not stop early."

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed (apt-get install -y chromium)",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright (never a downloaded browser)."""
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def _new_page(browser: Any, **viewport: int) -> Any:
    # bypass_csp: the page's CSP forbids eval, which Playwright's wait_for_function relies on.
    context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 860, **viewport})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # type: ignore[attr-defined]
    return page


def _state(page: Any) -> dict[str, Any]:
    return page.evaluate(
        "() => ({connected: window.llmws.state.connected,"
        " sessionId: window.llmws.state.sessionId, lastSeq: window.llmws.state.lastSeq})"
    )


def _wait_connected(page: Any) -> None:
    page.wait_for_function("() => window.llmws && window.llmws.state.connected", timeout=20 * MS)


def _open_ui(browser: Any, daemon: Any) -> Any:
    page = _new_page(browser)
    page.goto(daemon.http_url + "/ui")
    # Served over HTTP the page finds the WS port through /health and connects by itself;
    # pressing Connect must then be harmless (and connects if it had not).
    page.click("#connect")
    _wait_connected(page)
    return page


def _set_max_tokens(page: Any, value: int) -> None:
    page.click("#tab-config")
    page.fill("#maxTokens", str(value))
    page.fill("#temperature", "0")
    page.click("#tab-connection")


def _send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_chat_streams_and_a_reload_mid_reply_completes_it(browser: Any, daemon: Any) -> None:
    """A reply streams in, and reloading the page mid-reply shows it finish without loss."""
    page = _open_ui(browser, daemon)
    session = _state(page)["sessionId"]
    assert session and page.inner_text("#sessionId") == session
    _set_max_tokens(page, 48)

    _send(page, LONG_PROMPT)
    assert page.input_value("#prompt") == "", "Enter sends and clears the box"
    page.wait_for_selector(".msg.user", timeout=5 * MS)
    # Streaming: text shows up while the reply is still running.
    page.wait_for_function(
        "() => { const a = document.querySelector('.msg.assistant');"
        " return a && a.dataset.state === 'streaming'"
        " && a.querySelector('.bubble').textContent.length > 0; }",
        timeout=60 * MS,
    )
    assert page.is_enabled("#stop")
    # The reply's text as the model wrote it (the bubble shows it rendered as Markdown).
    before = page.evaluate(
        "() => { const a = document.querySelector('.msg.assistant');"
        " return {text: window.llmws.text(0), state: a.dataset.state}; }"
    )
    seq_before = _state(page)["lastSeq"]
    assert before["state"] == "streaming", "the reload must land mid-reply"

    page.reload()
    _wait_connected(page)
    assert _state(page)["sessionId"] == session, "the session survives a reload"
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120 * MS)

    replies = page.locator(".msg.assistant")
    assert replies.count() == 1, "replayed events must not create a second reply"
    assert page.locator(".msg.user").count() == 1
    assert page.locator(".msg.user .bubble").inner_text() == LONG_PROMPT
    assert (replies.first.locator(".bubble").text_content() or "").strip(), "the reply shows"
    final = page.evaluate("() => window.llmws.text(0)") or ""
    assert final.strip(), "the reply after reload is not empty"
    assert final.startswith(before["text"]), "what was shown before the reload is kept, not repeated"
    assert len(final) > len(before["text"])
    assert replies.first.get_attribute("data-finish-reason") in {"stop", "length"}
    assert _state(page)["lastSeq"] > seq_before
    assert page.is_disabled("#stop")

    # Model and user text are text, never markup.
    _set_max_tokens(page, 8)
    _send(page, '<img src=x onerror="window.pwned=1"> hi')
    page.wait_for_function(
        "() => document.querySelectorAll('.msg.assistant[data-state=\"done\"]').length === 2",
        timeout=60 * MS,
    )
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("() => window.pwned === undefined")
    assert page.locator(".msg.user").nth(1).inner_text().startswith("<img src=x")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_client.png"))
    assert page.js_errors == []


def test_models_panel_lists_and_switches_to_the_embedded_model(browser: Any, daemon: Any) -> None:
    """The models panel lists the embedded model, and switching to it reports the switch."""
    page = _open_ui(browser, daemon)
    page.click("#tab-models")
    page.click("#refreshModels")
    item = page.locator("#modelsList li.model", has_text="SmolLM2")
    item.first.wait_for(timeout=20 * MS)
    item.first.locator("button.switch").click()
    # The switch is announced in the chat and the list is re-read afterwards.
    page.wait_for_selector(".notice:has-text('Model switched')", timeout=120 * MS)
    page.wait_for_selector("#modelsList li.model.loaded", timeout=20 * MS)
    assert "SmolLM2" in page.inner_text("#modelsList li.model.loaded")
    assert "SmolLM2" in page.inner_text("#modelView")

    # The chat still works on the switched model.
    _set_max_tokens(page, 8)
    _send(page, "Say hello.")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60 * MS)
    assert page.js_errors == []


def test_stop_button_cancels_the_running_reply(browser: Any, daemon: Any) -> None:
    """Pressing Stop ends the streaming reply, marked as cancelled."""
    page = _open_ui(browser, daemon)
    _set_max_tokens(page, 2000)
    _send(page, LONG_PROMPT)
    page.wait_for_selector(".msg.assistant[data-state='streaming']", timeout=60 * MS)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=30 * MS)
    assert page.get_attribute(".msg.assistant", "data-finish-reason") == "cancelled"
    assert page.is_disabled("#stop")
    assert page.js_errors == []


def test_resources_and_config_panels_talk_to_the_server(browser: Any, daemon: Any) -> None:
    """The resources panel shows RAM bars and the settings panel is acknowledged by the server."""
    page = _open_ui(browser, daemon)
    page.click("#tab-resources")
    page.click("#refreshResources")
    page.wait_for_selector("#resources .bar[aria-label='RAM']", timeout=20 * MS)
    page.click("#tab-config")
    page.fill("#topP", "0.9")
    page.fill("#systemPrompt", "You are terse.")
    page.click("#applyConfig")
    page.wait_for_function(
        "() => document.getElementById('configStatus').textContent.includes('Applied')",
        timeout=20 * MS,
    )
    assert page.js_errors == []


def test_page_opened_from_disk_connects_with_the_server_field(browser: Any, daemon_factory: Any) -> None:
    """Opened as a file (the seed's way), the page connects by default to the server typed in
    the Server field and chats."""
    # A page from disk sends `Origin: null`: allowed by default, to chat (not to manage models).
    daemon = daemon_factory()
    page = _new_page(browser, width=390, height=800)  # a phone-width screen
    page.goto((REPO / "web_client_enhanced.html").as_uri())
    assert _state(page)["connected"] is False
    page.click("#panelToggle")
    page.fill("#server", daemon.ws_url)
    page.press("#server", "Enter")
    _wait_connected(page)
    page.click("#closeSide")
    _set_max_tokens_mobile(page, 8)
    _send(page, "Hi")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60 * MS)
    # Nothing spills sideways on a narrow screen.
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    assert page.js_errors == []


def _set_max_tokens_mobile(page: Any, value: int) -> None:
    page.click("#panelToggle")
    _set_max_tokens(page, value)
    page.click("#closeSide")


def test_a_required_api_key_is_asked_for_then_used(browser: Any, daemon_factory: Any) -> None:
    """Without the key the page says so and stops retrying; with it, the page connects."""
    daemon = daemon_factory(config={"security": {"api_keys": ["web-key-123-0123456789"], "require_api_key": True}})
    page = _new_page(browser)
    page.goto(daemon.http_url + "/ui")
    page.wait_for_function(
        "() => document.getElementById('status').textContent === 'API key needed'",
        timeout=20 * MS,
    )
    assert _state(page)["connected"] is False
    assert page.evaluate("() => document.activeElement.id") == "apiKey"
    page.fill("#apiKey", "web-key-123-0123456789")
    page.press("#apiKey", "Enter")
    _wait_connected(page)
    assert page.get_attribute("#status", "data-state") == "connected"
    assert page.js_errors == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_page_reconnects_by_itself_after_the_daemon_restarts(browser: Any, daemon_factory: Any) -> None:
    """When the daemon dies and comes back, the page reconnects to the same session unaided."""
    # Fixed ports, so that the restarted daemon is where the page left it.
    ports = ["--port", str(_free_port()), "--http-port", str(_free_port())]
    daemon = daemon_factory(extra_args=ports)
    page = _open_ui(browser, daemon)
    session = _state(page)["sessionId"]

    daemon.kill()
    page.wait_for_function(
        "() => !window.llmws.state.connected && document.getElementById('status').dataset.state === 'reconnecting'",
        timeout=20 * MS,
    )
    daemon.start()
    _wait_connected(page)
    assert _state(page)["sessionId"] == session, "the same session is resumed"
    _set_max_tokens(page, 8)
    _send(page, "Hi")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=60 * MS)
    assert page.js_errors == []
