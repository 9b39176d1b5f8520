"""Start and stop the test control plane by hand (the test sessions use fixtures.py instead).

    python -m tests.controlplane up      # builds the binaries on first use, starts, prints KUBECONFIG
    export KUBECONFIG=.cache/controlplane-run/admin.kubeconfig
    kubectl get --raw /readyz; helm install ...; rlhf-operator operator ...
    python -m tests.controlplane down    # stops every process it started, removes the folder

Run from the repository root. The processes outlive `up` (they are not tied to it); `down` finds
them in <dir>/state.json. `--dir` picks another folder (one control plane per folder).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tests.controlplane import cluster

DEFAULT_DIR = cluster.REPO / ".cache" / "controlplane-run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.controlplane", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "build"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"working folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(cluster.binaries())
        return 0
    if args.command == "down":
        stopped = cluster.stop_recorded(args.dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        shutil.rmtree(args.dir, ignore_errors=True)
        return 0
    if (args.dir / "state.json").exists():
        print(f"{args.dir} already holds a control plane: run `python -m tests.controlplane down` first",
              file=sys.stderr)
        return 1
    try:
        cp = cluster.start(args.dir, tied=False)
    except cluster.ControlPlaneError as e:
        print(f"control plane did not start: {e}", file=sys.stderr)
        return 1
    print(f"kube-apiserver {cp.url} ready; logs in {cp.workdir / 'logs'}")
    print(f"export KUBECONFIG={cp.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
