"""Measure this checkout against another commit's, interleaved (the before / now benches' shared loop).

    results = against_commit("5af97c9", repeats=3, measure=lambda code: {"seconds": ...})
    results["before"], results["now"]  # one dict per repeat, in measurement order

The other commit is checked out with `git worktree` in a temporary folder for the run and removed after
it. The two checkouts alternate (before, now, now, before, ...) because this machine's speed drifts over
minutes; each measurement is printed as it comes.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def against_commit(commit: str, repeats: int, measure: Callable[[Path], dict]) -> dict[str, list[dict]]:
    """`measure(checkout root)` `repeats` times for `commit` ("before") and for this checkout ("now").

    Raises subprocess.CalledProcessError when git cannot check `commit` out."""
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), commit],
                       check=True, capture_output=True)
        try:
            checkouts = {"before": before, "now": ROOT}
            results: dict[str, list[dict]] = {name: [] for name in checkouts}
            for repeat in range(repeats):
                for name in (list(checkouts) if repeat % 2 == 0 else list(reversed(checkouts))):
                    result = measure(checkouts[name])
                    results[name].append(result)
                    shown = ", ".join(f"{key} {value:.2f}" for key, value in result.items()
                                      if isinstance(value, float))
                    print(f"repeat {repeat} {name}: {shown}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    return results
