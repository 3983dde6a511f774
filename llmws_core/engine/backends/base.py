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


@dataclass
class GenerationResult:
    """What a finished generation reports (the text went out through callbacks)."""

    finish_reason: FinishReason
    tokens_in: int
    tokens_out: int


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
    #: Whether the model reads images in user messages (a message's `images`).
    vision: bool = False
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

    def tokenize_text(self, text: str) -> int:
        """Token count of plain text (for limits and summaries); default: chat-render it."""
        return self.count_tokens([{"role": "user", "content": text}])
