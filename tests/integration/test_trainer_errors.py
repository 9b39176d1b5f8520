"""`python -m rlhf_trainer` exits 78 on a bad config and 65 on bad data, naming the field / file:line."""

import json
import os
from pathlib import Path

from rlhf_trainer.errors import EXIT_CONFIG_ERROR, EXIT_DATA_ERROR
from trainer_harness import launch, trainer_config


def test_wrong_typed_field_exits_78_naming_it(tmp_path):
    config = trainer_config("sft", hyperparameters={"clip_range": "wide"})
    run = launch(config, tmp_path)
    assert run.returncodes == {"actor-0": EXIT_CONFIG_ERROR}, run.describe()
    assert "hyperparameters.clip_range" in run.logs["actor-0"]
    assert "hyperparameters.clip_range" in run.termination["actor-0"]


def test_invalid_json_exits_78_naming_file_and_line(tmp_path):
    text = json.dumps(trainer_config("sft"), indent=1).replace('"job":', '"job" ', 1)
    run = launch(trainer_config("sft"), tmp_path, config_text=text)
    assert run.returncodes == {"actor-0": EXIT_CONFIG_ERROR}, run.describe()
    assert "config.json:2:" in run.logs["actor-0"]


def test_env_that_does_not_fit_the_config_exits_78(tmp_path):
    config = trainer_config("sft")
    run = launch(config, tmp_path, extra_env={"RLHF_ROLE_REPLICAS": "3"})
    assert run.returncodes == {"actor-0": EXIT_CONFIG_ERROR}, run.describe()
    assert "RLHF_ROLE_REPLICAS" in run.logs["actor-0"]


def test_bad_jsonl_row_exits_65_naming_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "Add.", "input": "1+1", "output": "2"}] * 2 + [{"instruction": "Add.", "input": 3}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = trainer_config("sft", dataset={"path": str(data), "format": "instruction"})
    run = launch(config, tmp_path)
    assert run.returncodes == {"actor-0": EXIT_DATA_ERROR}, run.describe()
    assert "train.jsonl:3" in run.termination["actor-0"]


def without_bitsandbytes() -> dict[str, str]:
    """Env for a trainer in which `import bitsandbytes` fails (a stub package first on PYTHONPATH)."""
    return {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "no_bitsandbytes"),
                                           os.environ.get("PYTHONPATH", "")])}


def test_quantized_base_without_bitsandbytes_exits_78_before_loading_anything(tmp_path):
    # A model path that does not exist: loading anything (the tokenizer comes first) would fail on it.
    config = trainer_config("sft", model={"path": str(tmp_path / "no-model")},
                            roles={"actor": {"lora": {"rank": 4, "quantization": "4bit"}}})
    run = launch(config, tmp_path, extra_env=without_bitsandbytes())
    assert run.returncodes == {"actor-0": EXIT_CONFIG_ERROR}, run.describe()
    message = run.termination["actor-0"]
    assert "roles.actor.lora.quantization: 4bit needs the bitsandbytes package" in message
    assert "not a Hugging Face model folder" not in run.logs["actor-0"]
