"""The pipeline on a cluster in a box (cluster/box.py): Ray hosts that share only the network, an S3 server
(DVC remote, Ray storage, MLflow artifacts) and an MLflow tracking server on PostgreSQL. This process is the
laptop: it submits with `python -m pipeline submit` and pulls the results home.

One job runs the whole pipeline (`dvc repro --pull` to register, corpus DVC-tracked under corpus/, the Ray
Data engine) on a box that starts with the head alone, as the shipped autoscaling clusters start without
workers:
- two worker hosts join once the train stage has started and put its data in the object store (the
  autoscaler's case): its ranks away from the head read that copy;
- after the first epoch, a worker host that runs a rank is killed (every process of it), and Ray Train
  resumes from the checkpoint in the object store on the hosts left.
Then, at home: `dvc repro --pull` restores every stage with none run, the model is in the tracking
server's registry as champion and `mlflow models serve` of it answers; and `translate --input/--output`
runs on the box, between a file in the project and the object store.

Skipped, with the reason, where network namespaces cannot be made (not root).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.box import BUCKET, Box, BoxError, can_make_namespaces
from tests.box_project import BOX_PARAMS, EPOCHS, write_corpus
from tests.dvc_project import make_dvc_project
from tests.ray_head import clean_env, free_ports, stop_process_group

pytestmark = pytest.mark.slow

WHY_NOT = can_make_namespaces()
if WHY_NOT is not None:
    pytest.skip(f"cluster in a box: {WHY_NOT}", allow_module_level=True)

MODEL_NAME = "seq2seq-translator"
JOB_TIMEOUT_S = 900


def _laptop_env(box: Box, **extra: str) -> dict[str, str]:
    return clean_env(**box.laptop_env(), **extra)


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """The head alone, plus the services: workers join while the job runs."""
    with Box(tmp_path_factory.mktemp("box")) as made:
        made.up(workers=0)
        yield made
    assert not made.hosts and not made.services


@pytest.fixture(scope="module")
def project(box: Box, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The laptop's project: git + DVC, the corpus DVC-tracked under corpus/ and pushed to the box's S3."""
    directory = make_dvc_project(tmp_path_factory.mktemp("laptop"), BOX_PARAMS)
    write_corpus(directory)
    env = _laptop_env(box)
    dvc = [sys.executable, "-m", "dvc"]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    _run([*dvc, "add", "corpus/box"], directory, env)
    _run([*dvc, "remote", "add", "-d", "box", f"s3://{BUCKET}/dvc"], directory, env)
    _run([*dvc, "remote", "modify", "box", "endpointurl", box.s3_url], directory, env)
    _run([*git, "add", "-A"], directory, env)
    _run([*git, "commit", "-qm", "corpus and remote"], directory, env)
    _run([*dvc, "push"], directory, env)
    return directory


@dataclass
class Job:
    returncode: int
    log: str
    seconds: float
    events: dict[str, float | str] = field(default_factory=dict)  # what happened, seconds from submission


class _Follower:
    """Reads the job's streamed output and sets an event when a line matches one of `markers`."""

    def __init__(self, stream, markers: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.events = {name: threading.Event() for name in markers}
        self.markers = {name: re.compile(pattern) for name, pattern in markers.items()}
        self.thread = threading.Thread(target=self._follow, args=(stream,), daemon=True)
        self.thread.start()

    def _follow(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            for name, pattern in self.markers.items():
                if pattern.search(line):
                    self.events[name].set()

    def wait(self, name: str, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.events[name].wait(1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job never reached {name!r}:\n{''.join(self.lines)[-6000:]}")


def _training_host(box: Box) -> str:
    """The worker host (not the head) that runs a Ray Train worker now, by its processes' names."""
    for name, host in box.hosts.items():
        if name == "head":
            continue
        pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(OSError):
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return name
    pytest.fail("no worker host runs a Ray Train worker")


def _s3(box: Box):
    import boto3

    env = box.s3_env()
    return boto3.client(
        "s3",
        endpoint_url=box.s3_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def _wait_for_a_train_checkpoint(box: Box, process: subprocess.Popen, timeout_s: float) -> None:
    """Until Ray Train has registered the train stage's first checkpoint: its checkpoint manager's snapshot
    in the bucket lists one (an uploaded checkpoint that the controller has not taken yet would be lost
    with the worker group, and the run would start over)."""
    client, deadline = _s3(box), time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="ray/train-").get("Contents", [])
        for item in listed:
            if item["Key"].endswith("/checkpoint_manager_snapshot.json"):
                snapshot = json.loads(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
                if snapshot.get("checkpoint_results"):
                    return
        time.sleep(0.3)
    pytest.fail("Ray Train registered no checkpoint of the train stage")


@pytest.fixture(scope="module")
def job(box: Box, project: Path) -> Job:
    """The whole pipeline as one job. Two worker hosts join once the train stage has started (its 2 ranks
    of one CPU each cannot start on the head's one CPU alone); after the first epoch, a worker host that
    runs a rank is killed, and the group restarts on the hosts left."""
    env = _laptop_env(box, PIPELINE_SET=f"runtime.storage_path=s3://{BUCKET}/ray")
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "submit"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    follower = _Follower(process.stdout, {"train": r"Running stage 'train'"})
    events: dict[str, float | str] = {}
    try:
        follower.wait("train", process, 600)
        box.add_worker()  # both join after the stage started: its data is put while the head is alone
        box.add_worker()
        events["workers joined"] = time.monotonic() - started
        _wait_for_a_train_checkpoint(box, process, 300)  # epoch 1's, in the object store
        victim = box.hosts[_training_host(box)]
        box.kill_host(victim)
        events["worker killed"] = time.monotonic() - started
        events["killed address"] = victim.address
        process.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    follower.thread.join(timeout=10)
    return Job(process.returncode, "".join(follower.lines), time.monotonic() - started, events)


@pytest.fixture(scope="module")
def home(box: Box, project: Path, job: Job) -> str:
    """Back on the laptop: `dvc repro --pull` at the commit and params the job ran."""
    assert job.returncode == 0, job.log[-8000:]
    return _run([sys.executable, "-m", "dvc", "repro", "--pull"], project, _laptop_env(box), timeout=600)


def test_the_whole_pipeline_job_succeeds_on_hosts_that_share_only_the_network(job: Job) -> None:
    assert job.returncode == 0 and "finished: SUCCEEDED" in job.log, job.log[-8000:]
    for stage in ("prepare", "preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in job.log, stage


def test_workers_that_join_late_train_from_the_object_store_and_a_killed_one_resumes(
    box: Box, project: Path, job: Job, home: str
) -> None:
    """The DDP ranks ran on two hosts with identical replicas; those away from the head (all joined after the
    stages started) read the object-store copy of the data; after the kill, the group restarted without the
    lost host, from the last checkpoint, and trained each epoch once."""
    import csv

    groups = json.loads((project / "reports/train_run.json").read_text())["worker_addresses"]
    hosts = {host.address for host in box.hosts.values()} | {job.events["killed address"]}
    assert len(groups) == 2, groups  # the first start and the restart after the kill
    assert all(len(set(group)) == 2 and set(group) <= hosts for group in groups), groups
    assert job.events["killed address"] in groups[0] and job.events["killed address"] not in groups[1]
    with (project / "reports/train_history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in history] == list(range(EPOCHS)), "each epoch exactly once"
    resumed = [int(row["resumed_from_epoch"]) for row in history]
    assert resumed[0] == -1 and resumed[-1] >= 0, resumed
    for row in history:
        group = groups[0] if int(row["resumed_from_epoch"]) == -1 else groups[1]
        away_from_head = sum(address != box.head.address for address in group)
        assert int(row["n_nodes"]) == 2 and int(row["object_store_readers"]) == away_from_head, (row, group)
        assert int(row["replica_divergence"]) == 0, "the ranks on two hosts hold bit-identical replicas"


def test_checkpoints_are_in_the_object_store(box: Box, project: Path, home: str) -> None:
    client = _s3(box)
    run_name = json.loads((project / "reports/train_run.json").read_text())["ray_run_name"]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"ray/{run_name}/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any("/checkpoint_" in key and key.endswith("training_state.pt") for key in keys), keys


def test_hosts_resolve_each_other_by_name_and_other_names_fail_at_once_inside_the_box(box: Box) -> None:
    """Every host's /etc/hosts names the head and the worker addresses (gloo looks up each peer that
    connects); any other name goes to the host's own resolver address, where nothing answers: it fails at
    once instead of waiting seconds for a name server, and no query leaves the box."""
    assert box.run_on(box.head, "getent", "hosts", f"{box.subnet}.13").split() == [
        f"{box.subnet}.13",
        "worker2",
    ]
    assert box.run_on(box.head, "getent", "hosts", "head").split()[0] == box.head.address
    resolvers = [
        line for line in box.run_on(box.head, "cat", "/etc/resolv.conf").splitlines() if "server" in line
    ]
    assert resolvers == ["nameserver 127.0.0.1"], resolvers
    started = time.monotonic()
    with pytest.raises(BoxError, match="exited 2"):  # getent's "not found"
        box.run_on(box.head, "getent", "hosts", "not-a-box-host.example")
    assert time.monotonic() - started < 3


def test_results_come_home_with_nothing_rerun(home: str) -> None:
    assert "Running stage" not in home, home[-4000:]
    for stage in ("prepare", "preprocess", "tune", "train", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run" in home, (stage, home[-4000:])


def test_the_champion_is_in_the_tracking_servers_registry_and_serves(
    box: Box, project: Path, home: str
) -> None:
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=box.tracking_uri).get_model_version_by_alias(MODEL_NAME, "champion")
    registry = json.loads((project / "reports/registry.json").read_text())
    assert str(registry["version"]) == str(version.version), "home's report names the served version"
    (port,) = free_ports(1)
    env = {**_laptop_env(box), "OMP_NUM_THREADS": "1"}
    log = project / "serve.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve"]
    command += [
        "-m",
        f"models:/{MODEL_NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with log.open("wb") as sink:
        server = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=json.dumps({"inputs": ["the dog sees a cat ."]}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, log.read_text()[-3000:]
        assert len(answer["predictions"]) == 1 and answer["predictions"][0].strip()
    finally:
        stop_process_group(server, grace_s=15)  # the server and its uvicorn workers


def test_batch_translation_on_the_box_reads_the_project_or_the_object_store_and_writes_the_object_store(
    box: Box, project: Path, home: str
) -> None:
    """`translate --input` as a job: a file in the project (it travels with the job) and an object the
    laptop uploaded, each to an object the laptop downloads; both equal `translate` run at home."""
    client = _s3(box)
    client.upload_file(str(project / "to_translate.txt"), BUCKET, "translate/in.txt")
    env = _laptop_env(box)
    model = f"models:/{MODEL_NAME}@champion"
    # One model actor each: the spread over hosts is tests/test_multinode.py's; here, where data comes from.
    translate = ["python", "-m", "pipeline", "translate", "--model", model, "--actors", "1"]
    commands = [
        shlex.join([*translate, "--input", source, "--output", f"s3://{BUCKET}/{target}"])
        for source, target in (
            ("to_translate.txt", "translate/from-project.txt"),
            (f"s3://{BUCKET}/translate/in.txt", "translate/from-bucket.txt"),
        )
    ]
    # One job runs both (an entrypoint given as one argument is a shell command line): a job's start costs
    # more than a translation of 40 lines.
    _run([sys.executable, "-m", "pipeline", "submit", "--", " && ".join(commands)], project, env, timeout=600)
    lines = (project / "to_translate.txt").read_text(encoding="utf-8")
    at_home = subprocess.run(
        [sys.executable, "-m", "pipeline", "translate", "--model", model],
        input=lines,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    for target in ("translate/from-project.txt", "translate/from-bucket.txt"):
        body = client.get_object(Bucket=BUCKET, Key=target)["Body"].read().decode("utf-8")
        assert body == at_home, target
