"""The thread governor: all cores on a quiet machine, fewer while other programs hold them."""

from __future__ import annotations

from llmws_core.engine.backends.threads import ThreadGovernor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(gov: ThreadGovernor, clock: Clock, cost: dict[int, float], steps: int) -> list[int]:
    """Run `steps` decode steps where a step with n threads takes cost[n] seconds."""
    used = []
    for _ in range(steps):
        n = gov.current
        used.append(n)
        clock.now += cost[n]
        gov.observe(1, cost[n])
    return used


QUIET = {2: 0.016, 1: 0.023}  # two threads are faster when the cores are free
CONTENDED = {2: 0.5, 1: 0.033}  # a descheduled thread stalls the barrier


def test_quiet_machine_stays_on_all_cores() -> None:
    """With free cores, almost every step runs on all cores; probes get rarer."""
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    used = drive(gov, clock, QUIET, 20_000)  # about 6 minutes of decoding
    assert gov.current == 2
    assert used.count(1) / len(used) < 0.01


def test_contention_moves_to_fewer_threads_within_a_few_steps() -> None:
    """When steps suddenly take many times longer, the governor drops to fewer threads."""
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    drive(gov, clock, QUIET, 200)
    used = drive(gov, clock, CONTENDED, 400)
    assert used[:10].count(2) <= 4
    assert gov.current == 1
    # While contended, the occasional probe of two threads is cut short by its first slow step.
    assert used[10:].count(2) <= 10


def test_back_to_all_cores_when_the_load_goes() -> None:
    """Once the other programs stop, a probe finds all cores faster again and keeps them."""
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    drive(gov, clock, QUIET, 200)
    drive(gov, clock, CONTENDED, 400)
    assert gov.current == 1
    drive(gov, clock, QUIET, 5_000)
    assert gov.current == 2


def test_one_thread_has_nothing_to_govern() -> None:
    """With a single core there is no other choice to try."""
    gov = ThreadGovernor(1)
    assert not gov.enabled and gov.observe(1, 1.0) == 1


def test_a_slow_tail_on_all_cores_counts_even_when_most_steps_are_fast() -> None:
    """Contended cores as measured here: most two-thread steps take as long as one-thread
    steps, every fourth is seven times slower. Two threads then decode at 40 % of the
    rate of one, and the governor must settle on one although the typical step looks alike."""
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    drive(gov, clock, QUIET, 200)
    used = []
    for i in range(2_000):
        n = gov.current
        used.append(n)
        cost = 0.028 if n == 1 else (0.2 if i % 4 == 3 else 0.03)
        clock.now += cost
        gov.observe(1, cost)
    assert gov.current == 1
    assert used[100:].count(2) / len(used[100:]) < 0.05


def test_a_stray_slow_step_on_a_quiet_machine_does_not_drop_threads() -> None:
    """One step in fifty stalls (a page fault, a busy event loop): all cores stay the choice."""
    clock = Clock()
    gov = ThreadGovernor(2, clock=clock)
    used = []
    for i in range(20_000):
        n = gov.current
        used.append(n)
        cost = 0.1 if i % 50 == 49 else QUIET[n]
        clock.now += cost
        gov.observe(1, cost)
    assert gov.current == 2
    assert used.count(1) / len(used) < 0.02
