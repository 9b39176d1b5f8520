"""A stand-in for a local-path volume provisioner (what kind ships as its default StorageClass).

    python -m tests.controlplane.provisioner --kubeconfig admin.kubeconfig --root VOLUMES \
        --provisioner rlhf.dev/stand-in-local-path --storage-class standard

cluster.py starts it next to the control plane. It plays the external-provisioner half of dynamic
provisioning, the controller-manager's PV binder does the rest, as with any CSI driver:

- a claim of the class that is Pending and unbound gets a PersistentVolume `pvc-<claim uid>` of the
  requested size and access modes, whose hostPath is a fresh folder under --root and whose claimRef
  pre-binds it to the claim (the PV binder then binds the claim to it);
- a PersistentVolume it provisioned that turns Released (its claim deleted) with reclaim policy
  Delete is deleted with its folder (the PV binder leaves that to the external provisioner named in
  `pv.kubernetes.io/provisioned-by`).

The stand-in kubelet (nodes.py) mounts a pod's claim by following claim -> volume -> hostPath.
Level-based: watches only wake the loop; each pass lists claims and volumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("provisioner")
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
RESYNC_SECONDS = 5.0


def volume_for(claim: dict[str, Any], root: Path, provisioner: str) -> dict[str, Any]:
    """The PersistentVolume that serves `claim` (a PVC as JSON) from a folder under `root`."""
    meta, spec = claim["metadata"], claim["spec"]
    folder = root / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {PROVISIONED_BY: provisioner}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec["storageClassName"],
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                         "name": meta["name"], "uid": meta["uid"]},
        },
    }


def wants_volume(claim: dict[str, Any], storage_class: str) -> bool:
    return (claim["spec"].get("storageClassName") == storage_class and not claim["spec"].get("volumeName")
            and claim.get("status", {}).get("phase", "Pending") == "Pending"
            and not claim["metadata"].get("deletionTimestamp"))


def to_delete(volume: dict[str, Any], provisioner: str) -> bool:
    return (volume["metadata"].get("annotations", {}).get(PROVISIONED_BY) == provisioner
            and volume.get("status", {}).get("phase") in ("Released", "Failed")
            and volume["spec"].get("persistentVolumeReclaimPolicy") == "Delete")


class Provisioner:
    def __init__(self, api: client.CoreV1Api, root: Path, provisioner: str, storage_class: str):
        self.api, self.root, self.provisioner, self.storage_class = api, root, provisioner, storage_class
        self.wake = threading.Event()

    def sync_once(self) -> None:
        volumes = _json(self.api.list_persistent_volume(_preload_content=False))["items"]
        existing = {v["metadata"]["name"] for v in volumes}
        for claim in _json(self.api.list_persistent_volume_claim_for_all_namespaces(_preload_content=False))["items"]:
            if wants_volume(claim, self.storage_class) and f"pvc-{claim['metadata']['uid']}" not in existing:
                pv = volume_for(claim, self.root, self.provisioner)
                Path(pv["spec"]["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)
                try:
                    self.api.create_persistent_volume(pv)
                    log.info("provisioned %s for %s/%s", pv["metadata"]["name"], claim["metadata"]["namespace"],
                             claim["metadata"]["name"])
                except ApiException as e:
                    if e.status != 409:
                        raise
        for volume in volumes:
            if to_delete(volume, self.provisioner):
                shutil.rmtree(volume["spec"]["hostPath"]["path"], ignore_errors=True)
                try:
                    self.api.delete_persistent_volume(volume["metadata"]["name"])
                    log.info("deleted released %s", volume["metadata"]["name"])
                except ApiException as e:
                    if e.status != 404:
                        raise

    def watch_loop(self, list_call) -> None:
        while True:
            try:
                for _ in watch.Watch().stream(list_call, timeout_seconds=60, _request_timeout=70):
                    self.wake.set()
            except Exception as e:  # noqa: BLE001 - a broken watch only delays: the resync covers it
                log.debug("watch restarts: %s", e)
                threading.Event().wait(0.5)

    def run(self) -> None:
        for call in (self.api.list_persistent_volume_claim_for_all_namespaces, self.api.list_persistent_volume):
            threading.Thread(target=self.watch_loop, args=(call,), daemon=True).start()
        ready = self.root / ".ready"
        while True:
            self.wake.clear()
            try:
                self.sync_once()
                if not ready.exists():
                    ready.parent.mkdir(parents=True, exist_ok=True)
                    ready.touch()
            except Exception:  # noqa: BLE001 - keep provisioning; the next pass retries
                log.exception("provisioner pass failed")
            self.wake.wait(RESYNC_SECONDS)


def _json(response) -> Any:
    return json.loads(response.data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, type=Path, help="folder holding every provisioned volume")
    parser.add_argument("--provisioner", required=True, help="the StorageClass's provisioner name")
    parser.add_argument("--storage-class", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
    Provisioner(api, args.root, args.provisioner, args.storage_class).run()


if __name__ == "__main__":
    main()
