"""KV-cache arithmetic and the context limits it gives, pinned to known architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmws_core.engine import memory
from llmws_core.engine.gguf import read_gguf
from llmws_core.engine.memory import (
    ArchInfo,
    arch_from_gguf,
    arch_from_hf_config,
    estimate,
    estimate_for_entry,
    kv_bytes_per_token,
)
from llmws_core.engine.scan import ModelDirs, embedded_entry, embedded_model_path
from tests.engine.fake_hub import gguf_bytes, tiny_gguf, tiny_hf_files

MiB = 1024 * 1024
GiB = 1024 * MiB

# meta-llama/Meta-Llama-3-8B config.json (the fields that matter).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_llama3_8b_bf16_takes_128_kib_per_token() -> None:
    """Llama-3-8B in bf16: 2 x 32 layers x 8 KV heads x 128 dims x 2 bytes = 131072 bytes per token."""
    arch = arch_from_hf_config(LLAMA3_8B)
    assert (arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.n_ctx_train) == (32, 8, 128, 8192)
    assert kv_bytes_per_token(arch, 2) == 131072


def test_hf_config_defaults_and_nested_text_config() -> None:
    """Without num_key_value_heads/head_dim the config means full attention and hidden/heads wide heads."""
    arch = arch_from_hf_config({"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768})
    assert (arch.n_kv_heads, arch.head_dim, arch.n_ctx_train) == (12, 64, None)
    # Multimodal configs (Gemma 3, Llava) keep the language model under text_config.
    nested = {"model_type": "gemma3", "text_config": {**LLAMA3_8B, "head_dim": 256}}
    assert arch_from_hf_config(nested).head_dim == 256
    with pytest.raises(ValueError):
        arch_from_hf_config({"model_type": "mystery"})


def test_embedded_smollm2_architecture_is_read_from_the_real_file() -> None:
    """The embedded SmolLM2-135M GGUF says 30 layers, 3 KV heads of 64 dims, 8192 trained context."""
    path = embedded_model_path()
    assert path is not None
    arch = arch_from_gguf(path)
    assert (arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.n_ctx_train) == (30, 3, 64, 8192)
    assert arch.n_params == 134_515_008
    assert kv_bytes_per_token(arch, 2) == 2 * 30 * 3 * 64 * 2  # 23040 bytes, f16 cache


@pytest.mark.slow
def test_our_gguf_reader_agrees_with_llama_cpps_gguf_package() -> None:
    """Our header reader and the `gguf` package read the same metadata from the real model file."""
    pytest.importorskip("gguf")
    path = embedded_model_path()
    assert path is not None
    ours, theirs = read_gguf(path), read_gguf(path, use_package=True)
    assert ours.fields == theirs.fields
    assert ours.n_params == theirs.n_params


def test_gguf_key_length_and_per_layer_kv_heads(tmp_path: Path) -> None:
    """GGUF key_length wins over embedding/heads, and per-layer KV head lists use the largest."""
    path = tmp_path / "m.gguf"
    path.write_bytes(
        gguf_bytes(
            {
                "general.architecture": "gemma2",
                "gemma2.block_count": 4,
                "gemma2.embedding_length": 2304,
                "gemma2.attention.head_count": 8,
                "gemma2.attention.head_count_kv": [4, 4, 2, 4],
                "gemma2.attention.key_length": 256,
                "gemma2.attention.value_length": 256,
                "gemma2.context_length": 8192,
            }
        )
    )
    arch = arch_from_gguf(path)
    assert (arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.v_head_dim) == (4, 4, 256, None)


def test_not_a_gguf_file_is_a_value_error(tmp_path: Path) -> None:
    """A file that is not GGUF, or is cut short, fails with ValueError rather than garbage numbers."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ValueError):
        arch_from_gguf(bad)
    bad.write_bytes(tiny_gguf()[:40])
    with pytest.raises(ValueError):
        arch_from_gguf(bad)


def test_estimate_subtracts_weights_and_overhead() -> None:
    """Context = (free x safety - overhead - weights) / KV bytes per token."""
    arch = ArchInfo(n_layers=32, n_kv_heads=8, head_dim=128, n_ctx_train=1_000_000, n_params=None)
    est = estimate(arch, 4 * GiB, free_bytes=10 * GiB, safety=0.9, overhead_bytes=256 * MiB)
    expected_available = int(10 * GiB * 0.9) - 256 * MiB - 4 * GiB
    assert est.available_bytes == expected_available
    assert est.max_context == expected_available // 131072
    assert est.kv_bytes_per_token == 131072 and est.weights_bytes == 4 * GiB
    loaded = estimate(arch, 4 * GiB, free_bytes=10 * GiB, weights_loaded=True)
    assert loaded.max_context > est.max_context  # weights already out of the free figure
    public = est.public()
    assert public["max_context"] == est.max_context and json.dumps(public)


def test_estimate_is_capped_by_trained_context_and_floored_at_zero() -> None:
    """Plenty of memory gives the trained context, too little gives 0, never a negative number."""
    arch = arch_from_hf_config(LLAMA3_8B)
    assert estimate(arch, 16 * GiB, free_bytes=80 * GiB, device="cuda:0").max_context == 8192
    starved = estimate(arch, 16 * GiB, free_bytes=8 * GiB)
    assert starved.max_context == 0 and starved.available_bytes == 0


def test_estimate_reads_free_ram_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With free_bytes=None on the CPU, the estimate uses available RAM as psutil reports it."""
    import psutil

    arch = ArchInfo(n_layers=1, n_kv_heads=1, head_dim=1, n_ctx_train=None, n_params=None)
    est = estimate(arch, 0, dtype_bytes=0.5, overhead_bytes=0, safety=1.0)
    available = psutil.virtual_memory().available
    assert abs(est.available_bytes - available) < 0.05 * available
    assert est.max_context == est.available_bytes  # one byte per token


def test_estimate_for_a_listed_gguf_and_hf_folder(tmp_path: Path) -> None:
    """A listed model gets an estimate from its header or config, weights from its size on disk."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t.gguf").write_bytes(tiny_gguf(n_ctx=2048, padding=1000))
    hf = tmp_path / "models" / "hf"
    hf.mkdir()
    for name, data in tiny_hf_files().items():
        (hf / name).write_bytes(data)
    dirs = ModelDirs(tmp_path / "models", tmp_path / "var" / "models")
    gguf_est = estimate_for_entry(dirs.resolve("t.gguf"), free_bytes=GiB)
    assert gguf_est.kv_bytes_per_token == 2 * 4 * 2 * 32 * 2
    assert gguf_est.weights_bytes == (tmp_path / "models" / "t.gguf").stat().st_size
    assert gguf_est.max_context == 2048
    hf_est = estimate_for_entry(dirs.resolve("hf"), free_bytes=GiB, weights_bytes=123)
    assert hf_est.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 and hf_est.weights_bytes == 123
    assert hf_est.n_ctx_train == 512


def test_embedded_model_fits_its_full_context_with_a_few_gib() -> None:
    """SmolLM2 needs ~184 MiB of KV cache for 8192 tokens, so 2 GiB free gives the full context."""
    entry = embedded_entry()
    assert entry is not None
    est = estimate_for_entry(entry, free_bytes=2 * GiB)
    assert est.max_context == 8192
    tight = estimate_for_entry(entry, free_bytes=512 * MiB)
    expected = (int(512 * MiB * 0.9) - 256 * MiB - est.weights_bytes) // 23040
    assert tight.max_context == expected < 8192


def test_cuda_device_without_nvml_falls_back_to_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for a GPU estimate on a machine whose GPU memory cannot be read still gives a number."""
    from llmws_core.engine import resources

    monkeypatch.setattr(resources, "nvml_free_bytes", lambda index=0: None)
    monkeypatch.setattr(resources, "torch_free_bytes", lambda index=0: None)
    assert memory.free_memory_bytes("cuda:0") > 0
