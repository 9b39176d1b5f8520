"""finite.py's pure parts: which rows are bad, what the messages say, what each policy does."""

import pytest
import torch
from rlhf_trainer.finite import NonFiniteError, NonFiniteGuard, describe_rows, non_finite_rows, zero_loss_like
from rlhf_trainer.records import PromptRecord

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("values", "rows"), [
    pytest.param([1.0, 2.0], [], id="all finite"),
    pytest.param([NAN, 0.0, INF, -INF], [0, 2, 3], id="nan and both infinities"),
    pytest.param([[0.0, 0.0], [0.0, NAN], [1.0, 1.0]], [1], id="(B, R): a row with one bad entry"),
    pytest.param([[[0.0], [INF]], [[0.0], [0.0]]], [0], id="(B, R, V)"),
])
def test_non_finite_rows(values, rows):
    assert non_finite_rows(torch.tensor(values)) == rows


RECORDS = [PromptRecord(f"{i}+1=", str(i + 1), f"train.jsonl:{i + 1}") for i in range(6)]


def test_describe_rows_names_source_prompt_response_and_value():
    text = describe_rows([2], RECORDS, responses=["a", "b", "seven"], values=torch.tensor([0.0, 1.0, NAN]))
    assert text == "row 2 (train.jsonl:3, prompt '2+1=', response 'seven'): nan"


def test_describe_rows_shows_three_then_counts():
    text = describe_rows([0, 1, 2, 3, 4], RECORDS)
    assert text.count("row ") == 3 and text.endswith("+2 more")


def test_describe_rows_cuts_long_text():
    long = [PromptRecord("x" * 500, None, "a.jsonl:1")]
    assert len(describe_rows([0], long)) < 120


def guard(policy, others=0.0):
    """A guard whose collective adds `others` bad rows from the rest of the world."""
    counted = []
    g = NonFiniteGuard(policy, reduce=lambda n: n + others, count=counted.append)
    g.step = 7
    return g, counted


def test_fail_on_a_reward_names_step_source_and_rows():
    g, counted = guard("fail")
    scores = torch.tensor([1.0, NAN, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(NonFiniteError) as err:
        g.batch_ok("reward", {"scores": scores}, RECORDS, source="reward.callable m:f",
                   responses=["r"] * 6)
    message = str(err.value)
    assert message.startswith("step 7: non-finite reward: scores from reward.callable m:f: 1 of 6 rows: ")
    assert "row 1 (train.jsonl:2, prompt '1+1=', response 'r'): nan" in message
    assert "nonFinite: skip" in message
    assert counted == []


def test_skip_on_a_batch_counts_once_and_returns_false():
    g, counted = guard("skip")
    ok = g.batch_ok("experience", {"values": torch.tensor([[0.0, INF]] * 6)}, RECORDS, source="critic")
    assert ok is False and counted == ["experience"] and g.skipped["experience"] == 1


def test_a_finite_batch_passes_and_ignores_missing_tensors():
    g, counted = guard("fail")
    assert g.batch_ok("experience", {"values": None, "scores": torch.zeros(6)}, RECORDS, source="x") is True
    assert counted == []


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_bad_rows_on_another_rank_make_every_rank_agree(policy):
    g, counted = guard(policy, others=2.0)
    finite = {"scores": torch.zeros(6)}
    if policy == "skip":
        assert g.batch_ok("reward", finite, RECORDS, source="rm") is False
        assert counted == ["reward"]
    else:
        with pytest.raises(NonFiniteError, match="another rank"):
            g.batch_ok("reward", finite, RECORDS, source="rm")


def test_loss_fail_names_the_micro_batch_rows():
    g, _ = guard("fail")
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite loss: dpo loss is nan on a micro-batch of 2 rows: "
                                             r"row 0 \(train.jsonl:1"):
        g.loss_ok(torch.tensor(NAN), source="dpo loss", records=RECORDS[:2])


def test_loss_skip_and_finite():
    g, counted = guard("skip")
    assert g.loss_ok(torch.tensor(1.5), source="sft loss") is True
    assert g.loss_ok(torch.tensor(-INF), source="sft loss") is False
    assert counted == ["loss"]


@pytest.mark.parametrize(("norm", "applied", "ok"), [
    pytest.param(1.0, True, True, id="finite, applied"),
    pytest.param(None, True, True, id="no norm computed, applied"),
    pytest.param(INF, False, False, id="DeepSpeed overflow skip"),
    pytest.param(NAN, True, False, id="nan norm"),
    pytest.param(None, False, False, id="not applied, no norm"),
])
def test_grad_norm_cases(norm, applied, ok):
    g, counted = guard("skip")
    assert g.grad_norm_ok(norm, applied=applied, source="actor gradients") is ok
    assert counted == ([] if ok else ["grad_norm"])
    if not ok:
        f, _ = guard("fail")
        with pytest.raises(NonFiniteError, match="step 7: non-finite grad_norm: actor gradients"):
            f.grad_norm_ok(norm, applied=applied, source="actor gradients")


class FakeStrategy:
    """Counts backward calls; every second step() is a boundary with the given outcome."""

    def __init__(self, outcome):
        self.outcome, self.losses, self.micro = outcome, [], 0

    def backward(self, loss):
        self.losses.append(float(loss.detach()))

    def step(self):
        self.micro += 1
        return self.outcome if self.micro % 2 == 0 else None


def test_backward_step_replaces_a_skipped_loss_by_zero_and_counts_updates():
    from rlhf_trainer.strategy import StepOutcome

    g, _ = guard("skip")
    strategy = FakeStrategy(StepOutcome(1.0, True))
    anchor = torch.tensor([1.0, NAN], requires_grad=True)
    assert g.backward_step(strategy, torch.tensor(NAN), anchor=anchor, role="actor", source="l") is None
    assert g.backward_step(strategy, torch.tensor(2.0), anchor=anchor, role="actor", source="l") == 2.0
    assert strategy.losses == [0.0, 2.0]  # the skipped micro-batch still went through backward
    assert g.updates["actor"] == 1
    # A window of skipped micro-batches only is no update, even if the optimizer ran.
    for _ in range(2):
        g.backward_step(strategy, torch.tensor(NAN), anchor=anchor, role="actor", source="l")
    assert g.updates["actor"] == 1
    g.check_updated("actor", steps_run=2)  # one real update: fine


def test_check_updated_fails_when_nothing_was_applied():
    g, _ = guard("skip")
    g.check_updated("actor", steps_run=0)  # a resume at max_steps runs no step: fine
    with pytest.raises(NonFiniteError, match="all 3 steps .* never updated"):
        g.check_updated("actor", steps_run=3)


def test_zero_loss_like_sends_a_zero_gradient_through_non_finite_entries():
    anchor = torch.tensor([1.0, NAN, INF], requires_grad=True)
    loss = zero_loss_like(anchor)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(anchor.grad, torch.zeros(3))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="non_finite"):
        NonFiniteGuard("ignore")

