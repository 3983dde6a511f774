"""Remote models from config, and the LiteLLM Router that spreads them over upstreams.

A remote model is a line in `remote_models` (a name for clients, a LiteLLM model
string, an optional base URL and the *name* of the environment variable holding
its key). Nothing here reads a key or imports LiteLLM: listing models must stay
cheap and must work on machines without the optional `litellm` extra. The Router
is built on first use, once per daemon, because its cooldown and retry state is
what makes fail-over work: one Router per request would forget that an upstream
just failed.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors
from ..config import RemoteModel, Settings
from .scan import ModelEntry

logger = logging.getLogger("llmws.engine.remote")

#: The prefix of a remote model's `path` in `list_models` (it is not a file).
REMOTE_PREFIX = "remote/"
#: A remote model whose `model` starts with this goes through the Router's model group.
ROUTER_PREFIX = "router/"

#: The `router` config keys passed to `litellm.Router`; anything else is refused at
#: start, so a typo does not silently drop a retry or fallback policy.
ROUTER_KEYS = frozenset(
    {
        "model_list",
        "routing_strategy",
        "routing_strategy_args",
        "num_retries",
        "max_fallbacks",
        "fallbacks",
        "context_window_fallbacks",
        "default_fallbacks",
        "allowed_fails",
        "cooldown_time",
        "disable_cooldowns",
        "retry_after",
        "timeout",
        "stream_timeout",
        "enable_pre_call_checks",
    }
)


def import_litellm() -> Any:
    """Import LiteLLM without letting it reach the internet at import time.

    LiteLLM fetches its model cost map from GitHub on import unless
    `LITELLM_LOCAL_MODEL_COST_MAP` is true; the copy bundled with the package is
    enough for context sizes. The user may still override it in the environment.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise errors.ModelLoadError(
            "Remote models need LiteLLM: install the 'litellm' extra (pip install 'llmws[litellm]')."
        ) from None
    # Token counting for llama-family names would download a tokenizer from the
    # Hugging Face hub; LLMWS never downloads at run time, and tiktoken's
    # cl100k is a close enough count for limits and warnings.
    litellm.disable_hf_tokenizer_download = True
    # LiteLLM logs every call and every retry at INFO; the daemon's INFO log is for
    # LLMWS's own story (failures still show as warnings).
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its error path prints "Give Feedback / Get Help" banners to stdout; we log instead.
    litellm.suppress_debug_info = True
    return litellm


@dataclass
class RemoteEntry(ModelEntry):
    """A `ModelEntry` for a remote model: no file, served by the `litellm` backend."""

    remote: RemoteModel | None = None
    registry: RemoteModels | None = field(default=None, repr=False, compare=False)

    def public(self, loaded: bool, max_context: int | None = None) -> dict[str, Any]:
        """The `models_list` entry: the configured name and LiteLLM model, never a base URL or key."""
        assert self.remote is not None
        data: dict[str, Any] = {
            "name": self.name,
            "path": self.rel_path,
            "format": "remote",
            "backend": "litellm",
            "size_mb": None,
            "source": "remote",
            "loaded": loaded,
            "kind": "chat",
            "remote_model": self.remote.model,
            "vision": self.remote.vision,
        }
        ctx = max_context or self.remote.max_context
        if ctx is not None:
            data["max_context"] = ctx
        return data


class RemoteModels:
    """The configured remote models and the (lazily built) Router over the `router` section."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_name = {rm.name: rm for rm in settings.remote_models}
        self._router: Any = None
        self._router_lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def entry(self, rm: RemoteModel) -> RemoteEntry:
        return RemoteEntry(
            name=rm.name,
            path=Path(REMOTE_PREFIX + rm.name),
            rel_path=REMOTE_PREFIX + rm.name,
            format="remote",  # type: ignore[arg-type]  # not a file format; see RemoteEntry
            backend="litellm",
            size_mb=0.0,
            source="remote",  # type: ignore[arg-type]
            remote=rm,
            registry=self,
            vision=rm.vision,
        )

    def entries(self) -> list[RemoteEntry]:
        return [self.entry(rm) for rm in self._by_name.values()]

    def find(self, name: str | None) -> RemoteEntry | None:
        """The remote model called `name` or `remote/<name>`, or None."""
        if not name:
            return None
        key = name[len(REMOTE_PREFIX) :] if name.startswith(REMOTE_PREFIX) else name
        rm = self._by_name.get(key)
        return self.entry(rm) if rm is not None else None

    # ------------------------------------------------------------------ router

    def router(self) -> Any:
        """The shared `litellm.Router` (built on first call, from a worker thread)."""
        with self._router_lock:
            if self._router is None:
                self._router = build_router(self.settings.router)
            return self._router

    def group_models(self, group: str) -> list[str]:
        """The LiteLLM model strings of a Router model group's deployments (for token counts)."""
        out = []
        for dep in (self.settings.router or {}).get("model_list") or []:
            if isinstance(dep, dict) and dep.get("model_name") == group:
                model = (dep.get("litellm_params") or {}).get("model")
                if isinstance(model, str):
                    out.append(model)
        return out

    def group_max_context(self, group: str) -> int | None:
        """The smallest `model_info.max_input_tokens` a deployment of `group` declares."""
        limits = []
        for dep in (self.settings.router or {}).get("model_list") or []:
            if isinstance(dep, dict) and dep.get("model_name") == group:
                value = (dep.get("model_info") or {}).get("max_input_tokens")
                if isinstance(value, int) and value > 0:
                    limits.append(value)
        return min(limits) if limits else None


def build_router(config: dict[str, Any] | None) -> Any:
    """A `litellm.Router` from the `router` config section.

    Raises:
        ModelLoadError: no `router` section, an unknown key, or LiteLLM refused it
            (the real reason is logged; the message names only the section).
    """
    if not config or not config.get("model_list"):
        raise errors.ModelLoadError("A remote model uses 'router/...' but the config has no router.model_list.")
    unknown = sorted(set(config) - ROUTER_KEYS)
    if unknown:
        raise errors.ModelLoadError(
            f"Unknown router setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(ROUTER_KEYS))}."
        )
    litellm = import_litellm()
    try:
        # A deep copy: the Router pops keys out of the deployments it is given.
        router = litellm.Router(**copy.deepcopy(config))
    except Exception as exc:
        logger.error("building the LiteLLM router failed", exc_info=exc)
        raise errors.ModelLoadError("The router section of the config was refused; see the server log.") from None
    groups = sorted({d.get("model_name") for d in config["model_list"] if isinstance(d, dict)} - {None})
    logger.info("LiteLLM router ready: %d deployment(s) in group(s) %s", len(config["model_list"]), ", ".join(groups))
    return router
