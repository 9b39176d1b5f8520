"""The source initializer (rlhf_trainer.initializer) against local stand-ins: huggingface_hub in offline
mode over a pre-populated hub cache, and moto's S3 server (a subprocess, tests/conftest.py) for S3-compatible storage."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rlhf_contract import wire
from rlhf_contract.sources import HF_CACHE_DIR, cache_dir_name, parse_source, trainer_path
from rlhf_operator.localexec import free_port
from rlhf_trainer import initializer

SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(cache: Path, repo: str, repo_type: str = "model", files: dict[str, str] | None = None) -> None:
    """What snapshot_download leaves in its cache (refs/main -> snapshots/<sha>/...), written by hand."""
    root = cache / HF_CACHE_DIR / f"{repo_type}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    for name, text in (files or {"config.json": "{}"}).items():
        path = root / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hf_fetch_once_links_the_snapshot_and_writes_the_marker(tmp_path, offline):
    _hub_cache(tmp_path, "org/tiny", files={"config.json": '{"a": 1}'})
    ref = parse_source("hf://org/tiny")
    assert initializer.ensure(tmp_path, "model", ref) is True
    folder = tmp_path / cache_dir_name(ref, "model")
    assert (folder / "config.json").read_text() == '{"a": 1}'
    assert (tmp_path / (folder.name + ".complete")).read_text().strip() == "hf://org/tiny"
    assert not os.path.isabs(os.readlink(folder))  # relative: valid wherever the volume is mounted
    assert initializer.ensure(tmp_path, "model", ref) is False  # a gang restart fetches nothing


def test_hf_dataset_file_inside_the_repo(tmp_path, offline):
    _hub_cache(tmp_path, "org/data", "dataset", {"train.jsonl": '{"prompt": "x"}\n'})
    ref = parse_source("hf://org/data/train.jsonl")
    initializer.ensure(tmp_path, "dataset", ref)
    inside = trainer_path(ref, "dataset").split("/", 3)[3]  # /sources/_remote/<folder>/train.jsonl
    assert (tmp_path / inside).read_text() == '{"prompt": "x"}\n'


def test_hf_missing_repo_is_a_source_error_and_nothing_is_marked(tmp_path, offline):
    ref = parse_source("hf://org/absent")
    with pytest.raises(initializer.SourceError, match="hf://org/absent"):
        initializer.ensure(tmp_path, "model", ref)
    assert not list(tmp_path.glob("*.complete"))


def test_partial_fetch_is_redone(tmp_path):
    ref = parse_source("s3://bucket/models/m")
    folder = cache_dir_name(ref, "model")
    calls = []

    def fake(ref, repo_type, cache, dest):
        calls.append(dest)
        dest.mkdir()
        (dest / "weights").write_text("ok")

    (tmp_path / folder).mkdir()
    (tmp_path / folder / "half-written").write_text("x")  # a fetch cut short: no marker
    assert initializer.ensure(tmp_path, "model", ref, {"s3": fake}) is True
    assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["weights"]
    assert initializer.ensure(tmp_path, "model", ref, {"s3": fake}) is False
    assert len(calls) == 1


@pytest.fixture
def s3_server(s3, monkeypatch):
    """moto's server (tests/conftest.py) with bucket `bucket` seeded, and the initializer's env pointing at it."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": s3.url}.items():
        monkeypatch.setenv(key, value)
    s3.client.make_bucket("bucket")
    for key in ("models/m/config.json", "models/m/sub/weights.bin", "models/m2/other.json", "data/train.jsonl"):
        s3.client.put_object("bucket", key, io.BytesIO(key.encode()), len(key))
    return s3.client


def test_s3_prefix_fetched_once_under_its_last_segment(tmp_path, s3_server, monkeypatch):
    ref = parse_source("s3://bucket/models/m")
    assert initializer.ensure(tmp_path, "model", ref) is True
    inside = tmp_path / trainer_path(ref, "model").split("/", 3)[3]
    files = sorted(str(p.relative_to(inside)) for p in inside.rglob("*") if p.is_file())
    assert files == ["config.json", "sub/weights.bin"]  # not models/m2/...
    assert (inside / "sub" / "weights.bin").read_bytes() == b"models/m/sub/weights.bin"
    s3_server.remove_object("bucket", "models/m/config.json")
    assert initializer.ensure(tmp_path, "model", ref) is False  # marker: no second fetch
    assert (inside / "config.json").exists()


def test_s3_single_object(tmp_path, s3_server):
    ref = parse_source("s3://bucket/data/train.jsonl")
    initializer.ensure(tmp_path, "dataset", ref)
    path = tmp_path / trainer_path(ref, "dataset").split("/", 3)[3]
    assert path.read_bytes() == b"data/train.jsonl"


def test_main_exits_config_error_naming_the_uri(tmp_path, s3_server, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv(wire.ENV_TERMINATION_LOG, str(log))
    code = initializer.main(["--cache", str(tmp_path / "cache"), "model=s3://bucket/nothing/here"])
    assert code == wire.EXIT_CONFIG_ERROR
    assert "s3://bucket/nothing/here" in log.read_text()
    assert not list((tmp_path / "cache").glob("*.complete"))


def test_s3_missing_bucket_names_the_uri_and_leaves_nothing(tmp_path, s3_server):
    ref = parse_source("s3://absent-bucket/models/m")
    with pytest.raises(initializer.SourceError, match=r"s3://absent-bucket/models/m: NoSuchBucket"):
        initializer.ensure(tmp_path, "model", ref)
    assert list(tmp_path.iterdir()) == []  # no marker, no folder, no .partial


def test_s3_public_bucket_without_credentials(tmp_path, s3_server, monkeypatch):
    # anyone may list and read `bucket` (AWS's public-read policy); the initializer then signs nothing
    statements = [{"Effect": "Allow", "Principal": "*", "Action": action, "Resource": resource}
                  for action, resource in (("s3:ListBucket", "arn:aws:s3:::bucket"),
                                           ("s3:GetObject", "arn:aws:s3:::bucket/*"))]
    s3_server.set_bucket_policy("bucket", json.dumps({"Version": "2012-10-17", "Statement": statements}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    ref = parse_source("s3://bucket/data/train.jsonl")
    assert initializer.ensure(tmp_path, "dataset", ref) is True
    assert (tmp_path / trainer_path(ref, "dataset").split("/", 3)[3]).read_bytes() == b"data/train.jsonl"


def test_s3_unreachable_endpoint_is_a_source_error(tmp_path, monkeypatch):
    port = free_port()  # reserved, so nothing listens on it
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # else minio asks the endpoint for the region first
    with pytest.raises(initializer.SourceError, match=rf"s3://bucket/m: MaxRetryError: .*127.0.0.1.*{port}"):
        initializer.ensure(tmp_path, "model", parse_source("s3://bucket/m"))
    assert not list(tmp_path.glob("*.complete"))


@pytest.mark.parametrize(("url", "expected"), [
    ("", ("s3.amazonaws.com", True)),
    ("http://minio.minio:9000", ("minio.minio:9000", False)),
    ("https://rgw.example.org/", ("rgw.example.org", True)),
])
def test_s3_endpoint_host_and_tls_from_the_scheme(url, expected):
    assert initializer.s3_endpoint(url) == expected


@pytest.mark.parametrize("url", ["ftp://minio:9000", "http://minio:9000/bucket", "minio:9000", "https://"])
def test_s3_endpoint_refuses_anything_but_a_host(url):
    with pytest.raises(initializer.SourceError, match=r"AWS_ENDPOINT_URL=.*spec\.sources\.s3\.endpoint"):
        initializer.s3_endpoint(url)


def test_s3_client_credentials_from_the_env():
    from minio.credentials import IamAwsProvider

    keys = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token",
            "AWS_ENDPOINT_URL": "https://minio:9000", "AWS_DEFAULT_REGION": "eu-1"}
    client = initializer.s3_client(keys)
    # minio keeps these private; it is pinned in constraints.txt
    creds = client._provider.retrieve()
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("id", "secret", "token")
    assert client._base_url.is_https and client._base_url.region == "eu-1"
    assert not initializer.s3_client({"AWS_ENDPOINT_URL": "http://minio:9000"})._base_url.is_https
    assert initializer.s3_client({})._provider is None  # anonymous: a public bucket
    irsa = initializer.s3_client({"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token", "AWS_ROLE_ARN": "r"})
    assert isinstance(irsa._provider, IamAwsProvider)
    with pytest.raises(initializer.SourceError, match="AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY"):
        initializer.s3_client({"AWS_ACCESS_KEY_ID": "id"})


def test_wait_returns_once_markers_exist_and_times_out_otherwise(tmp_path):
    ref = parse_source("s3://bucket/models/m")
    with pytest.raises(initializer.SourceError, match="not fetched"):
        initializer.wait_for(tmp_path, [("model", ref)], poll_seconds=0.01, timeout_seconds=0.05)
    initializer.ensure(tmp_path, "model", ref, {"s3": lambda r, t, c, dest: dest.mkdir()})
    initializer.wait_for(tmp_path, [("model", ref)], poll_seconds=0.01, timeout_seconds=1)


def test_bad_item_is_refused():
    with pytest.raises(initializer.SourceError, match="REPO_TYPE"):
        initializer.parse_item("weights=hf://org/name")
    with pytest.raises(initializer.SourceError, match="not a remote source"):
        initializer.parse_item("model=/models/tiny")


def test_hf_revision_resolves_its_own_ref(tmp_path, offline):
    _hub_cache(tmp_path, "org/tiny", files={"config.json": "main"})
    root = tmp_path / HF_CACHE_DIR / "models--org--tiny"
    (root / "refs" / "v1").write_text("f" * 40)
    (root / "snapshots" / ("f" * 40)).mkdir()
    (root / "snapshots" / ("f" * 40) / "config.json").write_text("v1")
    main_ref, v1_ref = parse_source("hf://org/tiny"), parse_source("hf://org/tiny@v1")
    initializer.ensure(tmp_path, "model", main_ref)
    initializer.ensure(tmp_path, "model", v1_ref)
    assert (tmp_path / cache_dir_name(main_ref, "model") / "config.json").read_text() == "main"
    assert (tmp_path / cache_dir_name(v1_ref, "model") / "config.json").read_text() == "v1"


def test_model_repos_skip_other_frameworks_weights_datasets_come_whole(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        snapshot = tmp_path / "snap" / repo_id
        snapshot.mkdir(parents=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    initializer.ensure(tmp_path / "cache", "model", parse_source("hf://org/m@v2"))
    initializer.ensure(tmp_path / "cache", "dataset", parse_source("hf://org/d/train.jsonl"))
    (model_repo, model_kwargs), (data_repo, data_kwargs) = calls
    assert model_repo == "org/m" and model_kwargs["revision"] == "v2" and model_kwargs["repo_type"] == "model"
    assert "*.gguf" in model_kwargs["ignore_patterns"] and "*.safetensors" not in model_kwargs["ignore_patterns"]
    assert data_repo == "org/d" and data_kwargs["ignore_patterns"] is None and data_kwargs["revision"] is None
