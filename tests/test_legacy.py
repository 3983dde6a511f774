"""The legacy dialect's rules, without sockets: config keys, what a connection is given, acks."""

from __future__ import annotations

from llmws_core.legacy import LegacyView, split_missed, translate_config


def test_original_config_keys_are_translated_and_unknown_ones_dropped() -> None:
    """repetition_penalty is repeat_penalty, do_sample false is greedy, unknown keys go."""
    out = translate_config(
        {
            "max_new_tokens": 64,
            "temperature": 0.7,
            "repetition_penalty": 1.1,
            "do_sample": False,
            "num_beams": 4,
            "top_k": None,
        }
    )
    assert out == {"max_new_tokens": 64, "temperature": 0.0, "repeat_penalty": 1.1}
    assert translate_config({"do_sample": True, "temperature": 0.5}) == {"temperature": 0.5}


def test_only_own_requests_reach_the_connection_up_to_their_last_event() -> None:
    """Events of other requests and those after a request's last one are withheld."""
    view = LegacyView()
    msg = view.inbound({"type": "download_model", "repo": "r", "target_dir": "d"})
    rid = msg["request_id"]
    assert view.admit({"type": "log", "seq": 1, "request_id": rid}) is not None
    assert view.admit({"type": "download_started", "seq": 2, "request_id": rid}) is not None
    assert view.admit({"type": "download_progress", "seq": 3, "request_id": rid}) is None
    assert view.admit({"type": "model_switched", "seq": 4}) is None  # a broadcast
    assert view.ack_limit(4) == 4, "notifications it was not given may be trimmed"


def test_an_ack_stops_before_a_reply_the_connection_was_not_given() -> None:
    """A withheld conversation event bounds what an ack without seq trims."""
    view = LegacyView()
    view.inbound({"type": "inference", "prompt": "hi", "request_id": "mine"})
    view.admit({"type": "token", "seq": 5, "request_id": "theirs", "data": "x"})
    view.admit({"type": "done", "seq": 7, "request_id": "mine"})
    assert view.ack_limit(9) == 4
    assert "mine" not in view.pending


def test_a_long_backlog_is_cut_for_the_welcome() -> None:
    """Missed events past the welcome's size bound wait for the next connection."""
    backlog = [{"type": "token", "seq": i, "data": "x" * 1_000_000} for i in range(1, 20)]
    given, more = split_missed(backlog)
    assert more and 0 < len(given) < len(backlog)
