"""A real local Ray head with token authentication for job-submission tests, and `submit` run as a user would.

The head is started with `ray start --head --block` in its own process group and ended by killing that
group, never with `ray stop`, which would also end the Ray instances other tests run at the same time.
Start-up takes about 12 s on 2 cores: share one per test module (the `ray_head` fixture in conftest).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RayHead:
    address: str
    token: str


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH and no Ray address or token of its own."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RAY_AUTH_", "MLFLOW_", "PIPELINE_SUBMIT_"))
        and name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def stop_process_group(process: subprocess.Popen, grace_s: float = 2.0) -> None:
    # SIGTERM alone leaves gcs_server and the monitor running; SIGKILL after a grace period ends them.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.2)
    process.wait(timeout=10)


def wait_for_jobs_api(address: str, token: str, head: subprocess.Popen, log: Path, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            response = requests.get(
                f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=2
            )
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"the jobs API at {address} did not come up in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def started_ray_head() -> Iterator[RayHead]:
    if not (VENV_BIN / "ray").exists():
        raise FileNotFoundError("the `ray` command is not installed next to this Python")
    # Short: Ray's socket paths under --temp-dir must stay within the 107-byte AF_UNIX limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    token = secrets.token_hex(32)
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    address = f"http://127.0.0.1:{dashboard_port}"
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Fixed by default (10001, 52365): another Ray on this machine would collide.
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir / 'ray'}",
    ]
    log = temp_dir / "head.log"
    # The job's entrypoint inherits the head's environment: venv first on PATH, the token to rejoin.
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    with log.open("wb") as log_file:
        head = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_jobs_api(address, token, head, log, timeout_s=90)
        yield RayHead(address=address, token=token)
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def copy_project(destination: Path) -> Path:
    """The repository's files as a clone would have them (tracked + untracked, minus .gitignore'd)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = REPO_ROOT / relative
        if source.is_file():  # others edit this tree right now: a listed file may be gone
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def submit(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
