"""A cluster in a box: Ray hosts that share only the network, and the shared services a real cluster needs,
on one Linux machine (as root), to rehearse a cluster set-up before paying for one.

    .venv/bin/python -m cluster.box rehearse     # up, the whole pipeline as a Ray job, results home, down
    .venv/bin/python -m cluster.box up           # up until Ctrl-C; prints the settings to export

Each host is a network namespace with its own address on a bridge, and its own mount and UTS namespaces: a
private `/tmp`, `/dev/shm` and `$HOME` and its own host name, so a file one host writes is not there on
another. The hosts share the software (this Python environment, as the nodes of a real cluster share an
image) and nothing else. One host is the Ray head (`ray start --head`, the jobs API), the others Ray
workers, each with 1 CPU. Beside them, in this machine's own namespace and reached over the bridge:
- an S3 server (moto's server mode) with one bucket for the DVC remote, Ray's `storage_path` and MLflow's
  artifacts;
- an MLflow tracking server on a PostgreSQL database (a private PostgreSQL cluster in the box's folder),
  with `--artifacts-destination s3://<bucket>/mlflow`.
The "laptop" is the calling process: it submits to the head's jobs API and pulls results from the bucket.
The hosts carry S3 credentials in their environment, as cluster nodes carry an instance role; the laptop
has its own (`laptop_env`).

`down` ends every process the box started, by PID (the services) and by namespace (`ip netns pids`), then
deletes the namespaces and the bridge; the hosts' mounts go with their last process. It runs on exit
however the box ends (`with Box(...) as box:`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
BUCKET = "box"
ACCESS_KEY = "box-access-key"  # moto accepts any credentials; these only have to be the same everywhere
SECRET_KEY = "box-secret-key"
REGION = "us-east-1"
S3_PORT, MLFLOW_PORT, GCS_PORT, DASHBOARD_PORT = 9000, 5000, 6379, 8265
HOST_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OBJECT_STORE_BYTES = 200 * 2**20  # per node: three nodes' defaults (30% of memory each) would not fit


class BoxError(RuntimeError):
    """The box cannot be made here (not root, no namespaces, a service that did not start)."""


@dataclass
class Host:
    """One host: its namespaces are those of `anchor_pid`, a process that lives as long as the host."""

    name: str
    address: str
    netns: str
    anchor: subprocess.Popen

    @property
    def anchor_pid(self) -> int:
        """The host's `sleep` (the child of `unshare --fork`), whose namespaces every command enters."""
        children = Path(f"/proc/{self.anchor.pid}/task/{self.anchor.pid}/children").read_text().split()
        return int(children[0])


def can_make_namespaces() -> str | None:
    """Why a box cannot be made on this machine (root, the namespace tools, PostgreSQL), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (iproute2 / util-linux)"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    probe = f"s2sprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str, timeout: float = 60) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BoxError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _wait(what: str, ready, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise BoxError(f"{what} not ready within {timeout_s:.0f} s\n{tail}")


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise BoxError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return found[-1].parent


@dataclass
class Box:
    """The box; `up()` makes it, `down()` removes all of it. Subnet: the first three octets of a /24 that
    no interface of this machine uses (the hosts take .11, .12, ...; the services .1)."""

    folder: Path
    subnet: str = "10.231.0"
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    hosts: dict[str, Host] = field(default_factory=dict)
    services: dict[str, subprocess.Popen] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)  # folders outside `folder` that `down` removes
    _previous_sigterm: Any = None

    @property
    def bridge(self) -> str:
        return f"s2sb{self.tag}"

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    @property
    def s3_url(self) -> str:
        return f"http://{self.gateway}:{S3_PORT}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.gateway}:{MLFLOW_PORT}"

    def _hosts_file(self) -> str:
        """/etc/hosts of every host: the services, the head and every address a worker can take, as a
        cluster's DNS names all its nodes. gloo looks up the name of each peer that connects; a lookup
        that reached no server would wait seconds for one, on every worker group's start."""
        workers = [f"{self.subnet}.{number} worker{number - 11}" for number in range(12, 255)]
        lines = ["127.0.0.1 localhost", f"{self.gateway} services", f"{self.subnet}.11 head", *workers]
        return "".join(f"{line}\n" for line in lines)

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def jobs_address(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    def __enter__(self) -> Box:
        # SIGTERM (a CI time-out, `kill`) as Ctrl-C: the `with` block unwinds and `down` runs.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.down()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    # ------------------------------------------------------------------------------------------ making it

    def up(self, workers: int = 2) -> Box:
        """Bridge, services, the head, and `workers` worker hosts (more can join later: `add_worker`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.subnet + "." in _run("ip", "-o", "-4", "addr"):
            raise BoxError(f"{self.subnet}.0/24 is in use on this machine: give the box another subnet")
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self._start_s3()
        self._start_tracking_server()
        self._add_host("head", 11)
        self._start_ray_head()
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> Host:
        """A new worker host that joins the running cluster (as an autoscaler adds a node)."""
        number = 12 + sum(1 for name in self.hosts if name != "head")
        host = self._add_host(f"worker{number - 11}", number)
        self.run_on(
            host,
            "ray",
            "start",
            f"--address={self.head.address}:{GCS_PORT}",
            f"--node-ip-address={host.address}",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        )
        _wait(f"{host.name} in the Ray cluster", lambda: host.address in self.alive_node_addresses(), 90)
        return host

    def _add_host(self, name: str, number: int) -> Host:
        netns, address = f"s2sb{self.tag}-{name}", f"{self.subnet}.{number}"
        veth = f"s2s{self.tag}{number}"
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", self.gateway)
        anchor = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation", "private"]
            + ["--fork", "--", "sh", "-c", _host_init_script(name, self._hosts_file())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = anchor.stdout.readline().strip() if anchor.stdout else ""
        if ready != "ready":
            raise BoxError(
                f"host {name} did not start: {ready} {anchor.stdout.read() if anchor.stdout else ''}"
            )
        host = Host(name, address, netns, anchor)
        self.hosts[name] = host
        return host

    def _start_ray_head(self) -> None:
        self.run_on(
            self.head,
            "ray",
            "start",
            "--head",
            f"--node-ip-address={self.head.address}",
            f"--port={GCS_PORT}",
            f"--dashboard-host={self.head.address}",
            f"--dashboard-port={DASHBOARD_PORT}",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
            timeout=120,
        )
        headers = {"Authorization": f"Bearer {self.token}"}
        _wait("the head's jobs API", lambda: _http_ok(f"{self.jobs_address}/api/jobs/", headers), 120)

    def _service(
        self, name: str, command: list[str], env: dict[str, str] | None = None, user: str | None = None
    ) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PATH": HOST_PATH, **(env or {})},
                start_new_session=True,  # its own process group: stopped with everything it spawned
                user=user,
            )
        self.services[name] = process
        return process

    def _start_s3(self) -> None:
        self._service("s3", [sys.executable, "-m", "moto.server", "-H", self.gateway, "-p", str(S3_PORT)])
        _wait("the S3 server", lambda: _http_ok(f"{self.s3_url}/moto-api/"), 60, self.folder / "s3.log")
        request = urllib.request.Request(f"{self.s3_url}/{BUCKET}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def _start_tracking_server(self) -> None:
        """PostgreSQL (a private cluster, run as the postgres user: it refuses root), then MLflow on it."""
        # Its own folder, which the postgres user can reach (the box's folder may sit in a private one).
        binaries = _postgres_bin()
        data = Path(tempfile.mkdtemp(prefix=f"s2sbox-{self.tag}-pg-"))
        self.cleanup.append(data)
        shutil.chown(data, "postgres", "postgres")
        initdb = [str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        subprocess.run(initdb, user="postgres", check=True, capture_output=True, timeout=120)
        port = str(MLFLOW_PORT + 432)  # not 5432: the machine may run its own PostgreSQL
        server = [str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", port, "-k", str(data)]
        self._service("postgres", server, user="postgres")  # our own child: stopped and reaped by PID
        psql = ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-tAc"]

        def answers() -> bool:
            return subprocess.run([*psql, "select 1"], capture_output=True).returncode == 0

        _wait("PostgreSQL", answers, 60, self.folder / "postgres.log")
        _run(*psql, "create database mlflow")
        store = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        mlflow = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", store]
        mlflow += ["--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"]
        mlflow += ["--host", self.gateway, "--port", str(MLFLOW_PORT)]
        # No server-side job runner: it forks consumers in sessions of their own, which nothing here uses.
        self._service("mlflow", mlflow, env={**self.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        _wait(
            "the MLflow server",
            lambda: _http_ok(f"{self.tracking_uri}/health"),
            120,
            self.folder / "mlflow.log",
        )

    # ------------------------------------------------------------------------------------------ using it

    def s3_env(self) -> dict[str, str]:
        """What reaches the bucket: its endpoint and credentials (the hosts, the services, the laptop)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def laptop_env(self) -> dict[str, str]:
        """The settings a user exports on the submitting machine: jobs API, token, tracking server, S3."""
        return {
            "RAY_API_SERVER_ADDRESS": self.jobs_address,
            "RAY_AUTH_TOKEN": self.token,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            **self.s3_env(),
        }

    def host_env(self) -> dict[str, str]:
        return {
            "PATH": HOST_PATH,
            "HOME": "/tmp/home",
            "LANG": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            **self.s3_env(),
        }

    def run_on(self, host: Host, *command: str, timeout: float = 90) -> str:
        """A command on `host`: inside its namespaces, with the host's environment."""
        env = [f"{key}={value}" for key, value in self.host_env().items()]
        entered = ["nsenter", "-t", str(host.anchor_pid), "-m", "-n", "-u", "--", "env", "-i", *env]
        return _run(*entered, *command, timeout=timeout)

    def alive_node_addresses(self) -> list[str]:
        """The addresses of the Ray nodes alive now, from the head's state API."""
        request = urllib.request.Request(
            f"{self.jobs_address}/api/v0/nodes?limit=100",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                nodes = json.load(answer)["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return []
        return sorted(node["node_ip"] for node in nodes if node.get("state") == "ALIVE")

    def kill_host(self, host: Host) -> None:
        """Every process of the host killed at once (SIGKILL), as when a machine is lost; the host's
        namespaces stay, empty, until `down`."""
        pids = _run("ip", "netns", "pids", host.netns).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.anchor.wait(timeout=10)

    # ------------------------------------------------------------------------------------------ removing it

    def down(self) -> None:
        """Every process, namespace and link of the box, also after a failure half-way through `up`."""
        for host in self.hosts.values():
            with contextlib.suppress(BoxError, subprocess.TimeoutExpired):
                self.kill_host(host)
        for name in reversed(list(self.services)):
            _stop_group(self.services[name])
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)
        self.hosts.clear()
        self.services.clear()
        self.cleanup.clear()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
            return


def _host_init_script(name: str, hosts_file: str) -> str:
    """The host's private mounts, name, /etc/hosts (every box host by name, as on a real cluster: gloo and
    NCCL publish what their host name resolves to) and resolv.conf (no name server but one on the host
    itself, where none answers: a name that is not in /etc/hosts fails at once, and no query leaves the
    box), then `sleep` for ever: the process the host lives in. A Python environment under /tmp (a
    checkout there) is bound back over the new /tmp, or the host could not run."""
    keep = f"/run/s2sbox-keep-{os.getpid()}-{name}"
    prefix = Path(sys.prefix).resolve()
    rebind = ""
    if prefix.is_relative_to("/tmp"):
        rebind = (
            f"mkdir -p {keep} && mount --bind {prefix} {keep} && "
            f"mount -t tmpfs tmpfs /tmp && mkdir -p {prefix} && mount --bind {keep} {prefix} && "
            f"umount {keep} && rmdir {keep}"
        )
    else:
        rebind = "mount -t tmpfs tmpfs /tmp"
    files = {"hosts": hosts_file, "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"}
    mounts = "; ".join(
        f"printf %s {shlex.quote(text)} > /tmp/.{file}; mount --bind /tmp/.{file} /etc/{file}"
        for file, text in files.items()
    )
    return (
        f"set -e; {rebind}; mount -t tmpfs tmpfs /dev/shm; mkdir -p /tmp/home; hostname {name}; {mounts}; "
        "echo ready; exec sleep infinity"
    )


# ---------------------------------------------------------------------------------------------- commands


def _print_settings(box: Box) -> None:
    print("The box is up. In another shell, from the project root:")
    for key, value in box.laptop_env().items():
        print(f"  export {key}={value}")
    print(f"  dvc remote add -f -d box s3://{BUCKET}/dvc && dvc remote modify box endpointurl {box.s3_url}")
    print(f'  PIPELINE_SET="runtime.storage_path=s3://{BUCKET}/ray" python -m pipeline submit')


def _outputs_at_the_root(project: Path):
    """copytree's ignore: the project's own outputs and environments, at its root only (`pipeline/data`
    is code)."""
    skipped = {".venv", "runs", "mlruns", "data", "models", "mlflow.db"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return skipped & set(names) if Path(folder).resolve() == project.resolve() else set()

    return ignore


def rehearse(project: Path, workers: int, folder: Path, subnet: str = "10.231.0") -> int:
    """The box up, the project's pipeline submitted to it as a job, its results pulled home, the box down."""
    if (why := can_make_namespaces()) is not None:
        print(f"error: cannot make the box here: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as scratch, Box(folder, subnet=subnet) as box:
        box.up(workers)
        print(f"box up: head {box.head.address}, {workers} worker host(s)")
        print(f"S3 {box.s3_url}, MLflow {box.tracking_uri}")
        rehearsal = Path(scratch) / "project"
        shutil.copytree(project, rehearsal, symlinks=True, ignore=_outputs_at_the_root(project))
        env = {**os.environ, **box.laptop_env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        dvc = [sys.executable, "-m", "dvc"]
        # In the rehearsal's copy of .dvc/config (the job's upload never has config.local).
        steps = [
            [*dvc, "remote", "add", "-f", "-d", "box", f"s3://{BUCKET}/dvc"],
            [*dvc, "remote", "modify", "box", "endpointurl", box.s3_url],
            [*dvc, "push"],
        ]
        for step in steps:
            subprocess.run(step, cwd=rehearsal, env=env, check=True)
        overrides = [os.environ.get("PIPELINE_SET", ""), f"runtime.storage_path=s3://{BUCKET}/ray"]
        env["PIPELINE_SET"] = " ".join(filter(None, overrides))
        submitted = subprocess.run([sys.executable, "-m", "pipeline", "submit"], cwd=rehearsal, env=env)
        if submitted.returncode != 0:
            return submitted.returncode
        home = subprocess.run(
            [*dvc, "repro", "--pull"], cwd=rehearsal, env=env, capture_output=True, text=True
        )
        print(home.stdout[-3000:], home.stderr[-3000:], sep="\n")
        if home.returncode != 0 or "Running stage" in home.stdout:
            print(
                "rehearsal failed: `dvc repro --pull` could not restore every stage from the job's run-cache"
            )
            return 1
        print("rehearsal passed: the job succeeded on the box, and every stage came home from its run-cache")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.box", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["rehearse", "up"])
    parser.add_argument("--workers", type=int, default=2, help="worker hosts (default 2)")
    parser.add_argument("--subnet", default="10.231.0", help="first three octets of the box's /24")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="rehearse: the project (default .)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="s2sbox-"))
    if args.command == "rehearse":
        return rehearse(args.project, args.workers, folder, args.subnet)
    if (why := can_make_namespaces()) is not None:
        print(f"error: cannot make the box here: {why}", file=sys.stderr)
        return 2
    with Box(folder, subnet=args.subnet) as box:
        box.up(args.workers)
        _print_settings(box)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
