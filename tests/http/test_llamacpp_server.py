"""The llama-cpp FastAPI server's routes (/, /models, /setModel, /restore_cache) on a real daemon."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.http.conftest import sse_events


def test_root_reports_status_and_model(http: httpx.Client) -> None:
    """GET / says the server is up and which model serves."""
    body = http.get("/").json()
    assert body["status"] == "ok"
    assert body["model"].startswith("SmolLM2")


def test_models_lists_the_embedded_model(http: httpx.Client) -> None:
    """GET /models lists model names and marks the current one."""
    body = http.get("/models").json()
    assert body["current"] in body["models"]
    assert any(m["loaded"] for m in body["data"])


def test_set_model_switches_and_refuses_unknown_names(http: httpx.Client) -> None:
    """POST /setModel loads a listed model; an unknown one is a 404 with a detail."""
    current = http.get("/models").json()["current"]
    ok = http.post("/setModel", json={"modelName": current})
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"]["name"] == current
    missing = http.post("/setModel", json={"modelName": "no-such-model.gguf"})
    assert missing.status_code == 404
    assert "detail" in missing.json()
    outside = http.post("/setModel", json={"modelName": "../../etc/passwd"})
    assert outside.status_code == 403


def _document(seed: int, words: int = 700) -> str:
    rng = random.Random(seed)
    vocab = [
        "river",
        "stone",
        "garden",
        "window",
        "engine",
        "cloud",
        "silver",
        "market",
        "lamp",
        "forest",
        "paper",
        "bridge",
        "winter",
        "harbor",
        "violin",
        "orange",
        "castle",
        "signal",
        "thunder",
        "mirror",
    ]
    return f"Document {seed}. " + " ".join(rng.choice(vocab) for _ in range(words))


def _ttft(http: httpx.Client, messages: list[dict[str, str]]) -> float:
    """Seconds from sending a streamed request to its first content chunk (read to the end,
    so the model is idle again when this returns)."""
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            data = event["data"]
            if first is None and data != "[DONE]" and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    assert first is not None, "no content chunk"
    return first


@pytest.mark.slow
def test_restore_cache_makes_the_next_first_token_faster(http: httpx.Client) -> None:
    """After /restore_cache with a long prefix, a request starting with it gets its first token sooner than a cold one."""
    question = {"role": "user", "content": "Which word comes first?"}
    cold_prefix = [{"role": "system", "content": _document(1)}]
    warm_prefix = [{"role": "system", "content": _document(2)}]
    cold = _ttft(http, [*cold_prefix, question])
    r = http.post("/restore_cache", json={"messages": warm_prefix})
    assert r.status_code == 200, r.text
    cached = r.json()
    assert cached["status"] == "ok" and cached["cached_tokens"] > 600
    warm = _ttft(http, [*warm_prefix, question])
    assert warm < cold * 0.6, f"warm {warm:.3f}s vs cold {cold:.3f}s"
