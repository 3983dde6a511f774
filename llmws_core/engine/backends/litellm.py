"""The LiteLLM backend: remote providers and OpenAI-compatible clusters (vLLM, TGI, SGLang).

Everything a call needs -- the key, the base URL, Helicone's headers -- is passed
*per call*, never set on LiteLLM's module globals: the daemon serves many sessions
at once from worker threads, and two requests with different keys must not see
each other's. The key is read from the environment variable the config names at
every call, so a rotated key applies without a restart.

`generate` is blocking like every backend's: it iterates LiteLLM's synchronous
stream in the worker thread, and a cancelled request closes the upstream HTTP
response, so a remote engine stops generating too (vLLM aborts a request whose
client went away). Remote engines batch on their own, so many calls may run at
once (`max_concurrency`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ... import errors
from ...config import RemoteModel
from ...images import openai_messages
from ..remote import REMOTE_PREFIX, ROUTER_PREFIX, import_litellm
from .base import (
    Backend,
    CancelCheck,
    FinishReason,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)

logger = logging.getLogger("llmws.engine.litellm")

#: The context assumed when neither the config nor LiteLLM's model data knows it.
DEFAULT_CONTEXT = 8192
#: Concurrent requests one remote model accepts from this daemon (the engine batches them).
REMOTE_CONCURRENCY = 16
#: The key sent to a self-hosted upstream that has no `api_key_env` (vLLM without --api-key ignores it).
NO_KEY = "no-key"
#: Helicone's proxy for OpenAI-type models (the "first REST server" used it this way).
HELICONE_OPENAI_BASE = "https://oai.helicone.ai/v1"
#: Providers whose API is OpenAI's, so Helicone's OpenAI proxy can stand in for their base URL.
OPENAI_TYPE_PROVIDERS = ("openai/", "gpt-", "o1", "o3", "o4")


def helicone_call_settings(
    model: str,
    api_base: str | None,
    session_id: str | None,
    env: Mapping[str, str],
) -> tuple[str | None, dict[str, str]]:
    """(api_base, extra_headers) for one call, with Helicone tracking when `HELICONE_API_KEY` is set.

    An OpenAI-type model without its own `api_base` goes through Helicone's gateway
    (`HELICONE_BASE_URL`, default https://oai.helicone.ai/v1). A model with its own
    `api_base` (a vLLM cluster, a self-hosted Helicone) keeps it and still carries
    the headers. `Helicone-Session-Id` is the LLMWS session id, as the first REST
    server sent it; stateless requests have none.
    """
    key = env.get("HELICONE_API_KEY")
    if not key:
        return api_base, {}
    headers = {"Helicone-Auth": f"Bearer {key}"}
    if session_id:
        headers["Helicone-Session-Id"] = session_id
    if api_base is None and model.startswith(OPENAI_TYPE_PROVIDERS):
        api_base = env.get("HELICONE_BASE_URL") or HELICONE_OPENAI_BASE
    return api_base, headers


def translate_error(
    exc: BaseException, model_name: str, *, tokens_in: int = 0, max_context: int = 0
) -> errors.LLMWSError:
    """Map a LiteLLM (or OpenAI SDK) exception to the project's own error, with a safe message.

    The real exception is logged by the caller; provider messages can echo keys,
    URLs or prompt text, so none of their text reaches the peer.
    """
    if isinstance(exc, errors.LLMWSError):
        return exc
    import litellm.exceptions as lx  # only reached after a LiteLLM call, so it is importable

    what = f"The remote model '{model_name}'"
    # LiteLLM's class is not always the status's (a 401 on a custom base URL can come
    # back as BadRequestError), so the HTTP status decides where there is one.
    status = getattr(exc, "status_code", None)
    if isinstance(exc, lx.ContextWindowExceededError):
        return errors.ContextTooLong(tokens_in, max_context)
    if isinstance(exc, lx.ContentPolicyViolationError):
        return errors.BadRequest(f"{what} refused the request under its provider's content policy.")
    if status in (401, 403) or isinstance(exc, (lx.AuthenticationError, lx.PermissionDeniedError)):
        return errors.GenerationError(
            f"{what} rejected this server's credentials; check the API key it is configured with.",
            reason="upstream_auth",
        )
    if (
        status == 429
        or isinstance(exc, lx.RateLimitError)
        or type(exc).__name__ in ("RouterRateLimitError", "BudgetExceededError")
    ):
        return errors.Busy(f"{what} is rate-limited or all its upstreams are cooling down; try again shortly.")
    if status == 404 or isinstance(exc, lx.NotFoundError):
        return errors.ModelNotFound(f"{what}'s provider does not know the configured model.")
    if isinstance(exc, (lx.BadRequestError, lx.UnprocessableEntityError)):
        return errors.BadRequest(f"{what} refused the request as invalid.")
    if isinstance(exc, lx.Timeout):
        return errors.GenerationError(f"{what} timed out.", reason="upstream_timeout")
    if isinstance(
        exc,
        (lx.APIConnectionError, lx.ServiceUnavailableError, lx.BadGatewayError, lx.InternalServerError, lx.APIError),
    ):
        return errors.GenerationError(f"{what} could not be reached or failed.", reason="upstream_unavailable")
    return errors.GenerationError(f"{what} failed.")


def _close_stream(stream: Any) -> None:
    """Close a LiteLLM stream and the HTTP response under it (LiteLLM has no sync close).

    A plain `CustomStreamWrapper` holds the provider stream (`openai.Stream`, whose
    `close()` closes the response) in `completion_stream`; the Router's wrapper holds
    a generator that iterates the first wrapper, reachable through its frame.
    """
    seen: set[int] = set()

    def close(obj: Any) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        frame = getattr(obj, "gi_frame", None)
        if frame is not None:
            close(frame.f_locals.get("model_response"))
        close(getattr(obj, "_sync_generator", None))
        close(getattr(obj, "completion_stream", None))
        fn = getattr(obj, "close", None)
        if callable(fn):
            try:
                fn()
            except Exception:  # closing is best effort; the request is over either way
                logger.debug("closing an upstream stream failed", exc_info=True)

    close(stream)


class LiteLLMBackend(Backend):
    """A remote model reached through LiteLLM, directly or through the shared Router.

    Args:
        remote: the `remote_models` entry.
        router: returns the shared `litellm.Router`; needed when `remote.model` is
            `router/<group>`. None: no router is configured.
        group_models: LiteLLM model strings of the router group's deployments (for
            token counting and context data); None: none known.
        group_max_context: the smallest context a router deployment declares; None: unknown.
        env: where keys are read (None: `os.environ`, read at every call).
    """

    name = "litellm"
    max_concurrency = REMOTE_CONCURRENCY

    def __init__(
        self,
        remote: RemoteModel,
        *,
        router: Callable[[], Any] | None = None,
        group_models: Sequence[str] = (),
        group_max_context: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.remote = remote
        self._router_factory = router
        self._router: Any = None
        self._env = env
        self.group = remote.model[len(ROUTER_PREFIX) :] if remote.model.startswith(ROUTER_PREFIX) else None
        # The model LiteLLM's data and tokenizer are looked up with.
        self.data_model = (list(group_models) or [remote.model])[0] if self.group else remote.model
        self._group_max_context = group_max_context
        self._litellm: Any = None
        self.info = ModelInfo(
            name=remote.name,
            path=REMOTE_PREFIX + remote.name,
            format="remote",
            backend=self.name,
            max_context=remote.max_context or DEFAULT_CONTEXT,
            device="remote",
            vision=remote.vision,
            extra={"remote_model": remote.model},
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    def load(self) -> None:
        """Import LiteLLM, build the Router if needed and settle the context limit (no network)."""
        self._litellm = import_litellm()
        if self.group is not None:
            if self._router_factory is None:
                raise errors.ModelLoadError(f"Remote model '{self.remote.name}' uses a router, but none is configured.")
            self._router = self._router_factory()
        elif self.remote.api_key_env and not self.env.get(self.remote.api_key_env):
            # Naming the variable is safe; its value never leaves the process.
            raise errors.ModelLoadError(
                f"Remote model '{self.remote.name}' needs the environment variable {self.remote.api_key_env}, which is not set."
            )
        self.info.max_context = self._context_limit()
        self.info.n_ctx_train = self.info.max_context
        logger.info(
            "remote model %s (%s) ready, context %d", self.remote.name, self.remote.model, self.info.max_context
        )

    def _context_limit(self) -> int:
        """The config's `max_context`, else the router's `model_info`, else LiteLLM's model data, else 8192."""
        if self.remote.max_context:
            return self.remote.max_context
        if self._group_max_context:
            return self._group_max_context
        try:
            data = self._litellm.get_model_info(self.data_model)
        except Exception:  # unknown to LiteLLM's map (a self-hosted model): the documented fallback
            logger.info(
                "LiteLLM has no context data for %s; assuming %d (set max_context)", self.data_model, DEFAULT_CONTEXT
            )
            return DEFAULT_CONTEXT
        value = data.get("max_input_tokens") or data.get("max_tokens")
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT

    def unload(self) -> None:
        self._router = None

    # ------------------------------------------------------------------ tokens

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """LiteLLM's count for the model (tiktoken cl100k where it has no tokenizer of its own)."""
        litellm = self._litellm or import_litellm()
        try:
            return int(litellm.token_counter(model=self.data_model, messages=openai_messages(messages)))
        except Exception:
            logger.warning("token counting failed for %s; estimating from characters", self.data_model, exc_info=True)
            chars = sum(len(str(m.get("content") or "")) for m in messages)
            return chars // 4 + 4 * len(messages)

    # ------------------------------------------------------------------ generation

    def call_kwargs(self, messages: Sequence[Message], params: GenerationParams) -> dict[str, Any]:
        """The keyword arguments of one `completion` call, credentials included (per call)."""
        kwargs: dict[str, Any] = {
            "messages": openai_messages(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # Providers that lack a parameter (seed, stream_options) drop it instead of failing.
            "drop_params": True,
        }
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.response_format:
            kwargs["response_format"] = params.response_format
        if self.group is not None:
            kwargs["model"] = self.group
            _, headers = helicone_call_settings("", None, params.cache_key, self.env)
        else:
            kwargs["model"] = self.remote.model
            # A direct model gets no hidden retries: a failure shows at once, and
            # retrying and failing over is what the router section is for.
            kwargs["num_retries"] = 0
            kwargs["max_retries"] = 0
            api_base, headers = helicone_call_settings(
                self.remote.model, self.remote.api_base, params.cache_key, self.env
            )
            if api_base:
                kwargs["api_base"] = api_base
            if self.remote.api_key_env:
                kwargs["api_key"] = self.env.get(self.remote.api_key_env)
            elif self.remote.api_base:
                # A self-hosted server without a key setting: send a placeholder, so
                # LiteLLM never falls back to OPENAI_API_KEY and hands a real provider
                # key to whatever server `api_base` names.
                kwargs["api_key"] = NO_KEY
        if headers:
            kwargs["extra_headers"] = headers
        return kwargs

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        litellm = self._litellm or import_litellm()
        kwargs = self.call_kwargs(messages, params)
        tokens_in = 0
        pieces = 0
        usage_out: int | None = None
        finish: FinishReason = "stop"
        stream: Any = None
        try:
            if cancelled():
                return GenerationResult("cancelled", 0, 0)
            call = self._router.completion if self.group is not None else litellm.completion
            stream = call(**kwargs)
            for chunk in stream:
                if cancelled():
                    return GenerationResult("cancelled", tokens_in, usage_out or pieces)
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0) or tokens_in
                    usage_out = int(getattr(usage, "completion_tokens", 0) or 0) or usage_out
                for choice in getattr(chunk, "choices", None) or []:
                    text = getattr(choice.delta, "content", None) if getattr(choice, "delta", None) else None
                    if text:
                        pieces += 1
                        on_token(text)
                    if getattr(choice, "finish_reason", None):
                        finish = "length" if choice.finish_reason == "length" else "stop"
        except errors.LLMWSError:
            raise
        except Exception as exc:
            logger.warning("remote model %s failed: %s: %s", self.remote.name, type(exc).__name__, exc)
            n_in = tokens_in
            if type(exc).__name__ == "ContextWindowExceededError":
                n_in = self.count_tokens(messages)
            raise translate_error(exc, self.remote.name, tokens_in=n_in, max_context=self.info.max_context) from None
        finally:
            if stream is not None:
                _close_stream(stream)
        if not tokens_in:
            tokens_in = self.count_tokens(messages)
        return GenerationResult(finish, tokens_in, usage_out or pieces)
