"""Settings: one loader for config.json, LLMWS_* environment variables and CLI flags.

Precedence: built-in defaults < the config file (may be partial; merged over the
defaults) < environment < command-line flags. Every field has a description,
from which `--help` and DOCUMENTATION.md's configuration table are generated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the WebSocket daemon and the HTTP adapter bind to.")
    port: int = Field(8765, ge=0, le=65535, description="WebSocket port (0 picks a free one).")
    http_port: int | None = Field(
        8001, ge=0, le=65535, description="HTTP/SSE adapter port (0 picks a free one; null disables the adapter)."
    )
    ollama_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve the HTTP adapter on this port, e.g. 11434 (Ollama's), so apps with a hard-coded Ollama address work; null: off.",
    )
    ready_file: str | None = Field(
        None, description="When set, a JSON file {ws_port, http_port, pid} is written here once both servers listen."
    )
    log_level: str = Field("INFO", description="Logging level (DEBUG, INFO, WARNING, ERROR).")
    drain_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long running generations may continue before they are cancelled."
    )


class PathSettings(_Section):
    var_dir: str = Field(
        "var",
        description="Runtime data: sessions/, keys/, models/ (downloads), logs/. Relative paths are relative to the working directory.",
    )
    models_dir: str = Field("models", description="The user's own models folder.")


class ModelSettings(_Section):
    path: str | None = Field(
        None,
        description="Model to load at start (a name from list_models, or a path inside the model folders). null: auto-select (one model found: it; several: prefer models/; none: the embedded SmolLM2).",
    )
    embedding_path: str | None = Field(
        None,
        description="Embedding model served when a request names none (or a name that is no local model): a name from list_models. null: the first embedding model in models/ (then var/models/), else the embedded all-MiniLM-L6-v2.",
    )
    n_ctx: int | None = Field(
        None,
        ge=256,
        description="llama.cpp context size; null: the memory-aware estimate, capped by the model's trained context and `max_context_cap`.",
    )
    max_context_cap: int = Field(
        8192,
        ge=256,
        description="Upper bound on the context the daemon allocates when `n_ctx` is null (KV memory grows with it).",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        description='CPU threads for llama.cpp; null: the number of physical cores, lowered to half while other programs keep the cores busy (decode step times decide, see Benchmarks, "On a busy machine"). A number is used as given.',
    )
    n_gpu_layers: int = Field(
        -1, description="Layers offloaded to the GPU by llama.cpp (-1: all, when built with GPU support)."
    )
    n_batch: int = Field(512, ge=1, description="llama.cpp prompt-processing batch size.")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None, description="transformers backend: bitsandbytes quantization (CUDA only)."
    )
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto",
        description="transformers backend: attention implementation; auto picks FlashAttention 2 where installed and supported, else SDPA.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="transformers backend: weights dtype; auto is bf16 on CUDA compute capability >= 8.0, fp16 on older CUDA, fp32 on CPU.",
    )
    compile: bool = Field(False, description="transformers backend: torch.compile the decode step (warm-up at load).")
    trust_remote_code: bool = Field(
        False,
        description="transformers backend: allow a model folder's own Python code. Only settable here, never from a message.",
    )
    max_batch: int = Field(
        8,
        ge=1,
        le=64,
        description="Concurrent sequences decoded together (llama.cpp slots, transformers batch). Each llama.cpp slot reserves its own context of KV memory.",
    )
    prefix_cache_disk_mb: int = Field(
        2048,
        ge=0,
        description="llama.cpp backend: disk space for sealed KV prefixes (var/prefixes/) of sessions whose slot was given to another session, of the model's slots at shutdown and of /restore_cache, so their next turn skips the prefill after an eviction or a restart. 0: RAM only.",
    )
    allow_delete_from_models: bool = Field(
        False,
        description="Whether delete_model may remove files from models/ (downloads in var/models/ are always deletable).",
    )


class GenerationDefaults(_Section):
    max_new_tokens: int = Field(2048, ge=1, description="Default cap on generated tokens per reply.")
    temperature: float = Field(0.7, ge=0, le=5, description="Sampling temperature; 0 is greedy and deterministic.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(50, ge=0, description="Top-k sampling (0 disables).")
    repeat_penalty: float = Field(1.0, gt=0, description="Repetition penalty (1.0 disables).")
    system: str | None = Field(None, description="Default system prompt for new sessions.")


class SessionSettings(_Section):
    ttl_seconds: float = Field(7 * 24 * 3600, gt=0, description="Idle sessions older than this are deleted.")
    fsync_interval: float = Field(
        0.25, gt=0, description="Seconds between batched fsyncs of session buffers (also fsynced at every `done`)."
    )
    persist: bool = Field(
        True,
        description="Benchmark-only switch: false neither seals nor writes events (replay buffers live in memory; conversation state is still saved). Never turn it off for real use.",
    )
    max_history_messages: int = Field(
        200, ge=2, description="Messages kept in a session's history before the oldest turns are dropped."
    )
    max_open_buffers: int = Field(
        256,
        ge=1,
        description="Session buffer files kept open at once (least recently written closed first; also closed after 30 s without a write). Capped to an eighth of the process's open-file limit.",
    )


class LimitSettings(_Section):
    max_frame_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest WebSocket frame accepted (a prompt filling the largest context fits).",
    )
    max_connections: int = Field(2000, ge=1, description="Concurrent WebSocket connections per daemon.")
    max_connections_per_ip: int = Field(1000, ge=1, description="Concurrent WebSocket connections per client address.")
    max_queued_per_session: int = Field(
        4, ge=1, description="Inference requests a session may have waiting or running."
    )
    max_queue: int = Field(256, ge=1, description="Inference requests waiting for the model across all sessions.")
    max_requests_per_client: int = Field(
        32,
        ge=1,
        description="Generations one client (its address and API key together) may have waiting or running, over all its sessions and both doors; beyond it: busy / HTTP 429.",
    )
    messages_per_second: float = Field(200.0, gt=0, description="Sustained message rate per connection (burst of 2x).")
    handshake_timeout: float = Field(10.0, gt=0, description="Seconds a client has to send its first frame.")
    max_http_connections: int = Field(
        1000,
        ge=1,
        description="Concurrent HTTP connections; one more is closed at once. With `max_connections`, capped to fit the process's open-file limit (see the threat model).",
    )
    http_header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an HTTP connection may take to send a request's headers (from connecting, or from the end of the previous response); then it is closed.",
    )
    http_keepalive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive HTTP connection stays open."
    )
    max_downloads: int = Field(2, ge=1, description="Concurrent model downloads.")
    min_free_disk_mb: int = Field(1024, ge=0, description="Downloads refuse to start with less free disk than this.")
    max_download_mb: int | None = Field(
        200_000, ge=1, description="A download larger than this fails (null: only free disk limits it)."
    )
    max_images_per_request: int = Field(
        8,
        ge=0,
        le=64,
        description="Images one prompt may carry (WebSocket `prompt.images`, image parts of an HTTP request); 0 refuses images.",
    )
    max_image_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Largest image accepted, in bytes of the encoded file (a WebSocket frame must also fit `max_frame_bytes`).",
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1024,
        description="Largest image accepted, in pixels (width x height), so a small file cannot decode into a huge bitmap.",
    )


#: Shortest API key accepted.
MIN_KEY_LENGTH = 16


class SecuritySettings(_Section):
    api_keys: list[str] = Field(
        default_factory=list,
        description="User keys (X-API-Key header, Bearer token, api_key in the handshake, or x_api_key query). Also from LLMWS_API_KEYS (comma-separated).",
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Admin keys: required for download, delete and switch when any key is configured. Also from LLMWS_ADMIN_KEYS.",
    )
    require_api_key: bool = Field(
        False, description="Require a key even on loopback. Always on when binding beyond loopback."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Extra browser Origins allowed to open the WebSocket (the HTTP adapter's own origin and non-browser clients are always allowed).",
    )
    allow_file_origin: bool = Field(
        True,
        description="Allow pages opened from disk (Origin 'null', which sandboxed frames on any site send too) to connect: they chat in sessions such pages started and never manage models without a key that allows it. false refuses them.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="CORS origins for the HTTP adapter; empty: CORS off."
    )
    allow_image_urls: bool = Field(
        False,
        description="Fetch images that an HTTP request names by an http(s) URL (the daemon then reaches any address a client names). false: only images sent inline (base64, data: URLs).",
    )

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[str]) -> list[str]:
        # An empty key would "configure" keys while matching nothing (and let a
        # 0.0.0.0 bind start); a short one is guessed in a few thousand tries.
        for key in keys:
            if len(key.strip()) < MIN_KEY_LENGTH or key != key.strip():
                raise ValueError(
                    f"each API key must be at least {MIN_KEY_LENGTH} characters, without leading or "
                    "trailing spaces (generate one: python -c 'import secrets; print(secrets.token_urlsafe(24))')"
                )
        return keys


class MCPServer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class RemoteModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    max_context: int | None = None
    #: The provider's model reads images (they are sent as OpenAI `image_url` data: URLs).
    vision: bool = False


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation_defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    roles: dict[str, str] = Field(
        description="System prompts of the answer-improvement pipeline by role (assistant, reviewer, reviser; more may be added).",
        default_factory=lambda: {
            "assistant": "You are a helpful, precise assistant.",
            "reviewer": "You review an answer. List numbered, concrete suggestions to make it more correct, complete and clear. Do not rewrite it.",
            "reviser": "You revise an answer by applying the reviewer's suggestions. Reply with the improved answer only.",
        },
    )
    mcp_servers: dict[str, MCPServer] = Field(
        default_factory=dict,
        description='MCP servers the daemon is a client of: {"name": {"command", "args", "env"}} (stdio, started on demand).',
    )
    remote_models: list[RemoteModel] = Field(
        default_factory=list,
        description="Remote models served through LiteLLM: [{name, model, api_base?, api_key_env?, max_context?, vision?}].",
    )
    router: dict[str, Any] | None = Field(
        None,
        description="A LiteLLM Router over several upstream deployments (model_list, routing_strategy, num_retries, fallbacks, cooldown_time).",
    )

    @property
    def var_dir(self) -> Path:
        return Path(self.paths.var_dir).resolve()

    @property
    def models_dir(self) -> Path:
        return Path(self.paths.models_dir).resolve()


# Short environment names for the settings people change most.
ENV_ALIASES: dict[str, tuple[str, str]] = {
    "LLMWS_HOST": ("server", "host"),
    "LLMWS_PORT": ("server", "port"),
    "LLMWS_HTTP_PORT": ("server", "http_port"),
    "LLMWS_LOG_LEVEL": ("server", "log_level"),
    "LLMWS_VAR_DIR": ("paths", "var_dir"),
    "LLMWS_MODELS_DIR": ("paths", "models_dir"),
    "LLMWS_MODEL": ("model", "path"),
    "LLMWS_API_KEYS": ("security", "api_keys"),
    "LLMWS_ADMIN_KEYS": ("security", "admin_keys"),
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge `over` into a copy of `base`, recursing into dicts."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_value(raw: str, current: Any) -> Any:
    if isinstance(current, list):
        return [p.strip() for p in raw.split(",") if p.strip()]
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    """LLMWS_<SECTION>__<KEY>=value for any key, plus the short aliases."""
    defaults = Settings().model_dump()
    out: dict[str, Any] = {}
    pairs: list[tuple[str, str, str]] = []
    for name, raw in env.items():
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name]
            pairs.append((section, key, raw))
        elif name.startswith("LLMWS_") and "__" in name:
            section, _, key = name[6:].lower().partition("__")
            if section in defaults and isinstance(defaults[section], dict):
                pairs.append((section, key, raw))
    for section, key, raw in pairs:
        current = defaults.get(section, {}).get(key)
        out.setdefault(section, {})[key] = _env_value(raw, current)
    return out


def load_settings(
    config_path: str | Path | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults, a (possibly partial) file, env and flag overrides.

    Args:
        config_path: a JSON file; None means `config.json` in the working directory if present.
        env: the environment to read (None: os.environ).
        overrides: nested dict from command-line flags (highest precedence).
    """
    data: dict[str, Any] = {}
    path = Path(config_path) if config_path else Path("config.json")
    if config_path or path.exists():
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a JSON object")
        loaded.pop("_comment", None)
        data = loaded
    data = deep_merge(data, _from_env(dict(os.environ if env is None else env)))
    data = deep_merge(data, overrides or {})
    return Settings.model_validate(data)


def describe_settings() -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting, for --help and the docs."""
    rows = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel) and model is not Settings:
            for key, sub in model.model_fields.items():
                default = sub.get_default(call_default_factory=True)
                rows.append((f"{section}.{key}", json.dumps(default), sub.description or ""))
        else:
            rows.append((section, "…", field.description or ""))
    return rows
