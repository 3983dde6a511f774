"""The transformers backend with a vision-language model: a tiny random LLaVA on the CPU, real PNGs.

The folder goes through the real loading path (`AutoProcessor`,
`AutoModelForImageTextToText`); images go through the processor into the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmws_core import errors, images
from llmws_core.engine.backends.base import GenerationParams, GenerationResult

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from llmws_core.engine.backends.transformers import TransformersBackend  # noqa: E402
from tests.tiny_vlm import IMAGE_TOKENS, build_tiny_vlm, png  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more threads on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersBackend]:
    b = TransformersBackend(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava"))
    b.load()
    yield b
    b.unload()


def picture(color: tuple[int, int, int] = (200, 30, 30)) -> images.CheckedImage:
    return images.check_bytes(png(color), images.ImageLimits())


def ask(text: str, *pics: images.CheckedImage) -> list[dict[str, object]]:
    msg: dict[str, object] = {"role": "user", "content": text}
    if pics:
        msg["images"] = list(pics)
    return [msg]


def run(
    b: TransformersBackend, messages: list[dict[str, object]], params: GenerationParams
) -> tuple[str, GenerationResult]:
    pieces: list[str] = []
    result = b.generate(messages, params, pieces.append, lambda: False)
    return "".join(pieces), result


def test_loads_as_vision_model(backend: TransformersBackend) -> None:
    """A folder with a vision_config loads as a vision model and says so in its public info."""
    info = backend.info.public()
    assert info["vision"] is True
    assert info["architecture"] == "llava"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert backend.max_concurrency == 1


def test_image_tokens_are_counted(backend: TransformersBackend) -> None:
    """The prompt's token count includes each image's tokens (two images: twice as many)."""
    text_only = backend.count_tokens(ask("what is this?"))
    one = backend.count_tokens(ask("what is this?", picture()))
    two = backend.count_tokens(ask("what is this?", picture(), picture((0, 0, 255))))
    assert one - text_only >= IMAGE_TOKENS
    assert two - one == one - text_only


def test_generates_from_an_image(backend: TransformersBackend) -> None:
    """A prompt with a PNG streams a reply whose tokens_in counts the image; greedy is repeatable."""
    msgs = ask("Describe the picture.", picture())
    text, result = run(backend, msgs, GenerationParams(max_new_tokens=8, temperature=0.0))
    assert result.tokens_in == backend.count_tokens(msgs)
    assert result.tokens_in > backend.count_tokens(ask("Describe the picture."))
    assert 1 <= result.tokens_out <= 8 and result.finish_reason in ("length", "stop")
    again, _ = run(backend, msgs, GenerationParams(max_new_tokens=8, temperature=0.0))
    assert again == text


def test_the_image_changes_the_reply(backend: TransformersBackend) -> None:
    """The pixels reach the model: the same prompt with two different images gives different logits-driven replies."""
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    replies = {
        run(backend, ask("Describe it.", picture(c)), params)[0]
        for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)]
    }
    assert len(replies) > 1


def test_sampling_with_a_seed_repeats(backend: TransformersBackend) -> None:
    """Sampling with the same seed gives the same reply."""
    msgs = ask("Tell me.", picture())
    params = GenerationParams(max_new_tokens=8, temperature=0.9, seed=7)
    assert run(backend, msgs, params)[0] == run(backend, msgs, params)[0]


def test_cancel_stops_within_a_token(backend: TransformersBackend) -> None:
    """A cancelled request stops at once and reports cancelled."""
    polls = [0]

    def cancelled() -> bool:
        polls[0] += 1
        return polls[0] > 3

    result = backend.generate(
        ask("Go on.", picture()), GenerationParams(max_new_tokens=200, temperature=0.0), lambda _t: None, cancelled
    )
    assert result.finish_reason == "cancelled"
    assert result.tokens_out < 10


def test_context_limit_counts_images(backend: TransformersBackend) -> None:
    """A prompt whose images push it past the context is context_too_long."""
    limit = backend.info.max_context
    backend.info.max_context = backend.count_tokens(ask("hi")) + 2
    try:
        run(backend, ask("hi"), GenerationParams(max_new_tokens=1, temperature=0.0))
        with pytest.raises(errors.ContextTooLong):
            run(backend, ask("hi", picture()), GenerationParams(max_new_tokens=1, temperature=0.0))
    finally:
        backend.info.max_context = limit


def test_history_images_are_read(backend: TransformersBackend) -> None:
    """Images in earlier turns stay part of the prompt."""
    turns = ask("first", picture()) + [{"role": "assistant", "content": "ok"}] + ask("and this?", picture((0, 0, 255)))
    assert backend.count_tokens(turns) - backend.count_tokens([{**m, "images": []} for m in turns]) >= 2 * IMAGE_TOKENS


def test_qwen2_vl_without_torchvision_says_what_is_missing(tmp_path: Path) -> None:
    """transformers' Qwen2-VL processor imports torchvision: without it the load fails with that hint."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    from tests.tiny_vlm import build_tiny_qwen2_vl

    b = TransformersBackend(build_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl"))
    with pytest.raises(errors.ModelLoadError) as failed:
        b.load()
    assert "torchvision" in failed.value.message
