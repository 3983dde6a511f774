"""The backend interface every inference library is wrapped in.

A backend is blocking code: the chat service calls `load`, `count_tokens` and
`generate` from worker threads, never from the event loop. Tokens go back
through the per-token callback, the only streaming hook (as in gpt-fast).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..prefixes import PrefixStore

FinishReason = Literal["stop", "length", "cancelled", "error"]

#: A chat message as the OpenAI API shapes it: {"role": ..., "content": ...}.
Message = dict[str, Any]


@dataclass
class GenerationParams:
    """Sampling parameters of one request, already merged with session defaults.

    `temperature == 0` means greedy decoding, which must be deterministic.
    `seed=None` means "the backend's own randomness".
    """

    max_new_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repeat_penalty: float = 1.0
    #: Who may reuse cached KV state of this request (the session id); None: nobody.
    #: A backend's prefix cache must never serve one key's prefix to another.
    cache_key: str | None = None
    #: A GBNF grammar the reply must follow (JSON mode, forced tool calls); only
    #: honoured by backends whose `supports_grammar` is true.
    grammar: str | None = None
    #: The OpenAI `response_format` object as the client sent it (or the one a forced
    #: tool call makes): remote backends pass it on to their provider, backends whose
    #: `supports_grammar` is true follow it as a grammar when `grammar` is empty.
    response_format: dict[str, Any] | None = None
    #: Report each generated token's log-probability with this many most likely
    #: alternatives (0: the chosen token's alone); None: off. Honoured by backends whose
    #: `supports_logprobs` is true (others must refuse the request, never ignore it).
    logprobs: int | None = None
    #: Called with each generated token's `TokenLogprob` (in the backend's thread, just
    #: before that token's text goes to `on_token`) when `logprobs` is set; None: the
    #: entries are only collected into `GenerationResult.logprobs`.
    on_logprob: Callable[[TokenLogprob], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class TokenLogprob:
    """One generated token, its log-probability under the model and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    #: (token, logprob, bytes) of the most likely tokens at this step, likeliest first.
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """What a finished generation reports (the text went out through callbacks)."""

    finish_reason: FinishReason
    tokens_in: int
    tokens_out: int
    #: Every generated token's log-probability when `GenerationParams.logprobs` was set.
    logprobs: list[TokenLogprob] | None = None
    #: The stop string that ended the reply (a request's `stop` or the template's), None
    #: when it ended otherwise or the backend cannot tell (remote models).
    stop_sequence: str | None = None


@dataclass
class ModelInfo:
    """What the rest of the program knows about a loaded model."""

    name: str
    path: str
    format: str  # "gguf" | "safetensors" | "remote"
    backend: str  # "llamacpp" | "transformers" | "litellm"
    n_ctx_train: int | None = None  # the context the model was trained with
    max_context: int = 2048  # what this process can hold (memory-aware)
    size_mb: float | None = None
    parameters: int | None = None
    quantization: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    attention: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The JSON-safe view sent to clients (`welcome`, `resources`, ...)."""
        data = asdict(self)
        data.pop("extra", None)
        data.update(self.extra)
        return data


TokenCallback = Callable[[str], None]
CancelCheck = Callable[[], bool]

_burst = threading.local()


@contextmanager
def token_burst() -> Iterator[None]:
    """Mark a run of token callbacks that one decode step makes (one per sequence).

    A consumer that must wake another thread per delivery (the event loop) can
    ask `after_burst` to wake it once when the run ends, instead of at the first
    token while the step is still emitting the others: on a batched step of four
    sequences that is one loop wake-up instead of up to four."""
    pending = getattr(_burst, "pending", None)
    if pending is not None:  # nested: the outer burst flushes
        yield
        return
    _burst.pending = pending = []
    try:
        yield
    finally:
        _burst.pending = None
        for fn in pending:
            fn()


def after_burst(fn: Callable[[], None]) -> bool:
    """Call `fn` when the calling thread's current `token_burst` ends (once, however
    often it is asked). False when no burst is running: the caller acts now."""
    pending = getattr(_burst, "pending", None)
    if pending is None:
        return False
    if fn not in pending:
        pending.append(fn)
    return True


class Backend(abc.ABC):
    """One loaded model. Implementations translate library errors into `llmws_core.errors`."""

    #: The backend's name as it appears on the wire ("llamacpp", ...).
    name: str = "base"

    info: ModelInfo

    #: How many `generate` calls may run at once (from different worker threads).
    #: 1 means the chat service serializes requests (FIFO); a batching backend
    #: raises it and batches the concurrent calls internally.
    max_concurrency: int = 1

    #: Whether `GenerationParams.grammar` constrains sampling (llama.cpp's grammar sampler).
    supports_grammar: bool = False

    #: Whether `GenerationParams.logprobs` is honoured (log-probabilities from the logits).
    supports_logprobs: bool = False

    #: Whether `complete` continues raw text (no chat template): `/v1/completions`.
    supports_completion: bool = False

    #: Where a backend with a prefix cache seals evicted KV prefixes (set by the model
    #: manager before `load`); None: RAM only. See engine/prefixes.py.
    prefixes: PrefixStore | None = None

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights (blocking). Raises `ModelLoadError` with a user-safe message."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release weights and caches; the object is unusable afterwards."""

    @abc.abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Number of prompt tokens the chat template renders `messages` into."""

    @abc.abstractmethod
    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        """Generate a reply to `messages` (blocking).

        `on_token` receives text pieces that are whole UTF-8 characters, in order;
        their concatenation is the reply. `cancelled()` is polled at least once per
        decoded token; when it turns true the backend stops within one step and
        returns finish_reason "cancelled". Raises `ContextTooLong` when the prompt
        does not fit `info.max_context`.
        """

    def complete(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        """Continue `prompt` (raw text or token ids, no chat template) as `generate` does.

        Only backends whose `supports_completion` is true implement it."""
        from ... import errors

        raise errors.Unsupported(f"The {self.name} backend cannot continue raw text.")

    def count_prompt(self, prompt: str | list[int]) -> int:
        """Tokens of a raw prompt as `complete` would feed it (backends with `supports_completion`)."""
        from ... import errors

        raise errors.Unsupported(f"The {self.name} backend cannot continue raw text.")

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of plain text (`add_special`: with the BOS/special tokens the model adds)."""
        from ... import errors

        raise errors.Unsupported(f"The {self.name} backend cannot tokenize.")

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids."""
        from ... import errors

        raise errors.Unsupported(f"The {self.name} backend cannot detokenize.")

    def tokenize_text(self, text: str) -> int:
        """Token count of plain text (for limits and summaries); default: chat-render it."""
        return self.count_tokens([{"role": "user", "content": text}])
