"""The source initializer: fetch a job's remote models and datasets once into its source cache.

    python -m rlhf_trainer.initializer --cache DIR [--wait] REPO_TYPE=URI ...

Run as the init container of the gang's pods (rlhf_operator.builders.initializer_container): the first
pod fetches, the others `--wait` for the markers. For each source (rlhf_contract.sources):

    <cache>/<folder>.complete exists and names the URI  -> nothing to do (a gang restart)
    else: remove <folder> and <folder>.partial (a fetch cut short), fetch, then write the marker

hf:// goes through huggingface_hub.snapshot_download into <cache>/.hub (its own cache, which keeps the
blobs a cut-short fetch completed) and <folder> becomes a relative link to the snapshot; s3:// lists the
prefix with the minio client (any S3-compatible store) and downloads into <folder>.partial, renamed to
<folder> when complete. Credentials come from the env the pod spec sets from Secrets: HF_TOKEN (read by
huggingface_hub), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION (read by s3_client). Kubeflow Trainer's
initializers (pkg/initializers/model/huggingface.py, dataset/huggingface.py) are the anchor.

A source that cannot be fetched (no such repository or prefix, refused credentials) exits with
EXIT_CONFIG_ERROR and its message in the termination log, naming the URI; nothing is left marked complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rlhf_contract import wire
from rlhf_contract.sources import (
    ENV_S3_ACCESS_KEY_ID,
    ENV_S3_ENDPOINT,
    ENV_S3_REGION,
    ENV_S3_SECRET_ACCESS_KEY,
    ENV_S3_SESSION_TOKEN,
    HF_CACHE_DIR,
    MARKER_SUFFIX,
    PARTIAL_SUFFIX,
    REPO_TYPES,
    SourceRef,
    cache_dir_name,
    parse_source,
    s3_relative_key,
    source_uri,
)


class SourceError(Exception):
    """A source that cannot be fetched (permanent: retrying the gang will not help)."""


def parse_item(text: str) -> tuple[str, SourceRef]:
    """`REPO_TYPE=URI` -> (repo type, remote SourceRef). Raises SourceError for anything else."""
    repo_type, sep, uri = text.partition("=")
    if not sep or repo_type not in REPO_TYPES:
        raise SourceError(f"{text!r}: expected REPO_TYPE=URI with REPO_TYPE one of {', '.join(REPO_TYPES)}")
    try:
        ref = parse_source(uri)
    except ValueError as exc:
        raise SourceError(f"{uri}: {exc}") from None
    if not ref.remote:
        raise SourceError(f"{uri}: not a remote source (hf:// or s3://)")
    return repo_type, ref


def marker_path(cache: Path, folder: str) -> Path:
    return cache / (folder + MARKER_SUFFIX)


def is_complete(cache: Path, folder: str, uri: str) -> bool:
    """Whether a complete fetch of `uri` into `folder` is recorded (the marker names the same URI)."""
    marker = marker_path(cache, folder)
    return marker.is_file() and marker.read_text().strip() == uri and (cache / folder).exists()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# Files of model repositories that transformers does not load: other frameworks' and runtimes' copies of
# the weights (the original checkpoint, GGUF, ONNX, Flax, TF, Core ML, OpenVINO). PyTorch .bin weights stay:
# older repositories have nothing else.
HF_MODEL_IGNORE = ("original/*", "*.pth", "*.gguf", "*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.ot",
                   "*.tflite", "coreml/*", "openvino/*")


def fetch_hf(ref: SourceRef, repo_type: str, cache: Path, dest: Path) -> None:
    """snapshot_download into the hub cache <cache>/.hub (model repositories without HF_MODEL_IGNORE), then
    `dest` -> a relative link to the snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot = snapshot_download(ref.location, repo_type=repo_type, revision=ref.revision or None,
                                     cache_dir=str(cache / HF_CACHE_DIR),
                                     ignore_patterns=list(HF_MODEL_IGNORE) if repo_type == "model" else None)
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise SourceError(f"{source_uri(ref)}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    link = dest.with_name(dest.name + PARTIAL_SUFFIX)
    link.symlink_to(os.path.relpath(snapshot, dest.parent))
    link.replace(dest)


# The web identity (IRSA) and container credential (EKS Pod Identity, ECS) env that minio's IamAwsProvider reads.
ENV_S3_ROLE_CREDENTIALS = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                           "AWS_CONTAINER_CREDENTIALS_FULL_URI")
AWS_S3_HOST = "s3.amazonaws.com"


def s3_endpoint(url: str) -> tuple[str, bool]:
    """$AWS_ENDPOINT_URL (spec.sources.s3.endpoint) -> (host[:port], TLS on): "" is AWS over https,
    `http://minio.minio:9000` -> ("minio.minio:9000", False). Raises SourceError for another scheme or
    a path (an S3 endpoint is a host)."""
    if not url:
        return AWS_S3_HOST, True
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise SourceError(f"{ENV_S3_ENDPOINT}={url}: expected http(s)://HOST[:PORT] (spec.sources.s3.endpoint)")
    return parts.netloc, parts.scheme == "https"


def s3_client(env: Mapping[str, str]) -> Any:
    """A minio client for the S3-compatible store the env names: endpoint from $AWS_ENDPOINT_URL (TLS from
    its scheme; minio addresses any host but AWS's path-style, as MinIO and Ceph RGW need), region from
    $AWS_DEFAULT_REGION, credentials from $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY / $AWS_SESSION_TOKEN
    (the spec.sources.s3 Secret), else the pod's role (ENV_S3_ROLE_CREDENTIALS), else anonymous (a public
    bucket). Raises SourceError for a bad endpoint or a key without its secret."""
    from minio import Minio
    from minio.credentials import IamAwsProvider

    host, secure = s3_endpoint(env.get(ENV_S3_ENDPOINT, ""))
    key, secret = env.get(ENV_S3_ACCESS_KEY_ID), env.get(ENV_S3_SECRET_ACCESS_KEY)
    if key and not secret:
        raise SourceError(f"{ENV_S3_ACCESS_KEY_ID} is set without {ENV_S3_SECRET_ACCESS_KEY} "
                          "(spec.sources.s3.credentialsSecret needs both keys)")
    role = None if key or not any(env.get(name) for name in ENV_S3_ROLE_CREDENTIALS) else IamAwsProvider()
    return Minio(host, access_key=key or None, secret_key=secret or None,
                 session_token=env.get(ENV_S3_SESSION_TOKEN) or None, secure=secure,
                 region=env.get(ENV_S3_REGION) or None, credentials=role)


def download(client: Any, bucket: str, key: str, target: Path) -> None:
    """One object into `target` (inside the .partial folder), streamed: a GET without minio fget_object's
    HEAD first (one request per object; stores such as moto refuse an anonymous HEAD a public-read
    policy allows)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    response = client.get_object(bucket, key)
    try:
        with target.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    finally:
        response.close()
        response.release_conn()


def fetch_s3(ref: SourceRef, repo_type: str, cache: Path, dest: Path) -> None:
    """Every object under the prefix into <dest>.partial/<last segment of the prefix>/..., then renamed."""
    from minio.error import MinioException
    from urllib3.exceptions import HTTPError

    bucket, _, prefix = ref.location.partition("/")
    partial = dest.with_name(dest.name + PARTIAL_SUFFIX)
    client = s3_client(os.environ)
    try:
        count = 0
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            key = obj.object_name or ""
            relative = s3_relative_key(key, prefix)
            if relative is None or key.endswith("/"):
                continue
            download(client, bucket, key, partial / relative)
            count += 1
    except MinioException as exc:
        code = getattr(exc, "code", None)  # S3Error: NoSuchBucket, AccessDenied, ...
        raise SourceError(f"{source_uri(ref)}: {code}: {exc.message}" if code else f"{source_uri(ref)}: {exc}") \
            from None
    except (HTTPError, ValueError) as exc:  # no answer from the endpoint; a name minio refuses
        raise SourceError(f"{source_uri(ref)}: {type(exc).__name__}: {exc}") from None
    if not count:
        raise SourceError(f"{source_uri(ref)}: no object under this prefix")
    partial.replace(dest)


FETCHERS: dict[str, Callable[[SourceRef, str, Path, Path], None]] = {"hf": fetch_hf, "s3": fetch_s3}


def ensure(cache: Path, repo_type: str, ref: SourceRef,
           fetchers: dict[str, Callable[[SourceRef, str, Path, Path], None]] | None = None) -> bool:
    """Fetch one source unless a complete fetch is recorded; True when it fetched. A fetch cut short
    (no marker) is removed and done again; the marker is written last."""
    folder, uri = cache_dir_name(ref, repo_type), source_uri(ref)
    if is_complete(cache, folder, uri):
        return False
    cache.mkdir(parents=True, exist_ok=True)
    for stale in (marker_path(cache, folder), cache / folder, cache / (folder + PARTIAL_SUFFIX)):
        _remove(stale)
    (fetchers or FETCHERS)[ref.kind](ref, repo_type, cache, cache / folder)
    marker_path(cache, folder).write_text(uri + "\n")
    return True


def wait_for(cache: Path, items: list[tuple[str, SourceRef]], poll_seconds: float = 2.0,
             timeout_seconds: float = 0.0) -> None:
    """Block until every source's marker exists (another pod fetches); timeout 0 = no limit (the gang's
    restart ends a wait whose fetcher failed). Raises SourceError on timeout."""
    start = time.monotonic()
    while True:
        missing = [source_uri(r) for t, r in items if not is_complete(cache, cache_dir_name(r, t), source_uri(r))]
        if not missing:
            return
        if timeout_seconds and time.monotonic() - start > timeout_seconds:
            raise SourceError(f"not fetched after {timeout_seconds:.0f}s: {', '.join(missing)}")
        time.sleep(poll_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_trainer.initializer", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path, help="the job's source cache folder")
    parser.add_argument("--wait", action="store_true", help="wait for another pod's fetch instead of fetching")
    parser.add_argument("items", nargs="+", metavar="REPO_TYPE=URI")
    args = parser.parse_args(argv)
    try:
        items = [parse_item(text) for text in args.items]
        if args.wait:
            wait_for(args.cache, items)
        for repo_type, ref in [] if args.wait else items:
            fetched = ensure(args.cache, repo_type, ref)
            print(f"{source_uri(ref)}: {'fetched' if fetched else 'already fetched'}", flush=True)
    except SourceError as exc:
        message = f"source initializer: {exc}"
        print(message, file=sys.stderr)
        log = os.environ.get(wire.ENV_TERMINATION_LOG, wire.TERMINATION_LOG)
        try:
            Path(log).write_text(message)
        except OSError:
            pass
        return wire.EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
