"""GGUF vision models: the scanner pairs a model with its projector, and the llama.cpp vision path.

No multimodal GGUF small enough for the test suite exists, so the real image path
(libmtmd embedding an image) is only written here, not run: these tests cover the
pairing, the backend chosen for a paired model, the request shape handed to
llama-cpp-python, and a projector that is not one failing the load cleanly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmws_core import errors, images
from llmws_core.config import Settings
from llmws_core.engine.manager import _llamacpp
from llmws_core.engine.scan import ModelDirs, embedded_model_path, find_mmproj
from tests.engine.fake_hub import tiny_gguf

from ...tiny_vlm import png


def dirs(tmp_path: Path) -> ModelDirs:
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "var").mkdir(exist_ok=True)
    return ModelDirs(tmp_path / "models", tmp_path / "var")


def test_scanner_pairs_a_model_with_its_projector(tmp_path: Path) -> None:
    """A GGUF with one mmproj beside it is listed once, as a vision model naming its projector."""
    d = dirs(tmp_path)
    folder = tmp_path / "models" / "qwen-vl"
    folder.mkdir()
    (folder / "Qwen2-VL-2B-Instruct-Q4_K_M.gguf").write_bytes(tiny_gguf())
    (folder / "mmproj-Qwen2-VL-2B-Instruct-f16.gguf").write_bytes(tiny_gguf())
    (tmp_path / "models" / "plain.gguf").write_bytes(tiny_gguf())
    entries = {e.name: e for e in d.scan()}
    assert set(entries) == {"qwen-vl/Qwen2-VL-2B-Instruct-Q4_K_M.gguf", "plain.gguf"}
    vl = entries["qwen-vl/Qwen2-VL-2B-Instruct-Q4_K_M.gguf"]
    assert vl.vision is True and vl.mmproj is not None
    assert vl.public(False)["mmproj"] == "mmproj-Qwen2-VL-2B-Instruct-f16.gguf"
    assert vl.public(False)["vision"] is True
    assert entries["plain.gguf"].vision is False and "mmproj" not in entries["plain.gguf"].public(False)


def test_several_projectors_pair_by_name(tmp_path: Path) -> None:
    """With two models and two projectors in one folder, each model gets the projector named like it."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in [
        "gemma-3-4b-it-Q4_K_M.gguf",
        "llava-v1.6-7b-Q5_K_M.gguf",
        "mmproj-gemma-3-4b-it-f16.gguf",
        "mmproj-llava-v1.6-7b-f16.gguf",
    ]:
        (folder / name).write_bytes(tiny_gguf())
    assert find_mmproj(folder / "gemma-3-4b-it-Q4_K_M.gguf") == folder / "mmproj-gemma-3-4b-it-f16.gguf"
    assert find_mmproj(folder / "llava-v1.6-7b-Q5_K_M.gguf") == folder / "mmproj-llava-v1.6-7b-f16.gguf"


def test_a_projector_alone_is_not_a_model(tmp_path: Path) -> None:
    """A projector is never listed or loadable on its own; a projector added later is picked up."""
    d = dirs(tmp_path)
    (tmp_path / "models" / "mmproj-x-f16.gguf").write_bytes(tiny_gguf())
    assert d.scan() == []
    with pytest.raises(errors.ModelNotFound):
        d.resolve("mmproj-x-f16.gguf")
    (tmp_path / "models" / "x-Q4_K_M.gguf").write_bytes(tiny_gguf())
    assert [e.vision for e in d.scan()] == [True]


def test_projector_outside_the_folders_is_not_paired(tmp_path: Path) -> None:
    """A symlinked projector that points outside the model's folder is ignored."""
    d = dirs(tmp_path)
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(tiny_gguf())
    (tmp_path / "models" / "x-Q4_K_M.gguf").write_bytes(tiny_gguf())
    (tmp_path / "models" / "mmproj-x.gguf").symlink_to(outside)
    assert [e.vision for e in d.scan()] == [False]


def test_paired_models_get_the_vision_backend(tmp_path: Path) -> None:
    """A GGUF with a projector is served by the llama.cpp vision backend; one without, by the text one."""
    from llmws_core.engine.backends.llamacpp import LlamaCppBackend
    from llmws_core.engine.backends.llamacpp_vision import LlamaCppVisionBackend

    d = dirs(tmp_path)
    (tmp_path / "models" / "gemma-3-4b-Q4_K_M.gguf").write_bytes(tiny_gguf())
    (tmp_path / "models" / "llama-3.gguf").write_bytes(tiny_gguf())
    (tmp_path / "models" / "mmproj-gemma-3-4b-f16.gguf").write_bytes(tiny_gguf())
    entries = {e.name: e for e in d.scan()}
    vision = _llamacpp(entries["gemma-3-4b-Q4_K_M.gguf"], Settings())
    assert isinstance(vision, LlamaCppVisionBackend) and vision.info.vision is True
    assert vision.info.public()["mmproj"] == "mmproj-gemma-3-4b-f16.gguf"
    assert isinstance(_llamacpp(entries["llama-3.gguf"], Settings()), LlamaCppBackend)


def test_an_unnamed_projector_pairs_only_with_a_lone_model(tmp_path: Path) -> None:
    """`mmproj-model-f16.gguf` pairs with the only model in its folder, and with none among several."""
    lone, mixed = tmp_path / "lone", tmp_path / "mixed"
    for folder, names in ((lone, ["Some-VL-7B-Q4_K_M.gguf"]), (mixed, ["Some-VL-7B-Q4_K_M.gguf", "other-Q8_0.gguf"])):
        folder.mkdir()
        for name in [*names, "mmproj-model-f16.gguf"]:
            (folder / name).write_bytes(tiny_gguf())
    assert find_mmproj(lone / "Some-VL-7B-Q4_K_M.gguf") == lone / "mmproj-model-f16.gguf"
    assert find_mmproj(mixed / "Some-VL-7B-Q4_K_M.gguf") is None
    assert find_mmproj(mixed / "other-Q8_0.gguf") is None


def test_request_shape_for_the_multimodal_handler() -> None:
    """Messages with images become OpenAI content parts with data: URLs, images first; others stay text."""
    from llmws_core.images import openai_messages

    pic = images.check_bytes(png(), images.ImageLimits())
    out = openai_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is it?", "images": [pic]},
        ]
    )
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1]["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64," + pic["data"]}}
    assert out[1]["content"][1] == {"type": "text", "text": "What is it?"}


def test_a_bad_projector_fails_the_load_cleanly(tmp_path: Path) -> None:
    """A real model with a file that is no projector: model_load_failed, nothing left loaded."""
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from llmws_core.engine.backends.llamacpp_vision import LlamaCppVisionBackend

    model = embedded_model_path()
    if model is None:
        pytest.skip("the embedded model is not installed")
    shutil.copy(model, tmp_path / "smol.gguf")
    (tmp_path / "mmproj-smol.gguf").write_bytes(tiny_gguf())
    backend = LlamaCppVisionBackend(tmp_path / "smol.gguf", tmp_path / "mmproj-smol.gguf", n_ctx=512, n_gpu_layers=0)
    with pytest.raises(errors.ModelLoadError) as failed:
        backend.load()
    assert "projector" in failed.value.message
    with pytest.raises(errors.ModelNotLoaded):
        backend.count_tokens([{"role": "user", "content": "hi"}])
