"""rlhf_trainer.pretrained: the cache folder is written atomically and keyed by the wheel's version."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rlhf_trainer import pretrained
from rlhf_trainer.errors import ConfigError


def test_cache_key_changes_with_the_package_version():
    assert pretrained.cache_key("smollm2-135m-instruct", "0.1.2") == "smollm2-135m-instruct-0.1.2"
    assert pretrained.cache_key("m", "0.1.2") != pretrained.cache_key("m", "0.1.3")


def test_cache_root_follows_the_env(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "models"))
    assert pretrained.default_cache_root() == tmp_path / "models"
    monkeypatch.delenv(pretrained.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.default_cache_root() == tmp_path / "xdg" / "rlhf-operator" / "models"


def test_a_completed_write_appears_under_the_final_name_only(tmp_path):
    final = tmp_path / "cache" / "model-1"
    pretrained.write_atomically(final, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (final / "config.json").read_text() == "{}"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model-1"]


def test_a_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "model-1"

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.write_atomically(final, crash)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_builders_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    final = tmp_path / "model-1"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model-1{pretrained.TMP_MARK}{dead.pid}"
    live = tmp_path / f".model-1{pretrained.TMP_MARK}{os.getpid()}"
    stale.mkdir()
    live.mkdir()
    assert pretrained.remove_stale_temporaries(final) == [stale]
    assert live.is_dir() and not stale.exists()


def test_losing_a_race_keeps_the_other_builders_folder(tmp_path):
    final = tmp_path / "model-1"

    def other_builder_finishes_first(tmp):
        (tmp / "config.json").write_text("mine")
        final.mkdir()
        (final / "config.json").write_text("theirs")

    pretrained.write_atomically(final, other_builder_finishes_first)
    assert (final / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1"]


def test_a_missing_wheel_is_a_config_error_naming_the_package_and_the_script():
    with pytest.raises(ConfigError, match=r"'no-such-dist' is not installed .*build_smollm2\.sh"):
        pretrained.packaged_gguf("no-such-dist", "x.gguf")
