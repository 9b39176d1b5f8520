"""rlhf_trainer.alarms: the signals and, for each alarm, a case built to fire it and one that must not."""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rlhf_trainer.alarms import AlarmMonitor, KLSignals, Thresholds, distinct_2, kl_signals, merge

ON = Thresholds(negative_kl=0.05, length_drop=0.5, distinct=0.3, reward_jump=0.5, window=2)
OFF = Thresholds(negative_kl=0.0, length_drop=0.0, distinct=0.0, reward_jump=0.0, window=2)


def test_kl_signals_count_response_tokens_only():
    kl = torch.tensor([[-1.0, 2.0, -5.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the -5 sits on padding
    signals = kl_signals(kl, mask)
    assert signals.negative_share == pytest.approx(2 / 5)
    assert signals.mean == pytest.approx((1.0 - 0.5) / 2)
    assert signals.stderr == pytest.approx(statistics.stdev([1.0, -0.5]) / 2 ** 0.5)
    assert kl_signals(kl, torch.zeros_like(mask)).negative_share == 0.0
    assert kl_signals(kl[:0], mask[:0]) == KLSignals(0.0, 0.0, 0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-3, 3), min_size=3, max_size=3), min_size=2, max_size=12),
       st.integers(1, 11), st.data())
def test_kl_signals_over_ranks_are_those_of_the_whole_batch(rows, split, data):
    """Each rank's sums reduced over the ranks give the signals of all rows on one rank."""
    kl = torch.tensor(rows, dtype=torch.float64)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=3, max_size=3),
                                           min_size=len(rows), max_size=len(rows))))
    split = min(split, len(rows) - 1)
    local = []
    kl_signals(kl[split:], mask[split:], reduce=lambda t: local.append(t) or t)
    rank0 = kl_signals(kl[:split], mask[:split], reduce=lambda t: t + local[0])
    whole = kl_signals(kl, mask)
    assert rank0.mean == pytest.approx(whole.mean) and rank0.negative_share == pytest.approx(whole.negative_share)
    assert rank0.stderr == pytest.approx(whole.stderr, abs=1e-9)
    sums = (kl * mask).sum(-1).tolist()
    assert whole.mean == pytest.approx(statistics.fmean(sums))
    assert whole.stderr == pytest.approx(statistics.stdev(sums) / len(sums) ** 0.5, abs=1e-9)


def test_distinct_2_per_response_and_short_ones_skipped():
    ids = torch.tensor([[7, 7, 7, 7, 7], [1, 2, 3, 4, 5], [9, 9, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    # "7 7 7 7 7": 4 bigrams, 1 unique -> 0.25; "1 2 3 4 5": 1.0; the 2-token one has too few.
    assert distinct_2(ids, mask) == pytest.approx((0.25 + 1.0) / 2)
    assert distinct_2(ids[2:], mask[2:]) is None


def step(monitor, **kw):
    values = {"kl": KLSignals(0.1, 0.01, 0.2), "length": 10.0, "distinct": 0.9, "reward": 0.0, **kw}
    return monitor.step(**values)


def test_negative_kl_fires_below_minus_the_threshold_and_many_standard_errors():
    signals, alarms = step(AlarmMonitor(ON), kl=KLSignals(-0.2, 0.04, 0.8))
    assert list(alarms) == ["NegativeKL"] and "mean KL -0.2 < -0.05, 5 standard errors below 0" in alarms["NegativeKL"]
    assert signals["kl_stderr"] == 0.04 and signals["kl_negative_share"] == 0.8
    assert step(AlarmMonitor(ON), kl=KLSignals(-0.01, 0.0, 0.6))[1] == {}  # noise around 0 is not an alarm
    # A small batch near the reference: -0.2 is 2 standard errors of its k1 estimate, chance and not a fault.
    assert step(AlarmMonitor(ON), kl=KLSignals(-0.2, 0.1, 0.75))[1] == {}
    assert step(AlarmMonitor(OFF), kl=KLSignals(-5.0, 0.01, 1.0))[1] == {}


def test_length_collapse_compares_two_windows():
    monitor = AlarmMonitor(ON)
    fired = [step(monitor, length=n)[1] for n in (10, 10, 4, 4)]
    assert fired[:3] == [{}, {}, {}]  # the windows are not full yet
    assert "LengthCollapse" in fired[3] and "60% below" in fired[3]["LengthCollapse"]
    signals, _ = step(monitor, length=4)
    assert signals["response_length_change"] == pytest.approx(4 / 7 - 1)
    steady = AlarmMonitor(ON)
    assert all(step(steady, length=n)[1] == {} for n in (10, 9, 8, 7, 6))  # slow shortening: no collapse


def test_repetition_is_reward_hacking():
    signals, alarms = step(AlarmMonitor(ON), distinct=0.1)
    assert signals["distinct_2"] == 0.1 and "they repeat themselves" in alarms["RewardHacking"]
    signals, alarms = step(AlarmMonitor(ON), distinct=None)
    assert "distinct_2" not in signals and alarms == {}


def test_a_reward_jump_the_held_out_reward_does_not_follow_is_reward_hacking():
    monitor = AlarmMonitor(ON)
    step(monitor, reward=0.1)
    assert monitor.evaluated(0.1) == {}  # the first evaluation only sets the baseline
    step(monitor, reward=0.9)
    step(monitor, reward=0.9)
    alarms = monitor.evaluated(0.15)
    assert "rose by 0.8" in alarms["RewardHacking"]
    honest = AlarmMonitor(ON)
    step(honest, reward=0.1)
    honest.evaluated(0.1)
    step(honest, reward=0.9)
    step(honest, reward=0.9)
    assert honest.evaluated(0.8) == {}  # the held-out reward rose with it
    assert AlarmMonitor(ON).evaluated(None) == {}


def test_merge_orders_by_reason_and_joins_messages():
    assert merge({"RewardHacking": "a", "NegativeKL": "b"}, {"RewardHacking": "c"}) == {
        "NegativeKL": "b", "RewardHacking": "a; c"}


# Steps of a run: (length, reward, held-out reward at an evaluation after that step or None).
RUN_STEPS = st.lists(st.tuples(st.floats(1.0, 50.0), st.floats(-1.0, 1.0), st.none() | st.floats(-1.0, 1.0)),
                     min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(steps=RUN_STEPS, split=st.integers(0, 12))
def test_a_monitor_restored_from_its_state_fires_as_the_unbroken_one(steps, split):
    """A resume (the actor's checkpoint holds state_dict()) changes no signal and no alarm after it."""
    def run(monitor, part):
        out = []
        for length, reward, held_out in part:
            out.append(step(monitor, length=length, reward=reward))
            if held_out is not None:
                out.append(monitor.evaluated(held_out))
        return out

    split = min(split, len(steps))
    first = AlarmMonitor(ON)
    before = run(first, steps[:split])
    resumed = AlarmMonitor(ON)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, steps[split:]) == run(AlarmMonitor(ON), steps)[len(before):]


def test_a_window_edited_between_runs_keeps_the_newest_values():
    saved = AlarmMonitor(ON)
    for n in (10, 10, 4, 4):
        step(saved, length=n)
    wider = AlarmMonitor(Thresholds(**{**ON.__dict__, "window": 3}))
    wider.load_state_dict(saved.state_dict())
    assert list(wider.lengths) == [10, 10, 4, 4] and wider.lengths.maxlen == 6
    narrower = AlarmMonitor(Thresholds(**{**ON.__dict__, "window": 1}))
    narrower.load_state_dict(saved.state_dict())
    assert list(narrower.lengths) == [4, 4] and list(narrower.rewards) == [0.0]
