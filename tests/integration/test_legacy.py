"""The original LLMWS clients against a real daemon: the legacy dialect of the protocol.

`OriginalClient` behaves as the original project's `llm.py` does: `{}` (or
`{"session_id"}`) first, the welcome read as the very first frame, then exactly one
`recv` per command, the original config keys (`repetition_penalty`, `do_sample`), and
the original field reads (`welcome.model` as a name, `capabilities`, `resources`,
`cuda`/`model`/`available_models`, `message` on `model_switched`/`model_deleted`).
Any frame it reads that is not the one it expects is what broke the original client.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from llmws_core.engine.scan import embedded_model_path

from ..conftest import scaled
from ..engine.fake_hub import tiny_gguf
from ..wire import Peer

#: The config every original inference carries (greedy and short here).
ORIGINAL_CONFIG = {
    "max_new_tokens": 12,
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "do_sample": False,
}


class OriginalClient:
    """A copy of the original client's protocol behaviour (no printing)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.session_id: str | None = None
        self.config = dict(ORIGINAL_CONFIG)

    @classmethod
    async def connect(cls, url: str, session_id: str | None = None, **kw: Any) -> OriginalClient:
        ws = await connect(url, max_size=2**24, **kw)
        client = cls(ws)
        await ws.send(json.dumps({"session_id": session_id} if session_id else {}))
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        client.session_id = client.welcome["session_id"]
        # The original reads these unguarded: they must be there, in these shapes.
        assert isinstance(client.welcome["model"], str)
        caps = client.welcome["capabilities"]
        assert isinstance(caps["vision"], bool) and isinstance(caps["flash_attention"], bool)
        assert caps["max_context"] > 0
        resources = client.welcome["resources"]
        assert isinstance(resources["device"], str)
        f"{resources.get('free_gb', 0):.1f}"  # formatted as a float by the original
        return client

    async def recv(self) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), scaled(120)))

    async def set_config(self, **kwargs: Any) -> dict[str, Any]:
        self.config.update(kwargs)
        await self.ws.send(json.dumps({"type": "config", "data": self.config}))
        return await self.recv()

    async def inference(self, prompt: str, system: str = "", **extra: Any) -> tuple[str, dict[str, Any]]:
        """Stream until done or error, as the original loop does: (text, last event)."""
        message = {
            "type": "inference",
            "prompt": {"system": system, "user": prompt, **extra},
            "config": self.config,
        }
        await self.ws.send(json.dumps(message))
        text = ""
        async for raw in self.ws:
            data = json.loads(raw)
            if data.get("type") == "token":
                text += data.get("data", "")
            elif data.get("type") in ("done", "error"):
                return text, data
        raise AssertionError("the connection closed during the reply")

    async def one(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.ws.send(json.dumps(message))
        return await self.recv()

    async def get_resources(self) -> dict[str, Any]:
        data = await self.one({"type": "get_resources"})
        assert data["type"] == "resources", data
        cuda = data.get("cuda")
        if cuda:
            f"{cuda['total_gb']:.1f} {cuda['free_gb']:.1f} {cuda['compute_capability'][0]}"
        model = data.get("model", {})
        model.get("name"), model.get("vision", False)
        for m in data.get("available_models", []):
            f"{m['name']} ({m['size_mb']:.0f} MB) [{m['source']}]"
        return data

    async def list_models(self) -> list[dict[str, Any]]:
        data = await self.one({"type": "list_models"})
        assert data["type"] == "models_list", data
        for m in data["models"]:
            f"{m['name']} {m['path']} {m['size_mb']:.0f} {m['source']}"
        return data["models"]

    async def switch_model(self, model_path: str) -> dict[str, Any]:
        await self.ws.send(json.dumps({"type": "switch_model", "model_path": model_path}))
        async for raw in self.ws:
            data = json.loads(raw)
            if data.get("type") in ("model_switched", "error"):
                return data
        raise AssertionError("the connection closed during the switch")

    async def delete_model(self, model_name: str) -> dict[str, Any]:
        return await self.one({"type": "delete_model", "model_name": model_name})

    async def disconnect(self, send_ack: bool = True) -> dict[str, Any] | None:
        answer = None
        if send_ack:
            await self.ws.send(json.dumps({"type": "ack"}))
            answer = await self.recv()
        await self.ws.close()
        return answer


async def test_original_one_shot_chat(shared_daemon) -> None:
    """`llm.py --prompt`: the original config keys are accepted and the reply streams to its done."""
    client = await OriginalClient.connect(shared_daemon.ws_url)
    assert client.welcome["resumed"] is False and client.welcome["missed"] == []
    text, last = await client.inference("Say hello.", system="You are helpful")
    assert last["type"] == "done", last
    assert text.strip() and last["total_tokens"] > 0
    ack = await client.disconnect()
    assert ack is not None and ack["type"] == "ack_received"


async def test_original_interactive_commands_each_get_their_own_answer(daemon_factory) -> None:
    """/config, /models, /resources, a chat, /switch and /delete: every command reads its own answer."""
    d = daemon_factory(start=False)
    shutil.copy(embedded_model_path(), d.models_dir / "smol.gguf")
    old = d.var_dir / "models" / "old-model"
    old.mkdir(parents=True)
    (old / "m.gguf").write_bytes(tiny_gguf())
    d.start()
    client = await OriginalClient.connect(d.ws_url)

    ack = await client.set_config(temperature=0.0, unknown_knob=3)
    assert ack["type"] == "config_ack", ack
    assert ack["config"]["repeat_penalty"] == pytest.approx(1.1)  # repetition_penalty, translated
    assert ack["config"]["temperature"] == 0.0

    models = await client.list_models()
    assert {"smol.gguf", "old-model/m.gguf"} <= {m["name"] for m in models}

    resources = await client.get_resources()
    assert resources["model"]["name"] == client.welcome["model"]
    assert resources["model"]["vision"] is False
    assert {m["name"] for m in resources["available_models"]} >= {"smol.gguf"}

    text, last = await client.inference("Name a color.")
    assert last["type"] == "done" and text.strip()

    switched = await client.switch_model("models/smol.gguf")
    assert switched["type"] == "model_switched", switched
    assert "smol.gguf" in switched["message"]

    deleted = await client.delete_model("old-model")
    assert deleted["type"] == "model_deleted", deleted
    assert "old-model" in deleted["message"] and not old.exists()

    refused = await client.delete_model("no-such-model")
    assert refused["type"] == "error" and refused["message"]

    # After all that, the next command still reads its own answer.
    models = await client.list_models()
    assert "old-model/m.gguf" not in {m["name"] for m in models}
    await client.disconnect()


async def test_resume_with_unacked_events_keeps_one_frame_per_command(shared_daemon) -> None:
    """A resumed session's missed reply travels inside the welcome; the next command reads its answer."""
    first = await OriginalClient.connect(shared_daemon.ws_url)
    text, last = await first.inference("Name an animal.")
    assert last["type"] == "done"
    await first.disconnect(send_ack=False)

    again = await OriginalClient.connect(shared_daemon.ws_url, session_id=first.session_id)
    assert again.welcome["resumed"] is True
    missed = again.welcome["missed"]
    assert "".join(e["data"] for e in missed if e["type"] == "token") == text
    assert missed[-1]["type"] == "done"
    ack = await again.set_config(temperature=0.0)
    assert ack["type"] == "config_ack", ack
    await again.disconnect()  # the original acks everything on the way out

    # Acknowledged: the next resume has nothing missed.
    third = await OriginalClient.connect(shared_daemon.ws_url, session_id=first.session_id)
    assert third.welcome["missed"] == []
    await third.disconnect()


async def test_resume_of_an_unknown_id_puts_the_notice_in_the_welcome(shared_daemon) -> None:
    """An unknown session id: a new session, the reason inside the welcome, no extra frame."""
    client = await OriginalClient.connect(shared_daemon.ws_url, session_id="0" * 32)
    assert client.welcome["resumed"] is False
    assert client.welcome["notice"]["code"] == "session_not_resumed"
    assert client.welcome["session_id"] != "0" * 32
    models = await client.list_models()  # the very next frame is the answer
    assert models
    await client.disconnect()


async def test_broadcast_from_another_client_does_not_reach_a_waiting_original_client(
    daemon_factory,
) -> None:
    """Another client's model switch is not read as the answer to the original client's next command."""
    d = daemon_factory(start=False)
    shutil.copy(embedded_model_path(), d.models_dir / "smol.gguf")
    d.start()
    client = await OriginalClient.connect(d.ws_url)
    other = await Peer.open(d.ws_url)
    await other.send({"type": "switch_model", "model_path": "models/smol.gguf", "request_id": "s"})
    await other.until("model_switched")
    await asyncio.sleep(0.3)  # the broadcast has had every chance to arrive
    ack = await client.set_config(temperature=0.0)
    assert ack["type"] == "config_ack", ack
    text, last = await client.inference("Say yes.")
    assert last["type"] == "done" and text.strip()
    await other.close()
    await client.disconnect()


async def test_a_reply_the_original_client_was_not_given_survives_its_ack(shared_daemon) -> None:
    """A reply started by an earlier connection and still running is not trimmed by the original client's ack."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send(
        {
            "type": "inference",
            "prompt": "Count from one to forty.",
            "request_id": "long",
            "config": {"temperature": 0, "max_new_tokens": 60},
        }
    )
    await peer.until("token", request_id="long")
    await peer.close()  # the reply runs on without its client

    client = await OriginalClient.connect(shared_daemon.ws_url, session_id=sid)
    given = {e["seq"]: e for e in client.welcome["missed"] if e.get("request_id") == "long"}
    await client.disconnect()  # acks "everything"

    back = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": 0})
    events = [e for e in back.events if e.get("request_id") == "long"]
    if not any(e["type"] == "done" for e in [*events, *given.values()]):
        events += await back.until("done", request_id="long")
    # What the original client was given, plus what is still buffered, is the whole reply:
    # from its start to its done with no seq missing.
    seen = {**given, **{e["seq"]: e for e in events}}
    seqs = sorted(seen)
    assert seen[seqs[0]]["type"] == "start" and seen[seqs[-1]]["type"] == "done"
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "part of the reply was trimmed unseen"
    await back.close()


async def test_images_on_a_text_only_model_get_a_typed_error(shared_daemon) -> None:
    """`prompt.images` is accepted; the text-only model answers `unsupported` and the connection serves on."""
    client = await OriginalClient.connect(shared_daemon.ws_url)
    _, last = await client.inference("What is in the picture?", images=[{"path": "/tmp/cat.png"}])
    assert last["type"] == "error" and last["code"] == "unsupported", last
    assert "text only" in last["message"]
    text, last = await client.inference("Say hi.")
    assert last["type"] == "done" and text.strip()
    await client.disconnect()


async def test_the_original_plain_text_page_gets_plain_text(shared_daemon) -> None:
    """The first page's plain-text prompt is answered with the reply as plain text, then a normal close."""
    prompt = "<|system|>You are brief.<|end|>\n<|user|>Say hello.<|end|>\n<|assistant|>"
    frames = []
    async with connect(shared_daemon.ws_url) as ws:
        await ws.send(prompt)
        try:
            while True:
                frames.append(await asyncio.wait_for(ws.recv(), scaled(120)))
        except ConnectionClosed:
            pass
        assert ws.close_code == 1000
    text = "".join(frames)
    assert text.strip()
    assert not text.lstrip().startswith("{"), "JSON reached a page that shows frames as text"


# ------------------------------------------------------------------ Origin: null


async def test_null_origin_chats_but_never_manages_models(shared_daemon) -> None:
    """A page from disk (Origin: null) connects by default and chats; switch and delete are refused."""
    headers = [("Origin", "null")]
    client = await OriginalClient.connect(shared_daemon.ws_url, additional_headers=headers)
    text, last = await client.inference("Say hi.")
    assert last["type"] == "done" and text.strip()
    refused = await client.switch_model("embedded/" + embedded_model_path().name)
    assert refused["type"] == "error" and refused["code"] == "forbidden", refused
    refused = await client.delete_model("anything")
    assert refused["type"] == "error" and refused["code"] == "forbidden", refused
    await client.disconnect()


async def test_null_origin_resumes_only_sessions_such_pages_started(shared_daemon) -> None:
    """A null-origin peer cannot resume a conversation started elsewhere, but resumes its own."""
    headers = [("Origin", "null")]
    mine = await Peer.open(shared_daemon.ws_url)
    other_sid = mine.welcome["session_id"]
    await mine.close()
    page = await Peer.open(shared_daemon.ws_url, {"session_id": other_sid}, additional_headers=headers)
    assert page.welcome["resumed"] is False and page.welcome["session_id"] != other_sid
    page_sid = page.welcome["session_id"]
    await page.close()
    again = await Peer.open(shared_daemon.ws_url, {"session_id": page_sid}, additional_headers=headers)
    assert again.welcome["resumed"] is True
    await again.close()


async def test_null_origin_with_the_admin_key_may_manage_models(daemon_factory) -> None:
    """Origin: null with the admin key gets model management (the key, not the page, decides)."""
    d = daemon_factory(config={"security": {"admin_keys": ["admin-key-123456"]}})
    page = await Peer.open(d.ws_url, {"api_key": "admin-key-123456"}, additional_headers=[("Origin", "null")])
    await page.send({"type": "delete_model", "model_name": "no-such-model", "request_id": "d"})
    err = (await page.until("error"))[-1]
    assert err["code"] == "model_not_found", err  # past the admin check
    await page.close()


async def test_the_current_dialect_is_unchanged(shared_daemon) -> None:
    """A client that says protocol 1 still gets the replay as frames, model as an object and strict config."""
    peer = await Peer.open(shared_daemon.ws_url)
    assert isinstance(peer.welcome["model"], dict)
    await peer.send({"type": "config", "data": {"repetition_penalty": 1.1}, "request_id": "c"})
    err = (await peer.until("error"))[-1]
    assert err["code"] == "bad_request"
    await peer.close()
