"""Auto's route trials: turns, warm-up calls and the kept route, from injected call durations."""

from approxrun.ops.trials import TRIAL_ROUNDS, TRIAL_WARM_CALLS, RouteTrial


def run(trial: RouteTrial, duration_of) -> list:
    """Calls the trial's routes until it is done; returns the routes in call order."""
    calls = []
    while not trial.done:
        calls.append(trial.route)
        trial.record(duration_of(trial.route, len(calls)))
    return calls


def test_cheap_calls_warm_up_to_the_call_cap_then_one_is_timed():
    trial = RouteTrial(["int8", "tables"])
    calls = run(trial, lambda route, i: 1e-4)
    per_turn = TRIAL_WARM_CALLS + 1
    assert calls == (["int8"] * per_turn + ["tables"] * per_turn) * TRIAL_ROUNDS


def test_slow_calls_warm_up_once():
    trial = RouteTrial(["int8", "tables", "permute"])
    calls = run(trial, lambda route, i: 0.02)
    assert calls == [route for route in ["int8", "tables", "permute"] for _ in range(2)] * TRIAL_ROUNDS


def test_only_timed_calls_count_and_the_fastest_route_is_kept():
    """Warm-up calls of the faster route are slow (a transient after the other route); its timed
    calls are not, so it is measured fastest."""
    def duration(route, i):
        if route == "permute":
            return 1.2e-3
        return 5e-3 if trial.warm_calls == 0 else 1.0e-3  # int8: slow first call of each turn only

    trial = RouteTrial(["int8", "permute"])
    run(trial, duration)
    assert trial.best_times() == [1.0e-3, 1.2e-3]
