"""The security rules both doors share: where a key is read from, the roles it gives."""

from __future__ import annotations

from llmws_core.config import Settings
from llmws_core.security import access, allowed_hosts, host_name, is_loopback, key_from


def _settings(**security: object) -> Settings:
    return Settings.model_validate({"security": security})


def test_key_sources_in_order_of_precedence() -> None:
    """The handshake's key wins, then X-API-Key, then a Bearer token, then x_api_key, then api_key."""
    headers = {"x-api-key": "h", "authorization": "Bearer b"}
    query = {"x_api_key": "q1", "api_key": "q2"}
    assert key_from(headers.get, query.get, "hs") == "hs"
    assert key_from(headers.get, query.get) == "h"
    assert key_from({"authorization": "Bearer b"}.get, query.get) == "b"
    assert key_from({}.get, query.get) == "q1"
    assert key_from({}.get, {"api_key": "q2"}.get) == "q2"
    assert key_from({"authorization": "Basic xyz"}.get, {}.get) is None


def test_roles_with_and_without_required_keys() -> None:
    """Keys required: only valid keys get in, admin keys alone manage models; on loopback
    without required keys everyone chats, and manages models unless admin keys exist."""
    both = _settings(api_keys=["user-key-u-0123456789"], admin_keys=["admin-key-a-0123456789"])
    assert access(None, both, keys_required=True) == access("x", both, keys_required=True)
    assert not access(None, both, keys_required=True).allowed
    assert (
        access("user-key-u-0123456789", both, keys_required=True).allowed
        and not access("user-key-u-0123456789", both, keys_required=True).admin
    )
    assert access("admin-key-a-0123456789", both, keys_required=True).admin
    assert access(None, both, keys_required=False).allowed and not access(None, both, keys_required=False).admin
    users = _settings(api_keys=["user-key-u-0123456789"])
    assert access(
        "user-key-u-0123456789", users, keys_required=True
    ).admin  # without admin keys every valid key manages
    assert access(None, _settings(), keys_required=False).admin


def test_null_origin_never_manages_models_without_a_key() -> None:
    """A page opened from disk chats on loopback but needs a key for model management."""
    none = _settings()
    assert access(None, none, keys_required=False, null_origin=True).allowed
    assert not access(None, none, keys_required=False, null_origin=True).admin
    users = _settings(api_keys=["user-key-u-0123456789"])
    assert access("user-key-u-0123456789", users, keys_required=False, null_origin=True).admin


def test_loopback_and_host_rules() -> None:
    """Loopback addresses are recognised; a loopback bind answers only to loopback Host names."""
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("[::1]") and not is_loopback("0.0.0.0")
    hosts = allowed_hosts(Settings())
    assert hosts is not None and "localhost" in hosts and "evil.example" not in hosts
    assert allowed_hosts(Settings.model_validate({"server": {"host": "0.0.0.0"}})) is None
    assert host_name("LOCALHOST:8001") == "localhost" and host_name("[::1]:8001") == "::1"
