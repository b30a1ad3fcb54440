"""Fetching and building the stack's servers into the shared cache, once.

Everything lands in ``stack.cache_dir`` (``~/.cache/sluiceway`` by default), outside any
checkout, and is written to a temporary name first and renamed when complete, so an
interrupted build is retried instead of being mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from devkit.settings import PROJECT_ROOT
from devkit.stack.exceptions import InstallError, ToolMissingError

Progress = Callable[[str], None]

KAFKA_POM = PROJECT_ROOT / "deploy" / "local" / "kafka" / "pom.xml"
MINIO_MODULE = "github.com/minio/minio"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.22.0"
HEARTBEAT_S = 15.0


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"'{name}' was not found on PATH; {hint}")
    return path


def run_with_heartbeat(
    argv: Sequence[str],
    log_path: Path,
    label: str,
    progress: Progress,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a long install step, logging its output and reporting progress every few seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
        while True:
            try:
                returncode = process.wait(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                progress(f"  ... {label}: {elapsed:.0f}s so far ({_last_line(log_path)})")
    if returncode != 0:
        raise InstallError(
            f"{label} failed with exit code {returncode}; see {log_path}: {_last_line(log_path)}"
        )
    progress(f"  {label}: done in {time.monotonic() - started:.0f}s")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:160] if lines else "no output yet"


def install_kafka(cache_dir: Path, version: str, progress: Progress) -> Path:
    """Resolve the Kafka broker jars with Maven; return the folder holding them."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    if libs.is_dir() and any(libs.glob(f"kafka_2.13-{version}.jar")):
        return libs
    mvn = require_tool("mvn", "install Maven (Debian: apt-get install maven) and a JDK 17+")
    require_tool("java", "install a JDK 17+ (Debian: apt-get install openjdk-17-jre-headless)")
    progress(f"resolving Apache Kafka {version} from Maven Central (first run only, ~30 s)")
    partial = libs.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    run_with_heartbeat(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            f"-Dkafka.version={version}",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ],
        cache_dir / "logs" / "kafka-install.log",
        f"Maven resolve of Kafka {version}",
        progress,
    )
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    return libs


def install_minio(cache_dir: Path, version: str, progress: Progress) -> Path:
    """Build MinIO from source through the Go module proxy; return the binary's path."""
    return go_install(
        cache_dir,
        MINIO_MODULE,
        version,
        "minio",
        f"building MinIO {version} from source (first run only, ~4 min on 2 cores)",
        progress,
    )


def install_helm(cache_dir: Path, version: str, progress: Progress) -> Path:
    """Build the ``helm`` CLI through the Go module proxy; return the binary's path.

    The chart tests render and lint ``deploy/helm/sluiceway`` with it; nothing of the
    product runs it.
    """
    return go_install(
        cache_dir,
        HELM_MODULE,
        version,
        "helm",
        f"building Helm {version} from source (first run only, ~1.5 min on 2 cores)",
        progress,
    )


def go_install(
    cache_dir: Path, package: str, version: str, name: str, announcement: str, progress: Progress
) -> Path:
    """``go install package@version`` into ``<cache_dir>/bin/<name>-<version>``, once."""
    binary = cache_dir / "bin" / f"{name}-{version}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    go = require_tool("go", f"install Go 1.24+ to build {name} from source")
    progress(announcement)
    gobin = cache_dir / "bin" / f"{name}.partial"
    shutil.rmtree(gobin, ignore_errors=True)
    env = dict(os.environ, GOBIN=str(gobin), GOFLAGS="-trimpath", CGO_ENABLED="0")
    run_with_heartbeat(
        [go, "install", f"{package}@{version}"],
        cache_dir / "logs" / f"{name}-build.log",
        f"go install {name}",
        progress,
        env=env,
    )
    (gobin / name).rename(binary)
    shutil.rmtree(gobin, ignore_errors=True)
    return binary


def install_triton(
    cache_dir: Path, pytriton_version: str, python: Path, progress: Progress
) -> Path:
    """Create Triton's venv from the ``nvidia-pytriton`` wheel and its python backend folder.

    Returns the install root, holding ``venv/`` and ``backends/python/``.
    """
    root = cache_dir / f"triton-pytriton-{pytriton_version}"
    complete = root / ".complete"
    if complete.is_file():
        return root
    if not python.is_file():
        raise ToolMissingError(
            f"{python} was not found; Triton's python backend stub links the system "
            "libpython3.11 (Debian: apt-get install python3.11 python3.11-venv), "
            "or set SLUICEWAY_STACK__TRITON_PYTHON"
        )
    progress(f"installing nvidia-pytriton {pytriton_version} (Triton 2.51) into its own venv")
    # A venv records its absolute path, so it is built in place; the marker file written
    # last tells a finished install from an interrupted one.
    shutil.rmtree(root, ignore_errors=True)
    log = cache_dir / "logs" / "triton-install.log"
    run_with_heartbeat(
        [str(python), "-m", "venv", str(root / "venv")], log, "venv for Triton", progress
    )
    run_with_heartbeat(
        [
            str(root / "venv" / "bin" / "pip"),
            "install",
            "--disable-pip-version-check",
            f"nvidia-pytriton=={pytriton_version}",
            "numpy",
        ],
        log,
        "pip install nvidia-pytriton",
        progress,
    )
    wheel = _site_packages(root / "venv") / "pytriton" / "tritonserver"
    backend = root / "backends" / "python"
    shutil.copytree(wheel / "backends" / "python", backend)
    stub = wheel / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    complete.write_text(pytriton_version, encoding="ascii")
    return root


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / "python3.11" / "site-packages"


def triton_paths(root: Path) -> tuple[Path, Path, Path, Path]:
    """Return (tritonserver binary, backend dir, shared-library dir, venv bin dir)."""
    site = _site_packages(root / "venv")
    return (
        site / "pytriton" / "tritonserver" / "bin" / "tritonserver",
        root / "backends",
        site / "nvidia_pytriton.libs",
        root / "venv" / "bin",
    )
