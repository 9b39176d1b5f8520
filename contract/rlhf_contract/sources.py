"""Where models and datasets come from (docs/spec.md, Sources): one URI grammar for every path field.

    /models/llama, tiny://llama, synthetic://NAME   kind "image": used as is
    pvc://CLAIM[/SUBPATH]                              kind "pvc": the claim mounted read-only
    hf://ORG/NAME[@REVISION][/PATH]                    kind "hf": the Hugging Face Hub, fetched once per job
    s3://BUCKET/PREFIX                                 kind "s3": S3-compatible storage, fetched once per job

Remote sources (hf, s3) are fetched by the initializer (rlhf_trainer.initializer) into the job's source
cache, a folder of its checkpoint volume that every pod mounts read-only at FETCH_MOUNT; each source gets
the folder cache_dir_name() and a marker file once complete, so a gang restart finds it and fetches
nothing. The operator (builders) and the initializer both name folders with these functions, so the
trainer config's paths and the fetched folders always agree. Kubeflow Trainer's model and dataset
initializers (pkg/initializers, `hf://` storage URIs) are the anchor.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from rlhf_contract.knobs import Rule
from rlhf_contract.wire import CHECKPOINT_MOUNT

REMOTE_KINDS = ("hf", "s3")
REPO_TYPES = ("model", "dataset")  # Hugging Face repo types; a field's own decides (models vs datasets)
# Schemes the trainer itself understands; they pass through untouched.
PASSTHROUGH_SCHEMES = ("tiny", "synthetic")
SOURCE_ROOT = "/sources"  # fromJob exports at /sources/<job> (job names are DNS-1035 labels, never "_...")
FETCH_MOUNT = f"{SOURCE_ROOT}/_remote"  # the job's source cache, read-only in the trainer containers
PVC_MOUNT = f"{SOURCE_ROOT}/_pvc"  # pvc:// sources: /sources/_pvc/<claim>/<subPath>
CACHE_SUBDIR = "sources"  # the source cache's folder on the checkpoint volume
# The initializer writes the cache through the checkpoint volume's own mount, not a subPath mount: a
# subPath folder the kubelet creates is root's, which the trainer's uid could not write; the initializer
# creates it as the trainer's uid before any subPath mount of it is made (the trainer containers start
# after every init container).
INITIALIZER_CACHE = f"{CHECKPOINT_MOUNT}/{CACHE_SUBDIR}"
MARKER_SUFFIX = ".complete"  # <cache>/<folder>.complete: written after a complete fetch, holds the URI
PARTIAL_SUFFIX = ".partial"  # <cache>/<folder>.partial: a download in progress, removed when redone
HF_CACHE_DIR = ".hub"  # <cache>/.hub: huggingface_hub's cache (blobs, snapshots) of every hf source

FORMS = ("a path in the image, pvc://CLAIM[/SUBPATH], hf://ORG/NAME[@REVISION][/PATH] or "
         "s3://BUCKET/PREFIX")
_KNOWN_SCHEME = re.compile(r"^(tiny|synthetic|pvc|hf|s3)://")
# The CRD's share of parse_source() on every path field: a known scheme (the rest of each form is checked
# by parse_source in parse_spec, which names what is wrong).
SCHEME_RULE = Rule(lambda v: "://" not in v or bool(_KNOWN_SCHEME.match(v)),
                   "!self.contains('://') || self.matches('^(tiny|synthetic|pvc|hf|s3)://')",
                   "must be a path in the image or a source: tiny://, synthetic://, pvc://, hf:// or s3://")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # huggingface_hub's repo id rules, per part
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # DNS-1123 subdomain


@dataclass(frozen=True)
class SourceRef:
    """A parsed source. kind: image | pvc | hf | s3. location: image: the path; pvc: the claim; hf:
    ORG/NAME; s3: BUCKET/PREFIX. revision: hf only ("" = the default branch). inner: hf: a path inside
    the repository (a file of a dataset repo); pvc: the subPath ("" = the whole claim)."""

    kind: str
    location: str
    revision: str = ""
    inner: str = ""

    @property
    def remote(self) -> bool:
        return self.kind in REMOTE_KINDS


def _relative_path_problem(path: str) -> str | None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return f"path {path!r} must be relative, without empty, '.' or '..' parts"
    return None


def parse_source(text: str) -> SourceRef:
    """The SourceRef of a path field's value. Raises ValueError naming the form expected (FORMS)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme in PASSTHROUGH_SCHEMES:
        return SourceRef("image", text)
    rest = rest.rstrip("/")
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not _CLAIM.match(claim) or len(claim) > 253:
            raise ValueError(f"pvc://CLAIM: {claim!r} is not a claim name (a DNS-1123 subdomain)")
        problem = sub and _relative_path_problem(sub)
        if problem:
            raise ValueError(f"pvc://CLAIM/SUBPATH: {problem}")
        return SourceRef("pvc", claim, inner=sub)
    if scheme == "hf":
        parts = rest.split("/")
        if len(parts) < 2:
            raise ValueError(f"hf://ORG/NAME[@REVISION][/PATH]: {text!r} names no ORG/NAME")
        org, (name, _, revision) = parts[0], parts[1].partition("@")
        if not (_HF_NAME.match(org) and _HF_NAME.match(name)):
            raise ValueError(f"hf://ORG/NAME: {org}/{name!r} is not a repository id (letters, digits, '.', '_', '-')")
        if "@" in parts[1] and not _REVISION.match(revision):
            raise ValueError(f"hf://ORG/NAME@REVISION: {revision!r} is not a revision (a branch, tag or commit "
                             "without '/')")
        inner = "/".join(parts[2:])
        problem = inner and _relative_path_problem(inner)
        if problem:
            raise ValueError(f"hf://ORG/NAME/PATH: {problem}")
        return SourceRef("hf", f"{org}/{name}", revision=revision, inner=inner)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"s3://BUCKET/PREFIX: {bucket!r} is not a bucket name")
        if not prefix:
            raise ValueError("s3://BUCKET/PREFIX: the prefix (a folder or an object of the bucket) is required")
        problem = _relative_path_problem(prefix)
        if problem:
            raise ValueError(f"s3://BUCKET/PREFIX: {problem}")
        return SourceRef("s3", f"{bucket}/{prefix}")
    raise ValueError(f"unknown scheme {scheme}://; must be {FORMS}")


def source_uri(ref: SourceRef) -> str:
    """The canonical text of a parsed source (parse_source(source_uri(r)) == r)."""
    if ref.kind == "image":
        return ref.location
    if ref.kind == "hf":
        rev = f"@{ref.revision}" if ref.revision else ""
        return f"hf://{ref.location}{rev}" + (f"/{ref.inner}" if ref.inner else "")
    return f"{ref.kind}://{ref.location}" + (f"/{ref.inner}" if ref.inner else "")


def cache_dir_name(ref: SourceRef, repo_type: str) -> str:
    """The folder of a remote source in the job's source cache: readable and unique per (repository or
    prefix, revision, repo type); the inner path is not part of it (one fetch serves every file of a repo)."""
    key = f"{ref.kind}|{repo_type}|{ref.location}|{ref.revision}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ref.location).strip("-.")[:60]
    return f"{ref.kind}-{slug}-{digest}"


def s3_folder(prefix: str) -> str:
    """The name a fetched S3 prefix (or object) gets inside its cache folder: its last segment."""
    return prefix.rstrip("/").rsplit("/", 1)[-1]


def trainer_path(ref: SourceRef, repo_type: str) -> str:
    """Where the trainer finds a source inside its pod: image paths as they are, pvc sources at their
    mount, remote ones in the source cache (hf: the snapshot folder plus the inner path; s3: the last
    segment of the prefix, a folder or a file)."""
    if ref.kind == "image":
        return ref.location
    if ref.kind == "pvc":
        return pvc_mount_path(ref)
    base = f"{FETCH_MOUNT}/{cache_dir_name(ref, repo_type)}"
    if ref.kind == "hf":
        return f"{base}/{ref.inner}" if ref.inner else base
    return f"{base}/{s3_folder(ref.location.partition('/')[2])}"


def pvc_mount_path(ref: SourceRef) -> str:
    """The mountPath of a pvc source (the claim's subPath, read-only)."""
    return f"{PVC_MOUNT}/{ref.location}" + (f"/{ref.inner}" if ref.inner else "")


def s3_relative_key(key: str, prefix: str) -> str | None:
    """The path of object `key` under a fetched prefix's folder (its last segment first), or None when the
    key is outside the prefix: `models/llama` takes `models/llama` and `models/llama/...`, never
    `models/llama2/...`."""
    prefix = prefix.rstrip("/")
    if key != prefix and not key.startswith(prefix + "/"):
        return None
    parent = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    return key[len(parent):]


# The env the initializer reads (HF_TOKEN through huggingface_hub, the S3 names in rlhf_trainer.initializer.s3_client);
# the pod spec sets them from Secrets and spec.sources (a podTemplate may add the session token).
ENV_HF_TOKEN = "HF_TOKEN"
ENV_S3_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENV_S3_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_S3_REGION = "AWS_DEFAULT_REGION"
INITIALIZER_COMMAND = ("python", "-m", "rlhf_trainer.initializer")
INITIALIZER_CONTAINER = "source-initializer"


def initializer_args(items: list[tuple[str, SourceRef]], wait: bool) -> list[str]:
    """The initializer's arguments after INITIALIZER_COMMAND for remote sources [(repo type, ref)]: each
    once (a repository named by two fields, e.g. dataset and evalPath files of one repo, is one fetch)."""
    unique = dict.fromkeys(f"{repo_type}={source_uri(SourceRef(r.kind, r.location, r.revision))}"
                           for repo_type, r in items if r.remote)
    return ["--cache", INITIALIZER_CACHE, *(["--wait"] if wait else []), *unique]
