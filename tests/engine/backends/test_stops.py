"""The stop-string matcher the batching backends share."""

from __future__ import annotations

from llmws_core.engine.backends.stops import StopMatcher


def test_matcher_reports_which_stop_string_ended_the_text() -> None:
    """A stop string split over pieces is held back, cut off and named as the one that matched."""
    m = StopMatcher(["END", "<|im_end|>"])
    assert m.feed("Hello E") == ("Hello ", False)
    assert m.matched is None
    assert m.feed("ND and more") == ("", True)
    assert m.matched == "END"


def test_matcher_names_the_earliest_of_two_stops_in_one_piece() -> None:
    """When two stop strings arrive in one piece, the earlier one in the text counts."""
    m = StopMatcher(["b", "a"])
    assert m.feed("xaxb") == ("x", True)
    assert m.matched == "a"


def test_matcher_without_a_match_names_none() -> None:
    """Text that never contains a stop string leaves `matched` empty."""
    m = StopMatcher(["STOP"])
    assert m.feed("all fine") == ("all fine", False)
    assert m.flush() == ""
    assert m.matched is None
