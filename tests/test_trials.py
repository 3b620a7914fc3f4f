"""Auto's route trials: turns, warm-up calls, timed windows and the kept route, from injected call durations."""

import math

from approxrun.ops.trials import TRIAL_ROUNDS, TRIAL_SAMPLE_SECONDS, TRIAL_WARM_CALLS, TRIAL_WARM_SECONDS, RouteTrial


def run(trial: RouteTrial, duration_of) -> list:
    """Calls the trial's routes until it is done; returns the routes in call order."""
    calls = []
    while not trial.done:
        calls.append(trial.route)
        trial.record(duration_of(trial.route, len(calls)))
    return calls


def test_cheap_calls_warm_up_to_the_call_cap_then_fill_a_timed_window():
    trial = RouteTrial(["int8", "tables"])
    calls = run(trial, lambda route, i: 1e-4)
    per_turn = TRIAL_WARM_CALLS + math.ceil(TRIAL_SAMPLE_SECONDS / 1e-4 - 1e-9)
    assert calls == (["int8"] * per_turn + ["tables"] * per_turn) * TRIAL_ROUNDS
    assert all(math.isclose(t, 1e-4) for t in trial.best_times())


def test_slow_calls_warm_up_by_time_then_one_is_timed():
    duration = 0.75 * TRIAL_WARM_SECONDS  # two warm-up calls pass the warm-up time
    trial = RouteTrial(["int8", "tables", "permute"])
    calls = run(trial, lambda route, i: duration)
    assert calls == [route for route in ["int8", "tables", "permute"] for _ in range(3)] * TRIAL_ROUNDS


def test_only_timed_calls_count_and_the_fastest_route_is_kept():
    """Warm-up calls of the faster route are slow (a transient after the other route); its timed
    calls are not, so it is measured fastest, by the mean of its best turn's timed calls."""
    def duration(route, i):
        if route == "permute":
            return 1.2e-3
        if trial.warm_calls < 3:  # int8: slow first calls of each turn only
            return 5e-3
        return 0.9e-3 if trial.turn == 2 else 1.0e-3  # its second turn is its fastest

    trial = RouteTrial(["int8", "permute"])
    run(trial, duration)
    assert [round(t, 12) for t in trial.best_times()] == [0.9e-3, 1.2e-3]
