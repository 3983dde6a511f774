"""Images in, text out, against a real daemon serving a tiny random LLaVA (a real architecture).

The WebSocket door (`prompt.images`: base64, data: URLs, loopback paths), the
original client's `--image`, the OpenAI door (`image_url` parts through the
official SDK), the history that keeps images sealed across a reconnect and a
restart, the limits, and a text-only model's refusal.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..conftest import DaemonProcess, scaled
from ..wire import Peer

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from ..tiny_vlm import build_tiny_vlm, png  # noqa: E402
from .test_legacy import OriginalClient  # noqa: E402

RED = png((220, 20, 20))
B64 = base64.b64encode(RED).decode()
DATA_URL = "data:image/png;base64," + B64
GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava")


def start_vlm_daemon(root: Path, vlm_folder: Path, config: dict[str, Any] | None = None) -> DaemonProcess:
    d = DaemonProcess(root, ["--model", "tiny-llava"], {"OMP_NUM_THREADS": "1"}, config)
    shutil.copytree(vlm_folder, d.models_dir / "tiny-llava")
    d.start()
    return d


@pytest.fixture(scope="module")
def vlm_daemon(tmp_path_factory: pytest.TempPathFactory, vlm_folder: Path) -> Iterator[DaemonProcess]:
    """One daemon serving the tiny VLM, with a small image limit for the limit tests."""
    d = start_vlm_daemon(tmp_path_factory.mktemp("vlmd"), vlm_folder, {"limits": {"max_images_per_request": 3}})
    try:
        yield d
    finally:
        d.kill()


def prompt(text: str, *pics: Any) -> dict[str, Any]:
    return {"user": text, "images": list(pics)}


async def start_of(peer: Peer, p: Any, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await peer.send({"type": "inference", "prompt": p, "request_id": rid, "config": GREEDY})
    events = await peer.until("done", request_id=rid)
    errors = [e for e in events if e.get("type") == "error"]
    assert not errors, errors
    return next(e for e in events if e.get("type") == "start" and e.get("request_id") == rid), events


async def error_of(peer: Peer, p: Any, rid: str) -> dict[str, Any]:
    await peer.send({"type": "inference", "prompt": p, "request_id": rid, "config": GREEDY})
    events = await peer.until("error", request_id=rid)
    return events[-1]


async def test_welcome_and_models_list_say_the_model_takes_images(vlm_daemon: DaemonProcess) -> None:
    """The welcome (model info and capabilities) and models_list mark the VLM as a vision model."""
    peer = await Peer.open(vlm_daemon.ws_url)
    assert peer.welcome["model"]["vision"] is True
    assert peer.welcome["capabilities"]["vision"] is True
    await peer.send({"type": "list_models"})
    listed = (await peer.until("models_list"))[-1]["models"]
    assert [m["vision"] for m in listed if m["name"] == "tiny-llava"] == [True]
    await peer.close()


async def test_an_image_prompt_streams_and_counts_the_image(vlm_daemon: DaemonProcess, tmp_path: Path) -> None:
    """Base64, a data: URL and a loopback path all stream a reply whose tokens_in counts the image."""
    pic = tmp_path / "red.png"
    pic.write_bytes(RED)
    peer = await Peer.open(vlm_daemon.ws_url)
    text_only, _ = await start_of(peer, prompt("What is this?"), "t")
    await peer.send({"type": "reset"})
    await peer.until("reset_done")
    starts = []
    for i, ref in enumerate([{"data": B64, "media_type": "image/png"}, {"url": DATA_URL}, B64, {"path": str(pic)}]):
        start, events = await start_of(peer, prompt("What is this?", ref), f"i{i}")
        assert any(e["type"] == "token" for e in events)
        done = events[-1]
        assert done["tokens_in"] == start["tokens_in"]
        starts.append(start["tokens_in"])
        await peer.send({"type": "reset"})
        await peer.until("reset_done")
    assert len(set(starts)) == 1 and starts[0] > text_only["tokens_in"]
    await peer.close()


async def test_bad_images_get_typed_errors_and_the_connection_serves_on(
    vlm_daemon: DaemonProcess, tmp_path: Path
) -> None:
    """Corrupt data, a non-image file by path, too many images: invalid_image; then a normal reply."""
    secret = tmp_path / "notes.png"
    secret.write_text("the launch codes")
    peer = await Peer.open(vlm_daemon.ws_url)
    cases = {
        "garbage": "bm90IGFuIGltYWdl",  # base64 of "not an image"
        "truncated": base64.b64encode(RED[:50]).decode(),
        "bad-base64": {"data": "%%%", "media_type": "image/png"},
        "not-image-file": {"path": str(secret)},
        "too-many": None,
    }
    for rid, ref in cases.items():
        p = prompt("hi", *([B64] * 4)) if ref is None else prompt("hi", ref)
        err = await error_of(peer, p, rid)
        assert err["code"] == "invalid_image", err
        assert "launch codes" not in err["message"]
    _, events = await start_of(peer, prompt("Still there?", B64), "ok")
    assert events[-1]["type"] == "done"
    await peer.close()


async def test_history_keeps_images_across_reconnect_and_restart(tmp_path: Path, vlm_folder: Path) -> None:
    """A follow-up without images still sees the first turn's image, after a reconnect and a kill -9
    restart; the image is never on disk in plaintext."""
    d = start_vlm_daemon(tmp_path / "d", vlm_folder)
    try:
        peer = await Peer.open(d.ws_url)
        sid = peer.welcome["session_id"]
        await start_of(peer, prompt("Look at this.", B64), "a")
        follow = {"user": "And now?"}
        with_image, _ = await start_of(peer, follow, "b")
        await peer.close()
        fresh = await Peer.open(d.ws_url)
        # The same two text turns without the image: fewer tokens.
        await start_of(fresh, {"user": "Look at this."}, "a")
        without_image, _ = await start_of(fresh, follow, "b")
        await fresh.close()
        assert with_image["tokens_in"] > without_image["tokens_in"]

        back = await Peer.open(d.ws_url, {"session_id": sid, "last_seq": 10**6})
        assert back.welcome["resumed"] is True
        again, _ = await start_of(back, follow, "c")
        await back.close()
        d.kill()
        needle = B64[40:80].encode()
        for f in d.var_dir.rglob("*"):
            if f.is_file():
                assert needle not in f.read_bytes(), f
        d.start()
        back = await Peer.open(d.ws_url, {"session_id": sid, "last_seq": 10**6})
        assert back.welcome["resumed"] is True
        restarted, _ = await start_of(back, follow, "d")
        await back.close()
        # Each follow-up adds two turns; the image's tokens are there every time.
        assert again["tokens_in"] > with_image["tokens_in"]
        assert restarted["tokens_in"] > again["tokens_in"]
    finally:
        d.kill()


async def test_original_client_image_flag(vlm_daemon: DaemonProcess, tmp_path: Path) -> None:
    """The original client's `--image` (a path in prompt.images) gets a reply on a vision model."""
    pic = tmp_path / "red.png"
    pic.write_bytes(RED)
    client = await OriginalClient.connect(vlm_daemon.ws_url)
    assert client.welcome["capabilities"]["vision"] is True
    text, last = await client.inference("What is in the picture?", images=[{"path": str(pic)}])
    assert last["type"] == "done", last
    await client.disconnect()


@pytest.fixture
def sdk(vlm_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vlm_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0) as c:
        yield c


def image_message(text: str, url: str = DATA_URL) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}
    ]


def test_openai_image_url_parts(sdk: openai.OpenAI) -> None:
    """The SDK's image_url data URL is read: prompt_tokens count it; streaming works; /v1/models says vision."""
    plain = sdk.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "Describe it."}], max_tokens=4, temperature=0
    )
    seen = sdk.chat.completions.create(
        model="tiny-llava", messages=image_message("Describe it."), max_tokens=4, temperature=0
    )  # type: ignore[arg-type]
    assert seen.usage is not None and plain.usage is not None
    assert seen.usage.prompt_tokens > plain.usage.prompt_tokens
    stream = sdk.chat.completions.create(
        model="tiny-llava",
        messages=image_message("Describe it."),
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == seen.choices[0].message.content
    models = {m.id: m.model_dump() for m in sdk.models.list().data}
    assert models["tiny-llava"]["vision"] is True


def test_openai_bad_and_remote_images(sdk: openai.OpenAI, vlm_daemon: DaemonProcess) -> None:
    """A remote URL is refused (allow_image_urls is off), a corrupt image is invalid_image, as OpenAI errors."""
    with pytest.raises(openai.BadRequestError) as remote:
        sdk.chat.completions.create(
            model="tiny-llava", messages=image_message("hi", "https://example.com/cat.png"), max_tokens=4
        )  # type: ignore[arg-type]
    assert remote.value.code == "unsupported" and "allow_image_urls" in remote.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model="tiny-llava", messages=image_message("hi", "data:image/png;base64,AAAA"), max_tokens=4
        )  # type: ignore[arg-type]
    assert bad.value.code == "invalid_image"
    r = httpx.post(
        vlm_daemon.http_url + "/v1/chat/completions",
        json={"messages": image_message("hi"), "max_tokens": 2},
        timeout=scaled(60),
    )
    assert r.status_code == 200


async def test_text_only_model_refuses_images(shared_daemon: DaemonProcess) -> None:
    """The embedded text model answers images with unsupported on both doors and serves on."""
    peer = await Peer.open(shared_daemon.ws_url)
    assert peer.welcome["capabilities"]["vision"] is False and peer.welcome["model"]["vision"] is False
    err = await error_of(peer, prompt("hi", B64), "x")
    assert err["code"] == "unsupported"
    await peer.close()
    with openai.OpenAI(
        base_url=shared_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0
    ) as c:
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model="x", messages=image_message("hi"), max_tokens=4)  # type: ignore[arg-type]
        assert refused.value.code == "unsupported"
        ok = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert ok.choices[0].message.content is not None


def test_repl_image_flag(vlm_daemon: DaemonProcess, tmp_path: Path) -> None:
    """`python llm.py -p ... --image FILE --json` sends the image; its tokens count in the reply's tokens_in."""
    import json
    import subprocess
    import sys

    from ..conftest import REPO

    pic = tmp_path / "red.png"
    pic.write_bytes(RED)

    def one_shot(*extra: str) -> dict[str, Any]:
        result = subprocess.run(
            [
                sys.executable,
                "llm.py",
                "--server",
                vlm_daemon.ws_url,
                "-p",
                "What is it?",
                "--json",
                "--temperature",
                "0",
                "--max-new-tokens",
                "3",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        return next(e for e in events if e["type"] == "done")

    assert one_shot("--image", str(pic))["tokens_in"] > one_shot()["tokens_in"]


async def test_history_keeps_only_the_newest_images(vlm_daemon: DaemonProcess) -> None:
    """Past max_images_per_request (3 here) images, the oldest turns lose their images, not their text."""
    peer = await Peer.open(vlm_daemon.ws_url)
    follow = {"user": "ok"}
    sizes = []
    for i in range(5):
        await start_of(peer, prompt("look", B64), f"p{i}")
        sizes.append((await start_of(peer, follow, f"f{i}"))[0]["tokens_in"])
    await peer.close()
    growth = [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    # Each round adds two text turns and one image; from the fourth image on, one image
    # leaves the history as another comes, so the prompt grows by the text turns alone.
    assert growth[0] == growth[1] > growth[2] == growth[3]


def test_images_reach_a_remote_vision_model(vlm_daemon: DaemonProcess, daemon_factory: Any) -> None:
    """A gateway daemon sends images to a remote model configured with vision (here the VLM daemon's
    /v1, through LiteLLM): the upstream reads them; a remote model without vision refuses them."""
    pytest.importorskip("litellm")
    remote = {
        "model": "openai/tiny-llava",
        "api_base": vlm_daemon.http_url + "/v1",
        "api_key": None,
        "max_context": 512,
    }
    gw = daemon_factory(
        config={
            "remote_models": [
                {"name": "seeing", **{k: v for k, v in remote.items() if v is not None}, "vision": True},
                {"name": "blind", **{k: v for k, v in remote.items() if v is not None}},
            ]
        }
    )
    with openai.OpenAI(base_url=gw.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0) as c:
        listed = {m.id: m.model_dump() for m in c.models.list().data}
        assert listed["seeing"]["vision"] is True and listed["blind"]["vision"] is False
        direct = openai.OpenAI(
            base_url=vlm_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0
        )
        want = direct.chat.completions.create(
            model="tiny-llava", messages=image_message("Describe it."), max_tokens=4, temperature=0
        )  # type: ignore[arg-type]
        got = c.chat.completions.create(
            model="seeing", messages=image_message("Describe it."), max_tokens=4, temperature=0
        )  # type: ignore[arg-type]
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.usage is not None and want.usage is not None
        assert got.usage.prompt_tokens == want.usage.prompt_tokens  # the upstream's count, image included
        with pytest.raises(openai.BadRequestError) as refused:
            c.chat.completions.create(model="blind", messages=image_message("Describe it."), max_tokens=4)  # type: ignore[arg-type]
        assert refused.value.code == "unsupported"
        direct.close()


def test_anthropic_image_blocks_and_ollama_images(vlm_daemon: DaemonProcess) -> None:
    """Anthropic `image` blocks and Ollama `images` reach the vision model: their tokens count in the usage."""
    base = vlm_daemon.http_url
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}}

    def anthropic(content: Any) -> dict[str, Any]:
        r = httpx.post(
            base + "/v1/messages",
            json={
                "model": "tiny-llava",
                "max_tokens": 3,
                "temperature": 0,
                "messages": [{"role": "user", "content": content}],
            },
            timeout=scaled(120),
        )
        assert r.status_code == 200, r.text
        return r.json()

    plain = anthropic([{"type": "text", "text": "Describe it."}])
    seen = anthropic([block, {"type": "text", "text": "Describe it."}])
    assert seen["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    bad = httpx.post(
        base + "/v1/messages",
        json={
            "model": "tiny-llava",
            "max_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
                    ],
                }
            ],
        },
        timeout=scaled(60),
    )
    assert bad.status_code == 400 and bad.json()["type"] == "error"

    def ollama(images: list[str] | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "user", "content": "Describe it."}
        if images:
            msg["images"] = images
        r = httpx.post(
            base + "/api/chat",
            json={
                "model": "tiny-llava",
                "stream": False,
                "messages": [msg],
                "options": {"temperature": 0, "num_predict": 3},
            },
            timeout=scaled(120),
        )
        assert r.status_code == 200, r.text
        return r.json()

    assert ollama([B64])["prompt_eval_count"] > ollama(None)["prompt_eval_count"]
