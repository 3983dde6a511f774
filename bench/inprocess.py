"""The engines in this process: llama-cpp-python's own `Llama.generate` loop (the
reference the issue measures against) and LLMWS's llama.cpp backend called directly
(no daemon, no sockets, no session store)."""

from __future__ import annotations

import threading
import time

from bench.common import MESSAGES, MODEL, TOKENS, Run, Stream


def llama_cpp_python(concurrency: int, n_threads: int, tokens: int = TOKENS) -> Run:
    """llama-cpp-python in process. It has one context and no batching, so N concurrent
    requests run one after another (that is what its own server does with a lock)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(MODEL), n_ctx=2048, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    try:
        tokens_in = _prompt_tokens(llm)
        vocab = llm._model.vocab
        streams = []
        start = time.perf_counter()
        for _ in range(concurrency):
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


def _prompt_tokens(llm: object) -> list[int]:
    """The same chat-templated prompt the daemon builds, tokenized by llama-cpp-python."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata  # type: ignore[attr-defined]
    fmt = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>")
    text = fmt(messages=MESSAGES).prompt
    return llm.tokenize(text.encode(), add_bos=False, special=True)  # type: ignore[attr-defined,no-any-return]


class Engine:
    """LLMWS's backend, loaded once, driven from N threads as the daemon does."""

    def __init__(self, parallel: int = 8) -> None:
        from llmws_core.engine.backends.llamacpp import LlamaCppBackend

        self.backend = LlamaCppBackend(MODEL, parallel=parallel)
        self.backend.load()

    def run(self, concurrency: int, tokens: int = TOKENS) -> Run:
        from llmws_core.engine.backends.base import GenerationParams

        streams = [Stream(sent=0.0) for _ in range(concurrency)]

        def one(s: Stream) -> None:
            params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
            s.sent = time.perf_counter()
            self.backend.generate(MESSAGES, params, lambda _: s.stamps.append(time.perf_counter()), lambda: False)

        threads = [threading.Thread(target=one, args=(s,)) for s in streams]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = max(s.stamps[-1] for s in streams) - start
        return Run("LLMWS engine (in process)", concurrency, streams, wall)

    def close(self) -> None:
        self.backend.unload()
