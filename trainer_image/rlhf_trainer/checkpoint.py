"""Checkpoints on the shared volume: `$RLHF_CHECKPOINT_DIR/step-<N>/<role>/` plus a job-level COMPLETE.

Layout of one step:

    step-12/
      actor/                 written as actor/.tmp then renamed: a crash never leaves a half role dir
        engine/              DeepSpeed engine state (every rank writes its shards), if the role trains
        state-rank0.pt       step, RNG states, data position, KL controller, ... of each rank
        MANIFEST.json        size and sha256 of every file above
      critic/ ...
      COMPLETE               JSON {"step", "roles"}: written by actor rank 0 only after every role saved

A restarted gang resumes from the newest step that has COMPLETE and whose files all match their
manifests; every process decides that alone from the files, so all roles pick the same step.

Resizing (issue 18, part 4): a role resumed by another number of ranks (or ZeRO stage) than saved its
step converts the saved DeepSpeed engine into DeepSpeed's universal checkpoint once (`<role>/universal/`,
deepspeed.checkpoint.ds_to_universal, ZeRO 1-3) and loads that, which reshards weights and optimizer
states; ranks beyond the saved world take rank 0's trainer state (data position, algorithm state) and a
fresh RNG stream of their own. Between ZeRO stages it moves a checkpoint only from 1 to 2 and back
(stage_change_problem). A checkpoint that cannot be loaded is a LayoutError (exit 78) naming the saved
and the current layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_trainer import distributed
from rlhf_trainer.errors import LayoutError

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
UNIVERSAL = "universal"  # a role's engine converted to DeepSpeed's universal format (after a resize)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = re.compile(r"^state-rank(\d+)\.pt$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step}"


def list_steps(root: str | Path) -> list[int]:
    """Step numbers that have a directory, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def is_complete(root: str | Path, step: int) -> bool:
    return (step_dir(root, step) / COMPLETE).is_file()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {size, sha256} of every file under `directory` (the manifest excluded)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


def role_dir_problem(directory: Path) -> str | None:
    """Why a saved role directory cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"{directory / MANIFEST}: unreadable ({exc})"
    for rel, want in manifest.items():
        path = directory / rel
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != want["size"]:
            return f"{path}: {path.stat().st_size} bytes, manifest says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{path}: checksum differs from the manifest"
    return None


def select_resume_step(root: str | Path, roles: list[str], log=print) -> int | None:
    """The newest COMPLETE step whose role directories all verify; None if there is none."""
    for step in reversed(list_steps(root)):
        if not is_complete(root, step):
            continue
        problems = [p for role in roles if (p := role_dir_problem(step_dir(root, step) / role))]
        if not problems:
            return step
        log(f"checkpoint step-{step} is marked COMPLETE but unusable, trying an older one: {problems[0]}")
    return None


def steps_to_prune(steps: list[int], complete: list[int], keep: int) -> list[int]:
    """Step dirs to delete: complete ones beyond the newest `keep`, and anything older than those kept."""
    kept = sorted(complete)[-keep:] if keep > 0 else []
    if not kept:
        return []
    return sorted(s for s in steps if s not in kept and s < max(kept))


def prune(root: str | Path, keep: int) -> list[int]:
    steps = list_steps(root)
    doomed = steps_to_prune(steps, [s for s in steps if is_complete(root, s)], keep)
    for step in doomed:
        shutil.rmtree(step_dir(root, step), ignore_errors=True)
    return doomed


def mark_complete(root: str | Path, step: int, roles: list[str]) -> None:
    write_json_atomic(step_dir(root, step) / COMPLETE, {"step": step, "roles": sorted(roles), "time": time.time()})


def unmark_complete(root: str | Path, step: int) -> None:
    """Before re-saving a step (after a restart), so a half-rewritten step never looks complete."""
    (step_dir(root, step) / COMPLETE).unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def saved_world_size(directory: Path) -> int:
    """How many ranks saved a role directory: one state-rank<N>.pt each."""
    return sum(1 for p in directory.iterdir() if _STATE_FILE.match(p.name)) if directory.is_dir() else 0


def to_universal(engine_dir: Path, out_dir: Path) -> None:
    """Convert a saved DeepSpeed engine (ZeRO 1-3) into the universal format at out_dir (deepspeed's own
    ds_to_universal, in a child process: it forks workers). Written aside and renamed: all or nothing."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(engine_dir),
           "--output_folder", str(tmp / "engine"), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ds_to_universal exited {done.returncode}: {(done.stderr or done.stdout)[-600:]}")
    os.replace(tmp, out_dir)


def stage_change_problem(saved_stage: int | None, stage: int | None) -> str | None:
    """Why a checkpoint saved at ZeRO `saved_stage` cannot be loaded at `stage`, or None. DeepSpeed's
    universal checkpoint (0.19) moves optimizer states between stages 1 and 2 only: stage 0 saves no ZeRO
    optimizer files for ds_to_universal to read, a stage-3 engine reads a global optimizer state file that a
    stage-1/2 source does not write, and a stage 3 source loads into no other stage (each tried on CPU)."""
    if saved_stage is None or stage is None or saved_stage == stage or {saved_stage, stage} <= {1, 2}:
        return None
    return (f"DeepSpeed's universal checkpoint moves optimizer states between ZeRO stages 1 and 2 only, not from "
            f"stage {saved_stage} to {stage}")


def seed_rank_stream(seed: int, rank: int) -> None:
    """The RNG stream of actor rank `rank` from the run's `seed`: seed + rank, as Accelerate's
    set_seed(device_specific=True) does. Called once the models are built (from the shared seed, so every
    rank holds the same weights) and before the first sample: with one seed on every rank, each rank drew
    the same random numbers, so row i of every rank sampled the same tokens (the same response for the
    same prompt), and the step's batch was worth one rank's rows. A resume then restores each rank's
    own saved stream (set_rng_state)."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def fresh_rng(step: int, rank: int) -> None:
    """A rank the saved world did not have: an RNG stream of its own, the same on every resume."""
    seed = (step * 1_000_003 + rank) % 2**63
    random.seed(seed)
    torch.manual_seed(seed)


class RoleCheckpointer:
    """Saves and loads one role's part of a step; collective over the role's world.

    `strategy` is the role's DeepSpeedStrategy, or None for a role without trainable state
    (reference, reward): it still writes its state file, so COMPLETE means "every role answered".
    """

    def __init__(self, root: str | Path, role: str, strategy=None):
        self.root, self.role, self.strategy = Path(root), role, strategy

    def save(self, step: int, state: dict[str, Any]) -> Path:
        rank = distributed.world_rank()
        final = step_dir(self.root, step) / self.role
        tmp = step_dir(self.root, step) / f".tmp-{self.role}"
        if rank == 0:
            # Left over from an attempt that crashed while saving this step.
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.role_barrier()
        if self.strategy is not None:
            self.strategy.save(str(tmp), {"step": step})
        layout = {"world_size": distributed.world_size(), "zero_stage": self._zero_stage()}
        torch.save({**state, "step": step, "rng": rng_state(), "layout": layout}, tmp / f"state-rank{rank}.pt")
        distributed.role_barrier()
        if rank == 0:
            write_json_atomic(tmp / MANIFEST, file_manifest(tmp))
            os.replace(tmp, final)
        distributed.role_barrier()
        return final

    def _zero_stage(self) -> int | None:
        return self.strategy.settings.zero_stage if self.strategy is not None else None

    def load(self, step: int) -> dict[str, Any]:
        """Restore engine + RNG; returns the saved state dict (step, data position, ...). LayoutError when the
        step was saved by another layout and cannot be resharded to this one."""
        directory = step_dir(self.root, step) / self.role
        rank, world = distributed.world_rank(), distributed.world_size()
        saved = saved_world_size(directory)
        state = torch.load(directory / f"state-rank{rank if rank < saved else 0}.pt", weights_only=False)
        saved_stage = (state.get("layout") or {}).get("zero_stage", self._zero_stage())
        if self.strategy is not None:
            # Without ZeRO every rank holds the whole optimizer: any world size loads it as saved.
            same_shards = saved == world or saved_stage == self._zero_stage() == 0
            if same_shards and saved_stage == self._zero_stage():
                self.strategy.load(str(directory))
            else:
                self._load_resharded(step, directory, saved, saved_stage)
        if rank < saved:
            set_rng_state(state["rng"])
        else:
            fresh_rng(step, rank)
        return state

    def _load_resharded(self, step: int, directory: Path, saved: int, saved_stage: int | None) -> None:
        """Another world size (or ZeRO stage) saved this step: through DeepSpeed's universal checkpoint."""
        rank, world = distributed.world_rank(), distributed.world_size()
        what = (f"checkpoint step-{step} of role {self.role} was saved by a data-parallel world of {saved} "
                f"(ZeRO stage {saved_stage}) and this job runs {world} (ZeRO stage {self._zero_stage()})")
        stage_problem = stage_change_problem(saved_stage, self._zero_stage())
        if stage_problem:  # decided from the files alone: every rank raises, none waits in a collective
            raise LayoutError(f"{what}; {stage_problem}. Resume with deepspeed.zeroStage {saved_stage} on the {self.role} "
                              f"(any number of ranks), or start from an empty checkpoint volume")
        advice = (f"Resume with {saved} {self.role} ranks (replicas x processesPerPod) at ZeRO stage {saved_stage}, "
                  f"or start from an empty checkpoint volume")
        universal = directory / UNIVERSAL
        problem = ""
        if rank == 0 and not universal.is_dir():
            try:
                to_universal(directory / "engine", universal)
            except (OSError, RuntimeError) as exc:
                problem = str(exc)
        # Every rank learns whether rank 0 converted it (no rank waits forever in a barrier).
        if distributed.all_reduce_sum(0.0 if problem else 1.0) < world:
            raise LayoutError(f"{what}; converting it to DeepSpeed's universal checkpoint failed"
                              f"{': ' + problem if problem else ' on rank 0'}. {advice}")
        try:
            self.strategy.load_universal(str(universal))
        except Exception as exc:  # noqa: BLE001 - whatever DeepSpeed raises, the answer is the same
            # A bare assert has no text: its type is the only clue.
            raise LayoutError(f"{what}; DeepSpeed could not load it as a universal checkpoint: "
                              f"{exc or type(exc).__name__}. {advice}") from exc
