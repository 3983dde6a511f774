"""GPU check: run on a CUDA machine to verify what CPU-only CI cannot.

    python bench/gpu_check.py [--model PATH] [--fill 4096] [--out results/gpu_check.md]

1. Device policy: bf16 on compute capability >= 8.0 (fp16 before), FlashAttention 2
   where installed and supported, SDPA otherwise -- as chosen by `engine.device`.
2. Memory arithmetic: loads a model with the transformers backend, fills the KV
   cache with a long prompt and compares the growth NVML reports with the estimate
   (2 x layers x kv_heads x head_dim x dtype bytes per token).
3. A 4-bit (bitsandbytes NF4) load, when bitsandbytes is installed.
4. Decode tokens/s single stream and with 8 concurrent requests (continuous batching).

The default model is the embedded SmolLM2 GGUF, dequantized through transformers'
GGUF support (no download needed). Prints a markdown table; exits 0 with a note on
a machine without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmws_core.engine import device as devpolicy  # noqa: E402
from llmws_core.engine.backends.base import GenerationParams  # noqa: E402
from llmws_core.engine.memory import ArchInfo, kv_bytes_per_token  # noqa: E402
from llmws_core.engine.resources import gpus  # noqa: E402
from llmws_core.engine.scan import embedded_model_path  # noqa: E402


def nvml_used_mb(index: int = 0) -> float | None:
    info = gpus()
    return info[index]["memory_used_mb"] if len(info) > index else None


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, top_p=1.0, top_k=0)


def run_one(backend, prompt: str, n: int) -> tuple[int, float]:
    stamps: list[float] = []
    result = backend.generate(
        [{"role": "user", "content": prompt}], greedy(n), lambda t: stamps.append(time.perf_counter()), lambda: False
    )
    if len(stamps) < 2:
        return result.tokens_out, 0.0
    return result.tokens_out, (result.tokens_out - 1) / (stamps[-1] - stamps[0])


def run_concurrent(backend, prompt: str, n: int, k: int) -> float:
    totals = [0] * k

    def worker(i: int) -> None:
        totals[i] = backend.generate(
            [{"role": "user", "content": f"{prompt} ({i})"}], greedy(n), lambda t: None, lambda: False
        ).tokens_out

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--fill", type=int, default=4096, help="prompt tokens used to fill the KV cache")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()

    caps = devpolicy.probe()
    rows: list[tuple[str, str]] = []
    if not caps.cuda:
        print("No CUDA device: nothing to check here (the CPU paths are covered by the test suite).")
        return 0
    dtype = devpolicy.choose_dtype("auto", caps)
    attention = devpolicy.choose_attention("auto", caps, dtype)
    rows += [
        (
            "GPU",
            f"{caps.device_name} (sm_{caps.compute_capability[0]}{caps.compute_capability[1]})"
            if caps.compute_capability
            else str(caps.device_name),
        ),
        ("dtype chosen", dtype),
        ("attention chosen", attention),
        (
            "expected",
            ("bfloat16" if caps.compute_capability and caps.compute_capability >= (8, 0) else "float16")
            + " / "
            + ("flash_attention_2" if caps.flash_attn else "sdpa"),
        ),
    ]

    from llmws_core.engine.backends.transformers import TransformersBackend

    path = Path(args.model) if args.model else embedded_model_path()
    if path is None:
        print("no model given and the embedded model is not installed")
        return 2
    before = nvml_used_mb()
    backend = TransformersBackend(path, max_batch=8, max_context=args.fill + args.tokens + 64)
    backend.load()
    loaded = nvml_used_mb()
    info = backend.info
    rows.append(("model", f"{info.name} ({info.dtype}, {info.attention}, {info.device})"))
    rows.append(
        ("weights on GPU (NVML)", f"{loaded - before:.0f} MB" if before is not None and loaded is not None else "n/a")
    )

    cfg = backend.model_config_dict() if hasattr(backend, "model_config_dict") else None
    arch = None
    if cfg is None:
        model = getattr(backend, "_model", None) or getattr(backend, "model", None)
        if model is not None:
            c = model.config
            heads = c.num_attention_heads
            arch = ArchInfo(
                c.num_hidden_layers,
                getattr(c, "num_key_value_heads", heads) or heads,
                getattr(c, "head_dim", None) or c.hidden_size // heads,
            )
    if arch is not None:
        est = kv_bytes_per_token(arch, devpolicy.DTYPE_BYTES[dtype])
        prompt = "word " * args.fill
        pre = nvml_used_mb()
        n, _ = run_one(backend, prompt, 8)
        post = nvml_used_mb()
        tokens = backend.count_tokens([{"role": "user", "content": prompt}]) + n
        measured = (post - pre) * 2**20 / tokens if pre is not None and post is not None else float("nan")
        rows.append(("KV bytes/token estimated", f"{est}"))
        rows.append(
            (
                "KV bytes/token measured (NVML growth / tokens)",
                f"{measured:.0f} (allocator caching can hide or inflate growth)",
            )
        )

    _, rate1 = run_one(backend, "Write a long story about a lighthouse.", args.tokens)
    rows.append(("decode tok/s, 1 stream", f"{rate1:.1f}"))
    agg = run_concurrent(backend, "Write a long story about a lighthouse.", args.tokens, 8)
    rows.append(("aggregate tok/s, 8 concurrent", f"{agg:.1f} ({agg / rate1:.2f}x)" if rate1 else f"{agg:.1f}"))
    backend.unload()

    if caps.bitsandbytes:
        try:
            q = TransformersBackend(path, quantization="4bit", max_batch=1)
            q.load()
            _, rate_q = run_one(q, "Say hello.", 32)
            rows.append(("4-bit NF4 load", f"ok, {rate_q:.1f} tok/s, {q.info.quantization}"))
            q.unload()
        except Exception as exc:  # report, don't hide
            rows.append(("4-bit NF4 load", f"FAILED: {type(exc).__name__}"))
    else:
        rows.append(("4-bit NF4 load", "bitsandbytes not installed"))

    table = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
