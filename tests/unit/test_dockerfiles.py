"""The image Dockerfiles, checked statically (no container engine on the CI machines).

Pinned bases, a non-root user, entry points that exist in the code, COPY sources that exist,
pip pins equal to constraints.txt, exposed ports equal to the contract, and a wheel built from
exactly the files each Dockerfile copies (so `pip install .` in the image cannot miss a file).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rlhf_contract import wire
from rlhf_operator import constants
from rlhf_operator.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"
TRAINER_CPU = REPO / "trainer_image" / "Dockerfile.cpu"
ALL = [OPERATOR, TRAINER, TRAINER_CPU]
TRAINERS = [TRAINER, TRAINER_CPU]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; line = where it starts."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        keyword, _, args = (buffer + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    return out


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, value = ins.args.split("=", 1)
            args[name] = value
    return args


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def by_keyword(path: Path, keyword: str) -> list[Instruction]:
    return [i for i in parse_dockerfile(path) if i.keyword == keyword]


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_every_base_image_is_pinned_to_an_exact_release_or_digest(path):
    froms = by_keyword(path, "FROM")
    assert froms
    for ins in froms:
        image = ins.args.split()[0]
        assert "$" not in image, f"{path.name}:{ins.line}: base {image} depends on a build arg"
        if "@sha256:" in image:
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{path.name}:{ins.line}: bad digest {image}"
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{path.name}:{ins.line}: {image} has no tag"
        assert re.match(r"^\d+\.\d+\.\d+", tag), f"{path.name}:{ins.line}: {image} is not an exact x.y.z release"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_runs_as_uid_1000_created_in_the_image(path):
    users = by_keyword(path, "USER")
    assert users, f"{path.name}: no USER: the image would run as root"
    assert users[-1].args.split(":")[0] == str(wire.TRAINER_UID)
    runs = " ".join(i.args for i in by_keyword(path, "RUN"))
    assert re.search(rf"useradd [^&]*--uid {wire.TRAINER_UID}\b", runs)
    # The chart runs the operator as the same uid, and the image's last instructions are not root.
    chart_values = yaml.safe_load((REPO / "charts/rlhf-operator/values.yaml").read_text())
    assert chart_values["securityContext"]["runAsUser"] == wire.TRAINER_UID


def entrypoint(path: Path) -> list[str]:
    entry = by_keyword(path, "ENTRYPOINT")
    assert len(entry) == 1, f"{path.name}: expected one ENTRYPOINT"
    return json.loads(entry[0].args)  # exec form, so signals reach the process


def test_operator_entrypoint_is_the_console_script_subcommand():
    command = entrypoint(OPERATOR)
    assert command == ["rlhf-operator", "operator"]
    target = pyproject()["project"]["scripts"][command[0]]
    module, func = target.split(":")
    assert (module, func) == ("rlhf_operator.cli", "main")
    assert build_parser().parse_args(command[1:]).command == "operator"
    # The chart passes flags only, so the entry point stays in charge.
    deployment = (REPO / "charts/rlhf-operator/templates/operator/deployment.yaml").read_text()
    assert "command:" not in deployment and "args:" in deployment


@pytest.mark.parametrize("path", TRAINERS, ids=lambda p: p.name)
def test_trainer_entrypoint_is_the_pod_command_and_exists(path):
    assert entrypoint(path) == list(wire.TRAINER_COMMAND)
    main = REPO / "trainer_image" / "rlhf_trainer" / "__main__.py"
    assert main.exists(), "trainer_image/rlhf_trainer/__main__.py missing: `python -m rlhf_trainer` would fail"
    defined = {n.name for n in ast.parse(main.read_text()).body if isinstance(n, ast.FunctionDef)}
    script = pyproject()["project"]["scripts"]["rlhf-trainer"]
    assert script == "rlhf_trainer.__main__:main" and "main" in defined


def copy_sources(path: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (the repository root)."""
    pairs = []
    for ins in by_keyword(path, "COPY"):
        parts = [p for p in ins.args.split() if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in ins.args.split()), "multi-stage copy: extend this test"
        *sources, dest = parts
        pairs += [(s, dest) for s in sources]
    return pairs


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_every_copy_source_exists_in_the_build_context(path):
    pairs = copy_sources(path)
    assert pairs
    for source, _ in pairs:
        assert (REPO / source).exists(), f"{path.relative_to(REPO)}: COPY {source} does not exist"


def pip_pins(path: Path) -> dict[str, str]:
    """name -> version for every `name==version` a RUN line installs."""
    pins = {}
    for ins in by_keyword(path, "RUN"):
        if "pip install" not in ins.args:
            continue
        for name, version in re.findall(r'"?([A-Za-z0-9_.\-]+)==([^"\s]+)"?', ins.args):
            pins[normalize(name)] = version
    return pins


def install_sh_torch() -> str:
    match = re.search(r"TORCH=\$\{TORCH_VERSION:-([^}]+)\}", (REPO / "scripts/install.sh").read_text())
    assert match, "scripts/install.sh no longer sets the default torch version"
    return match.group(1)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_pip_pins_match_constraints_and_project_installs_use_them(path):
    pins = constraint_pins()
    args = build_args(parse_dockerfile(path))
    for name, version in pip_pins(path).items():
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], version)
        expected = install_sh_torch() if name == "torch" else pins.get(name)
        assert expected, f"{path.name}: {name} is pinned in the image but not in constraints.txt"
        assert resolved == expected, f"{path.name}: {name}=={resolved}, CI tests {expected}"
    project_installs = [i for i in by_keyword(path, "RUN") if re.search(r'pip install .*"?\.\[', i.args)]
    assert project_installs, f"{path.name}: never installs the project"
    for ins in project_installs:
        assert "-c constraints.txt" in ins.args, f"{path.name}:{ins.line}: project install without constraints.txt"


@pytest.mark.parametrize("path, extra", [(OPERATOR, "operator"), (TRAINER, "trainer,trackers"),
                                         (TRAINER_CPU, "trainer,trackers")],
                         ids=["operator", "trainer", "trainer-cpu"])
def test_every_dependency_the_image_installs_is_pinned(path, extra):
    project = pyproject()["project"]
    requirements = project["dependencies"] + [r for e in extra.split(",") for r in project["optional-dependencies"][e]]
    assert f'".[{extra}]"' in " ".join(i.args for i in by_keyword(path, "RUN"))
    pins, image_pins = constraint_pins(), pip_pins(path)
    for requirement in requirements:
        name = requirement_name(requirement)
        assert name in pins or name in image_pins, f"{name} ({extra}) has no == pin: the image is not reproducible"


def test_torch_builds_cuda_and_cpu():
    cuda, cpu = build_args(parse_dockerfile(TRAINER)), build_args(parse_dockerfile(TRAINER_CPU))
    assert re.search(r"/whl/cu\d+$", cuda["TORCH_INDEX_URL"])
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert cuda["TORCH_VERSION"] == cpu["TORCH_VERSION"] == install_sh_torch()
    assert by_keyword(TRAINER, "FROM")[0].args.startswith("nvidia/cuda:")


@pytest.mark.parametrize("path, ports", [
    (OPERATOR, {constants.OPERATOR_METRICS_PORT, 8081}),
    (TRAINER, {wire.TRAINER_METRICS_PORT, wire.ROLE_PORT, wire.BRIDGE_PORT}),
    (TRAINER_CPU, {wire.TRAINER_METRICS_PORT, wire.ROLE_PORT, wire.BRIDGE_PORT}),
], ids=["operator", "trainer", "trainer-cpu"])
def test_exposed_ports_are_the_contract_ports(path, ports):
    exposed = {int(p) for ins in by_keyword(path, "EXPOSE") for p in ins.args.split()}
    assert exposed == ports
    if path == OPERATOR:
        values = yaml.safe_load((REPO / "charts/rlhf-operator/values.yaml").read_text())
        assert {values["metrics"]["port"], values["healthPort"]} == ports


@pytest.mark.parametrize("path, package, module", [
    (OPERATOR, "rlhf_operator", "rlhf_operator/cli.py"),
    (TRAINER, "rlhf_trainer", "rlhf_trainer/__main__.py"),
    (TRAINER_CPU, "rlhf_trainer", "rlhf_trainer/__main__.py"),
], ids=["operator", "trainer", "trainer-cpu"])
def test_project_builds_from_exactly_the_copied_files(path, package, module, tmp_path):
    """Copy what the Dockerfile copies into an empty context and build the wheel it would install."""
    context = tmp_path / "context"
    workdir = next(i.args for i in by_keyword(path, "WORKDIR"))
    for source, dest in copy_sources(path):
        # Destinations are relative to WORKDIR (or absolute inside it).
        target = context / (Path(dest).relative_to(workdir) if dest.startswith("/") else Path(dest))
        if dest.endswith("/") or dest in (".", "./"):
            target = target / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / source, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert module in names, f"{path.name}: the installed package would lack {module}"
    assert any(n.startswith(f"{package}/") for n in names)
    assert "rlhf_contract/config.py" in names, f"{path.name}: the image would lack the contract package"


def test_bitsandbytes_is_in_every_trainer_image_and_ci():
    # Its CUDA kernels and its CPU backend both load a quantized base (rlhf_trainer.quantization), so the
    # CPU image and CI's install hold it too: tests/integration/test_trainer_qlora.py runs QLoRA on CPU.
    assert any(r.startswith("bitsandbytes") for r in pyproject()["project"]["optional-dependencies"]["trainer"])
    for image in (TRAINER, TRAINER_CPU):
        assert "trainer" in " ".join(i.args for i in by_keyword(image, "RUN"))
