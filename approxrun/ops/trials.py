"""Auto's timed route trials: on a shape's first calls the candidate routes of a LUT GEMM (all exact)
take turns, and the fastest measured one is kept (see :class:`~approxrun.ops.engine.LutEngine`)."""

from __future__ import annotations

TRIAL_ROUNDS = 5  # timed turns per route at most (the best counts)
TRIAL_WARM_SECONDS, TRIAL_WARM_CALLS = 2e-2, 16  # untimed calls of a route per turn: until either is reached
TRIAL_SAMPLE_SECONDS = 5e-4  # a turn's timed calls: until their time reaches this (one call at least)
TRIAL_MIN_SECONDS = 2e-5  # shapes modelled faster than this keep the model's route: timing them is noise
TRIAL_SPREAD = 2.0  # auto also times the routes modelled within this factor of the fastest one
# after this many rounds, routes measured this many times slower than the fastest take no more turns
TRIAL_DROP_ROUNDS, TRIAL_DROP_RATIO = 2, 1.5


class RouteTrial:
    """Auto's timing of a shape's candidate routes: the routes take turns (so that load bursts hit
    them alike), up to :data:`TRIAL_ROUNDS` turns each. A turn runs its route untimed for
    :data:`TRIAL_WARM_SECONDS` or :data:`TRIAL_WARM_CALLS` calls, whichever comes first (at least
    one call), then times calls until they add up to :data:`TRIAL_SAMPLE_SECONDS`; the turn's
    sample is their mean. After another route this CPU runs the next calls of a route slowly
    (measured: a 1.3 ms int8 plan ran 2.93, 2.27, 1.56, 1.45 ms after other work; with 3 warm-up
    calls, turns of the int8 plan at (4096, 576, 64) still measured 1.42-1.75 ms against its
    repeated 1.38, and a 1.51 ms route was kept); the call cap keeps the trials of cheap shapes short
    (a training epoch may call a shape only tens of times). A mean over a timed window, not one
    call, keeps a 0.07 ms route's sample out of the call-to-call jitter. From round
    :data:`TRIAL_DROP_ROUNDS` on, a route whose best sample is :data:`TRIAL_DROP_RATIO` times the
    fastest one's takes no more turns, and a trial with one route left is done: a slow route's turns
    are the trial's cost to the run (at LeNet5's (32, 256, 120) the native gather measured 0.18-0.20
    ms in every turn against 0.07 for the compiled plans)."""

    def __init__(self, routes: list):
        self.routes = routes
        self.active = list(range(len(routes)))  # the routes still taking turns, by index
        self.rounds, self.position = 0, 0  # rounds completed; turns taken in the current one
        self.warmed, self.warm_calls = 0.0, 0  # untimed calls in this turn: seconds, count
        self.timed, self.timed_calls = 0.0, 0  # timed calls in this turn: seconds, count
        self.samples = [[] for _ in routes]

    @property
    def route(self):
        return self.routes[self.active[self.position]]

    @property
    def done(self) -> bool:
        return self.rounds >= TRIAL_ROUNDS or (self.rounds > 0 and len(self.active) == 1)

    def record(self, seconds: float) -> None:
        """The duration of the call just made on :attr:`route`."""
        if not self.warm_calls or (self.warm_calls < TRIAL_WARM_CALLS and self.warmed < TRIAL_WARM_SECONDS):
            self.warmed, self.warm_calls = self.warmed + seconds, self.warm_calls + 1
            return
        self.timed, self.timed_calls = self.timed + seconds, self.timed_calls + 1
        if self.timed < TRIAL_SAMPLE_SECONDS:
            return
        self.samples[self.active[self.position]].append(self.timed / self.timed_calls)
        self.position, self.warmed, self.warm_calls, self.timed, self.timed_calls = self.position + 1, 0.0, 0, 0.0, 0
        if self.position == len(self.active):  # a round is over
            self.rounds, self.position = self.rounds + 1, 0
            if self.rounds >= TRIAL_DROP_ROUNDS:
                fastest = min(min(self.samples[i]) for i in self.active)
                self.active = [i for i in self.active if min(self.samples[i]) <= TRIAL_DROP_RATIO * fastest]

    def best_times(self) -> list[float]:
        """Each route's fastest sample (the mean call time of its best turn; a dropped route's are
        among its first rounds)."""
        return [min(times) for times in self.samples]
