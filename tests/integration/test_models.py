"""Model management over the WebSocket door: list, switch (across backends), delete,
download and estimate, against real daemons."""

from __future__ import annotations

import json
import shutil

from llmws_core.engine.scan import embedded_model_path

from ..engine.backends.test_transformers import build_tiny_model
from ..engine.fake_hub import FakeHub, FakeRepo, tiny_gguf
from ..wire import Peer

GREEDY = {"temperature": 0, "max_new_tokens": 8}


async def test_runtime_switch_between_llamacpp_and_transformers(daemon_factory) -> None:
    """A client switches to a safetensors model (transformers) and back to the GGUF (llama.cpp);
    every connected session hears model_switched and inference works on each."""
    d = daemon_factory(start=False)
    build_tiny_model(d.models_dir / "tiny-llama")
    shutil.copy(embedded_model_path(), d.models_dir / "smol.gguf")
    d.start()
    peer = await Peer.open(d.ws_url)
    other = await Peer.open(d.ws_url)
    assert peer.welcome["model"]["backend"] == "llamacpp"
    await peer.send({"type": "list_models"})
    names = {m["name"]: m for m in (await peer.until("models_list"))[-1]["models"]}
    assert names["tiny-llama"]["format"] == "safetensors" and names["tiny-llama"]["backend"] == "transformers"
    assert names["smol.gguf"]["loaded"] is True

    await peer.send({"type": "switch_model", "model_path": "tiny-llama", "request_id": "sw"})
    events = await peer.until("model_switched", timeout=300)
    assert any(e["type"] == "model_loading" for e in events)
    assert events[-1]["model"]["backend"] == "transformers" and events[-1]["request_id"] == "sw"
    assert (await other.until("model_switched"))[-1]["model"]["name"] == "tiny-llama"
    text, _ = await peer.infer("hello", "t1", **GREEDY)
    assert isinstance(text, str)
    fresh = await Peer.open(d.ws_url)
    assert fresh.welcome["model"]["backend"] == "transformers"

    await peer.send({"type": "switch_model", "model_path": "models/smol.gguf"})
    events = await peer.until("model_switched", timeout=300)
    assert events[-1]["model"]["backend"] == "llamacpp"
    text, _ = await peer.infer("Say hi.", "t2", **GREEDY)
    assert text.strip()
    for p in (peer, other, fresh):
        await p.close()


async def test_failed_switch_keeps_old_model(daemon_factory) -> None:
    """A model that fails to load leaves the old one serving and says why."""
    d = daemon_factory(start=False)
    (d.models_dir / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    shutil.copy(embedded_model_path(), d.models_dir / "good.gguf")
    d.start()
    peer = await Peer.open(d.ws_url)  # noqa: E702
    await peer.send({"type": "switch_model", "model_path": "broken.gguf", "request_id": "b"})
    err = (await peer.until("error", timeout=120))[-1]
    assert err["code"] in ("model_load_failed", "model_not_found") and err["request_id"] == "b"
    text, _ = await peer.infer("Say hi.", "ok", **GREEDY)
    assert text.strip()
    await peer.close()


async def test_delete_and_path_confinement(daemon) -> None:
    """delete_model removes a downloaded model, refuses the loaded one and anything outside the folders."""
    target = daemon.var_dir / "models" / "old-model"
    target.mkdir(parents=True)
    (target / "m.gguf").write_bytes(tiny_gguf())
    peer = await Peer.open(daemon.ws_url)
    for bad in ("../../etc/passwd", "/etc/passwd", "embedded/SmolLM2-135M-Instruct.Q4_1.gguf"):
        await peer.send({"type": "delete_model", "model_name": bad})
        err = (await peer.until("error"))[-1]
        assert err["code"] in ("forbidden", "model_not_found"), err
    await peer.send({"type": "delete_model", "model_name": "old-model", "request_id": "del"})
    done = (await peer.until("model_deleted"))[-1]
    assert done["request_id"] == "del" and not target.exists()
    await peer.close()


async def test_delete_through_a_symlink_chain_is_refused(daemon, tmp_path) -> None:
    """delete_model of "evil/chain.gguf" (models/evil -> a folder outside, whose chain.gguf links back into var/models) is forbidden; nothing is removed; a 1,000-character name is model_not_found."""
    victim = daemon.var_dir / "models" / "victim.gguf"
    victim.write_bytes(tiny_gguf())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "chain.gguf").symlink_to(victim)
    (daemon.models_dir / "evil").symlink_to(outside)
    peer = await Peer.open(daemon.ws_url)
    await peer.send({"type": "delete_model", "model_name": "evil/chain.gguf", "request_id": "chain"})
    err = (await peer.until("error", request_id="chain"))[-1]
    assert err["code"] == "forbidden", err
    assert (outside / "chain.gguf").is_symlink() and victim.exists()
    await peer.send({"type": "delete_model", "model_name": "n" * 1000, "request_id": "long"})
    err = (await peer.until("error", request_id="long"))[-1]
    assert err["code"] == "model_not_found", err
    await peer.close()


async def test_download_through_huggingface_hub_then_listed(daemon_factory, tmp_path) -> None:
    """download_model streams started/progress/done events and the model is then listed."""
    repo = FakeRepo("acme/tiny-GGUF", {"tiny.Q4_K_M.gguf": tiny_gguf(padding=3_000_000), "README.md": b"hi"})
    with FakeHub([repo]) as hub:
        d = daemon_factory(env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
        peer = await Peer.open(d.ws_url)
        await peer.send({"type": "download_model", "repo": "acme/tiny-GGUF", "target_dir": "tiny", "request_id": "dl"})
        events = await peer.until("download_done", timeout=180)
        kinds = [e["type"] for e in events]
        assert "download_started" in kinds and not any(e["type"] == "error" for e in events)
        assert events[-1]["path"].startswith("var/models/tiny")
        await peer.send({"type": "list_models"})
        models = (await peer.until("models_list"))[-1]["models"]
        assert any(m["source"] == "var" and m["name"].startswith("tiny") for m in models)
        await peer.send({"type": "download_model", "repo": "acme/tiny-GGUF", "target_dir": "../evil"})
        assert (await peer.until("error"))[-1]["code"] == "forbidden"
        await peer.close()


async def test_estimate_model_uses_kv_arithmetic(daemon) -> None:
    """estimate_model reports the KV bytes per token of the embedded model (30 layers x 3 kv heads x 64 x f16 x 2)."""
    peer = await Peer.open(daemon.ws_url)
    await peer.send({"type": "list_models"})
    model = (await peer.until("models_list"))[-1]["models"][0]
    await peer.send({"type": "estimate_model", "model_path": model["path"]})
    est = (await peer.until("model_estimate"))[-1]
    assert est["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 and est["max_context"] <= 8192
    await peer.close()


async def test_http_switch_tells_websocket_clients(daemon_factory) -> None:
    """A switch through HTTP (/setModel, or a chat completion naming another local model)
    sends model_switched, with the new max_context, to every connected WebSocket client."""
    import httpx

    d = daemon_factory(start=False)
    shutil.copy(embedded_model_path(), d.models_dir / "a.gguf")
    shutil.copy(embedded_model_path(), d.models_dir / "b.gguf")
    d.start()
    peer = await Peer.open(d.ws_url)
    first = peer.welcome["model"]["name"]
    other = "b.gguf" if first == "a.gguf" else "a.gguf"
    async with httpx.AsyncClient(base_url=d.http_url, timeout=300) as http:
        r = await http.post("/setModel", json={"modelName": other})
        assert r.status_code == 200, r.text
        switched = (await peer.until("model_switched", timeout=60))[-1]
        assert switched["model"]["name"] == other and switched["max_context"] == r.json()["max_context"]
        body = {"model": first, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert (await peer.until("model_switched", timeout=60))[-1]["model"]["name"] == first
    await peer.close()


async def test_quantization_is_the_header_s_on_every_path(daemon_factory) -> None:
    """A GGUF whose file name claims another quantization is reported by its header's
    file type, the same in the model list and for the loaded model."""
    d = daemon_factory(start=False)
    shutil.copy(embedded_model_path(), d.models_dir / "smol-Q8_0.gguf")  # really Q4_1
    d.start()
    peer = await Peer.open(d.ws_url)
    await peer.send({"type": "list_models"})
    listed = {m["name"]: m for m in (await peer.until("models_list"))[-1]["models"]}
    assert listed["smol-Q8_0.gguf"]["quantization"] == "Q4_1"
    assert peer.welcome["model"]["name"] == "smol-Q8_0.gguf"
    assert peer.welcome["model"]["quantization"] == "Q4_1"
    await peer.close()


async def test_the_embedded_model_can_be_switched_back_to_and_named_in_the_config(daemon_factory) -> None:
    """With another model loaded, switch_model to the embedded model's name or `embedded/<name>` loads it; `model.path: "embedded/<name>"` picks it at start."""
    embedded = embedded_model_path()
    assert embedded is not None
    d = daemon_factory(start=False)
    shutil.copyfile(embedded, d.models_dir / "other.gguf")
    d.start()
    peer = await Peer.open(d.ws_url)
    assert peer.welcome["model"]["name"] == "other.gguf"
    for i, name in enumerate((embedded.name, f"embedded/{embedded.name}")):
        await peer.send({"type": "switch_model", "model_path": "other.gguf", "request_id": f"o{i}"})
        await peer.until("model_switched", 180, request_id=f"o{i}")
        await peer.send({"type": "switch_model", "model_path": name, "request_id": f"e{i}"})
        switched = (await peer.until("model_switched", 180, request_id=f"e{i}"))[-1]
        assert switched["model"]["source"] == "embedded", switched
    await peer.close()
    d.kill()
    d.config_path = d.root / "config.json"
    d.config_path.write_text(json.dumps({"model": {"path": f"embedded/{embedded.name}"}}))
    d.start()
    peer = await Peer.open(d.ws_url)
    assert peer.welcome["model"]["source"] == "embedded", peer.welcome["model"]
    await peer.close()
