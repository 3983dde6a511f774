"""Settings precedence: defaults < file < environment < flags."""

from __future__ import annotations

import json

import pytest

from llmws_core.config import describe_settings, load_settings
from llmws_core.daemon import build_parser, overrides_from_args


def test_defaults_match_the_documented_ones(tmp_path) -> None:
    """With no file the documented defaults apply."""
    s = load_settings(tmp_path / "none.json" if False else None, env={})
    assert s.server.host == "127.0.0.1" and s.server.port == 8765 and s.server.http_port == 8001
    g = s.generation_defaults
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k) == (2048, 0.7, 0.95, 50)


def test_partial_file_env_and_flags_override_in_order(tmp_path) -> None:
    """A partial file merges over defaults; env beats the file; flags beat env."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"server": {"port": 9000}, "generation_defaults": {"temperature": 0.1}}))
    s = load_settings(
        cfg,
        env={
            "LLMWS_PORT": "9100",
            "LLMWS_SESSIONS__TTL_SECONDS": "60",
            "LLMWS_API_KEYS": "key-a-0123456789ab,key-b-0123456789ab",
        },
    )
    assert s.server.port == 9100 and s.generation_defaults.temperature == 0.1
    assert s.server.http_port == 8001 and s.sessions.ttl_seconds == 60
    assert s.security.api_keys == ["key-a-0123456789ab", "key-b-0123456789ab"]
    args = build_parser().parse_args(["--port", "9200", "--http-port", "-1", "--model", "x.gguf"])
    s = load_settings(cfg, env={"LLMWS_PORT": "9100"}, overrides=overrides_from_args(args))
    assert s.server.port == 9200 and s.server.http_port is None and s.model.path == "x.gguf"


def test_bad_config_is_rejected(tmp_path) -> None:
    """Unknown keys and wrong types in the file are errors, not ignored."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"server": {"prot": 1}}))
    with pytest.raises(ValueError):
        load_settings(cfg, env={})


def test_every_setting_is_described() -> None:
    """Every key has a description (it feeds --help and the docs)."""
    rows = describe_settings()
    assert len(rows) > 30 and all(desc for _, _, desc in rows)


def test_repo_config_json_is_valid() -> None:
    """The shipped config.json loads."""
    from llmws_core.config import REPO_ROOT

    s = load_settings(REPO_ROOT / "config.json", env={})
    assert s.server.port == 8765


def test_http_port_minus_one_disables_http() -> None:
    """`--http-port -1` (documented: disables HTTP) gives a config without an HTTP port."""
    args = build_parser().parse_args(["--http-port", "-1"])
    settings = load_settings(None, env={}, overrides=overrides_from_args(args))
    assert settings.server.http_port is None


@pytest.mark.parametrize("keys", [[""], ["k"], ["short-key"], [" padded-key-0123456789 "]])
def test_empty_short_or_padded_api_keys_are_refused(keys: list[str]) -> None:
    """An empty key (which would let a 0.0.0.0 bind start), a key under 16 characters or one with spaces around it is a configuration error."""
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_settings(None, env={"LLMWS_PORT": "9100"}, overrides={"security": {"api_keys": keys}})
    with pytest.raises(ValueError, match="at least 16 characters"):
        load_settings(None, env={}, overrides={"security": {"admin_keys": keys}})
