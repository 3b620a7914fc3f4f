"""Auto's route trials: turns, warm-up calls, timed windows and the kept route, from injected call durations."""

import math

from approxrun.ops.trials import (TRIAL_DROP_RATIO, TRIAL_DROP_ROUNDS, TRIAL_ROUNDS, TRIAL_SAMPLE_SECONDS,
                                  TRIAL_WARM_CALLS, TRIAL_WARM_SECONDS, RouteTrial)


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
        return 0.9e-3 if trial.rounds == 1 else 1.0e-3  # its second turn is its fastest

    trial = RouteTrial(["int8", "permute"])
    run(trial, duration)
    assert [round(t, 12) for t in trial.best_times()] == [0.9e-3, 1.2e-3]


def test_routes_measured_much_slower_take_no_more_turns():
    """From round TRIAL_DROP_ROUNDS on, a route over TRIAL_DROP_RATIO times the fastest drops out;
    one just under it keeps its turns; its samples still count among the best times."""
    durations = {"compiled": 1e-3, "int16": 0.98 * TRIAL_DROP_RATIO * 1e-3, "gather": 1.02 * TRIAL_DROP_RATIO * 1e-3}
    trial = RouteTrial(list(durations))
    calls = run(trial, lambda route, i: durations[route])
    turns = {route: len(samples) for route, samples in zip(trial.routes, trial.samples)}
    assert turns == {"compiled": TRIAL_ROUNDS, "int16": TRIAL_ROUNDS, "gather": TRIAL_DROP_ROUNDS}
    assert calls.count("gather") < calls.count("int16")
    assert [round(t, 12) for t in trial.best_times()] == [round(d, 12) for d in durations.values()]


def test_a_trial_ends_when_one_route_is_left():
    durations = {"compiled": 1e-3, "gather": 3e-3}
    trial = RouteTrial(list(durations))
    run(trial, lambda route, i: durations[route])
    assert [len(samples) for samples in trial.samples] == [TRIAL_DROP_ROUNDS] * 2
    single = RouteTrial(["gather"])  # nothing to compare: one turn, then done
    assert run(single, lambda route, i: 1e-3) and len(single.samples[0]) == 1
