"""rlhf_operator.report: restart accounting from metrics files, PNG, summary, clear errors."""

import json

import pytest
from rlhf_operator import cli, report


def rows(*steps):
    return [{"step": s, "reward_mean": s / 10, "kl": 0.01 * s} for s in steps]


def write_metrics(folder, name, steps, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(*steps)) + extra)


def test_history_counts_resumes_and_redone_steps_and_keeps_last_row_per_step():
    data = rows(1, 2, 3, 4, 5) + rows(5, 6, 7) + rows(3, 4, 5, 6, 7, 8)
    data[-1]["reward_mean"] = 0.99
    h = report.history(data)
    assert h.restarts == 2 and h.steps_redone == [1, 5]
    assert [r["step"] for r in h.final] == list(range(1, 9))
    assert h.final[-1]["reward_mean"] == 0.99 and h.last_step == 8


def test_history_counts_a_marked_resume_that_redoes_no_step():
    # A checkpoint at the last step written (a resize, a clean stop): the steps never go back.
    data = rows(1, 2, 3, 4) + rows(5, 6)
    data[4]["resumed_from"] = 4.0
    h = report.history(data)
    assert h.restarts == 1 and h.steps_redone == [0] and h.last_step == 6
    marked = rows(1, 2, 3, 4, 5) + rows(5, 6)  # resumed from 4 after step 5 was written: counted once
    marked[5]["resumed_from"] = 4.0
    assert report.history(marked).steps_redone == [1]


def test_history_without_restarts():
    h = report.history(rows(1, 2, 3))
    assert h.restarts == 0 and h.steps_redone == [] and h.last_step == 3


def test_report_on_run_dir_writes_png_and_summary(tmp_path, capsys):
    write_metrics(tmp_path / "checkpoints" / "metrics", "actor-0", [1, 2, 3, 2, 3, 4])
    write_metrics(tmp_path / "checkpoints" / "metrics", "critic-0", [1, 2, 3, 4])
    (tmp_path / "status.json").write_text(json.dumps({"phase": "Succeeded", "restarts": 1}))
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "steps: 4" in out and "phase: Succeeded" in out
    assert "reward (mean): first 0.1, last 0.4" in out
    assert "restarts: 1 (resumes seen in metrics: 1, steps redone: 2)" in out
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_checkpoint_dir_with_out_path_and_torn_last_line(tmp_path):
    write_metrics(tmp_path / "ck" / "metrics", "actor-0", [1, 2], extra='{"step": 3, "rew')
    png, lines = report.write_report(tmp_path / "ck", tmp_path / "r" / "x.png")
    assert png.exists() and "steps: 2" in lines


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "actor-0.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(report.ReportError, match=r"actor-0.jsonl:2: not JSON"):
        report.load_run(tmp_path)


def test_missing_metrics_is_a_clear_cli_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no metrics" in capsys.readouterr().err


def test_learning_figures_compare_first_and_last_five_steps_and_evaluations():
    data = [{"step": 0, "eval_preference_accuracy": 0.5, "eval_loss": 0.69}]
    data += [{"step": s, "reward_mean": 0.0 if s <= 5 else 1.0, "loss": 2.0 - s / 10} for s in range(1, 13)]
    data[-1].update(eval_preference_accuracy=0.9, eval_loss=0.3)
    figures = report.learning_figures(report.history(data).final)
    assert figures["reward_mean"] == report.Figure(0.0, 1.0, 5)
    assert figures["loss"].before == pytest.approx(1.7) and figures["loss"].after == pytest.approx(1.0)
    assert figures["eval_preference_accuracy"] == report.Figure(0.5, 0.9, 0)
    lines = report.figure_lines(figures)
    assert "reward (mean of first / last 5 steps): 0 -> 1 (+1)" in lines
    assert "held-out preference accuracy (first / last evaluation): 0.5 -> 0.9 (+0.4)" in lines


def test_learning_figures_of_a_short_run_use_halves_and_skip_missing_values():
    data = [{"step": 1, "reward_mean": 0.0}, {"step": 2, "reward_mean": None}, {"step": 3, "reward_mean": 0.5},
            {"step": 4, "reward_mean": 1.0}]
    assert report.learning_figures(data) == {"reward_mean": report.Figure(0.0, 1.0, 1)}
    assert report.learning_figures(data[:1]) == {}


def test_a_step_0_evaluation_is_not_a_restart():
    h = report.history([{"step": 0, "eval_loss": 1.0}, {"step": 1}, {"step": 2}])
    assert h.restarts == 0 and [r["step"] for r in h.final] == [0, 1, 2]


def test_samples_show_as_a_table_in_the_summary_and_the_png(tmp_path):
    write_metrics(tmp_path / "checkpoints" / "metrics", "actor-0", [1, 2, 3])
    samples = tmp_path / "checkpoints" / "samples"
    samples.mkdir(parents=True)
    rows = [{"step": s, "prompt": f"{s}+1=", "response": "x" * 40 if s == 3 else str(s + 1), "reward": 1.0,
             "kl": None, "length": 2, "truncated": s == 3} for s in (1, 2, 3)]
    (samples / "actor-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png, lines = report.write_report(tmp_path)
    start = lines.index("newest samples (3 written):")
    header, *table = lines[start + 1:]
    assert header.split() == list(report.SAMPLE_COLUMNS)
    assert table[0].split() == ["1", "1+1=", "2", "1", "-", "2", "False"]
    assert "x" * 23 + "~" in table[2] and table[2].endswith("True")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_table_keeps_the_newest_rows():
    samples = [{"step": s, "prompt": "p", "response": "r", "reward": 0.0, "kl": 0.0, "length": 1,
                "truncated": False} for s in range(20)]
    table = report.sample_table(samples, rows=3)
    assert [line.split()[0] for line in table[1:]] == ["17", "18", "19"]
    assert report.sample_table([]) == []


def test_tracker_runs_show_in_the_summary_from_the_metrics_lines(tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "metrics"
    write_metrics(folder, "actor-0", [1, 2])
    with open(folder / "actor-0.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 0.3, "trackers": {
            "wandb": "file:///ck/trackers/wandb/offline-run-x", "mlflow": "http://ml/#/experiments/1/runs/r"}}) + "\n")
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "mlflow run: http://ml/#/experiments/1/runs/r" in out and "wandb run: file:///ck/trackers/wandb/offline-run-x" in out
