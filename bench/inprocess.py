"""The engines underneath, without the daemon: llama-cpp-python's own `Llama.generate`
loop (the reference the issue measures against) and LLMWS's llama.cpp backend called
directly (no daemon, no sockets, no session store).

Each runs in a child process of its own (`Isolated`). Both drive llama.cpp through
libgomp, and libgomp counts the OpenMP threads of every thread that ever started a
parallel region in a process: once two threads have (llama-cpp-python decodes in the
caller's thread, LLMWS in its scheduler thread) there are more OpenMP threads than
cores, libgomp stops spinning at barriers, and llama.cpp (hundreds of barriers per
token) decodes up to 2x slower in BOTH. In one process the two would slow each other
down; in the daemon only the scheduler thread ever decodes.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.common import MODEL, TOKENS, Run, Stream, messages_for


def llama_cpp_python(concurrency: int, n_threads: int, tokens: int = TOKENS, first: int | None = None) -> Run:
    """llama-cpp-python in process. It has one context and no batching, so N concurrent
    requests run one after another (that is what its own server does with a lock)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(MODEL), n_ctx=2048, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    try:
        vocab = llm._model.vocab
        streams = []
        start = time.perf_counter()
        for i in range(concurrency):
            tokens_in = _prompt_tokens(llm, messages_for(None if first is None else first + i))
            s = Stream(sent=start)
            for tok in llm.generate(tokens_in, temp=0.0, top_k=1, reset=True):
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    break
                llm.detokenize([tok])
                s.stamps.append(time.perf_counter())
                if s.n >= tokens:
                    break
            streams.append(s)
        return Run("llama-cpp-python (in process)", concurrency, streams, time.perf_counter() - start)
    finally:
        llm.close()


def _prompt_tokens(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The same chat-templated prompt the daemon builds, tokenized by llama-cpp-python."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    fmt = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    text = fmt(messages=messages).prompt
    return llm.tokenize(text.encode(), add_bos=False, special=True)  # type: ignore[no-any-return]


class Engine:
    """LLMWS's backend, loaded once, driven from N threads as the daemon does."""

    def __init__(self, parallel: int = 8) -> None:
        from llmws_core.engine.backends.llamacpp import LlamaCppBackend

        self.backend = LlamaCppBackend(MODEL, parallel=parallel)
        self.backend.load()

    def run(self, concurrency: int, tokens: int = TOKENS, first: int | None = None) -> Run:
        from llmws_core.engine.backends.base import GenerationParams

        streams = [Stream(sent=0.0) for _ in range(concurrency)]

        def one(i: int, s: Stream) -> None:
            params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
            s.sent = time.perf_counter()
            messages = messages_for(None if first is None else first + i)
            self.backend.generate(messages, params, lambda _: s.stamps.append(time.perf_counter()), lambda: False)

        threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(s.stamps[-1] for s in streams) - start
        return Run("LLMWS engine (in process)", concurrency, streams, wall)

    def close(self) -> None:
        self.backend.unload()


_ENGINE: Engine | None = None


def _load_engine(parallel: int) -> None:
    global _ENGINE
    _ENGINE = Engine(parallel)


def _engine_run(concurrency: int, tokens: int, first: int | None) -> Run:
    assert _ENGINE is not None
    return _ENGINE.run(concurrency, tokens, first)


def _engine_threads() -> int:
    assert _ENGINE is not None
    return int(_ENGINE.backend.info.extra["n_threads"])


class Isolated:
    """One contender in a child process of its own (see the module docstring)."""

    def __init__(self, engine_slots: int | None = None) -> None:
        """engine_slots: load LLMWS's engine with this many slots in the child; None:
        the child only runs llama-cpp-python."""
        ctx = multiprocessing.get_context("spawn")
        init, args = (_load_engine, (engine_slots,)) if engine_slots else (None, ())
        self._pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=init, initargs=args)

    def engine(self, concurrency: int, tokens: int = TOKENS, first: int | None = None) -> Run:
        return self._pool.submit(_engine_run, concurrency, tokens, first).result()

    def engine_threads(self) -> int:
        return self._pool.submit(_engine_threads).result()

    def llama_cpp_python(self, concurrency: int, n_threads: int, tokens: int = TOKENS, first: int | None = None) -> Run:
        return self._pool.submit(llama_cpp_python, concurrency, n_threads, tokens, first).result()

    def close(self) -> None:
        self._pool.shutdown()
