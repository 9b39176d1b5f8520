"""Each tiny CPU example, run as its manifest says (run-local, one process per role), shows what its
header promises (the PPO example is the README's first command: test_local_trainer.py).

The figures are the report's (rlhf_operator.report.learning_figures): training curves compare the
mean of the first and last 5 steps, held-out metrics the first evaluation (step 0, the initial
policy) and the last. Thresholds sit well under the measured values (crds/examples/*.yaml headers)
so a different machine's float noise does not flip them.
"""

from pathlib import Path

import pytest
import yaml
from rlhf_operator import local, report

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# example -> [(figure, minimum after, minimum change)]; a negative change is a loss that must fall
# by at least that much (the minimum after is then unused).
PROMISES = {
    "grpo-tiny.yaml": [("reward_mean", 0.5, 0.5), ("eval_reward_mean", 0.5, 0.4)],
    "rloo-tiny.yaml": [("reward_mean", 0.5, 0.5), ("eval_reward_mean", 0.5, 0.4)],
    "dpo-tiny.yaml": [("eval_preference_accuracy", 0.75, 0.25), ("eval_loss", 0.0, -0.15)],
    "rm-tiny.yaml": [("eval_preference_accuracy", 0.75, 0.25), ("eval_loss", 0.0, -0.3)],
    "sft-tiny.yaml": [("loss", 0.0, -2.0), ("eval_exact_match", 0.5, 0.5)],
}


@pytest.mark.timeout(1000)
@pytest.mark.parametrize("example", PROMISES)
def test_example_learns_in_its_default_run(tmp_path, example):
    obj = yaml.safe_load((REPO / "crds" / "examples" / example).read_text())
    runner = local.LocalRunner(obj, tmp_path, serve_metrics=False)
    status = runner.run(timeout=900)  # raises TimeoutError first (it stops the processes)
    logs = "\n".join(p.read_text()[-2000:] for p in runner.run_dir.glob("pods/*/log.txt"))
    assert status["phase"] == "Succeeded", logs
    _, main = report.main_history(report.load_run(runner.run_dir))
    figures = report.learning_figures(main.final)
    shown = "\n".join(report.figure_lines(figures))
    for key, minimum, change in PROMISES[example]:
        fig = figures[key]
        if change >= 0:
            assert fig.after >= minimum and fig.change >= change, shown
        else:  # a loss: down by at least -change
            assert fig.change <= change, shown
