"""`python -m pipeline submit`: run the pipeline (or any command) as a Ray job on a cluster.

A job, rather than `ray.init(address=...)` from a laptop: the driver runs on the cluster, next to the GPUs
and the shared storage, and keeps running when the laptop sleeps. What travels with the job is
`runtime_env.py`'s business: the project directory as its `working_dir` (minus what
`cluster/runtime_env.yaml` excludes) and the MLflow, Hugging Face and AWS settings of this shell.
Nothing comes back through this command except the logs: the model arrives in the MLflow registry, the
stage outputs in the DVC remote.

Ray's token is looked for here, in Ray's own order (`auth_headers`), because Ray's client sends one only
when RAY_AUTH_MODE=token is set in the client's shell, and so that a 401/403 can name the token's source.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.errors import PipelineError
from pipeline.jobs.runtime_env import build_runtime_env, excluded_secrets, tracking_warnings
from pipeline.tracking.lineage import GIT_COMMIT_ENV, GIT_DIRTY_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# What "run the whole pipeline on the cluster" means, in one place: cluster/kuberay/rayjob.yaml runs the
# same script. It switches DVC to no-SCM mode, since Ray uploads the project without .git.
PIPELINE_SCRIPT = Path("cluster/run_pipeline.sh")
DEFAULT_ENTRYPOINT = f"bash {PIPELINE_SCRIPT.as_posix()}"

_TOKEN_HELP = (
    "Give this shell the cluster's token: RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file>, or the file "
    "~/.ray/auth_token. `ray get-auth-token` on the head node prints it (on KubeRay: `kubectl exec "
    "svc/<cluster>-head-svc -c ray-head -- ray get-auth-token`)."
)
_ADDRESS_HELP = (
    "Pass the head node's dashboard URL (port 8265, not the GCS port 6379) with --address or "
    "RAY_API_SERVER_ADDRESS; "
    "for a `ray up` cluster run `ray dashboard cluster/aws-gpu.yaml` and use http://127.0.0.1:8265, for "
    "KubeRay `kubectl port-forward svc/<cluster>-head-svc 8265:8265`. Locally: `ray start --head`."
)


@dataclass(frozen=True)
class SubmitOptions:
    """`ray job submit`'s options, under its names, where they mean the same."""

    address: str | None = None
    wait: bool = True  # follow the logs and exit with the job's status, as `ray job submit` does
    entrypoint: list[str] = field(default_factory=list)
    runtime_env_path: Path | None = None
    runtime_env_json: str | None = None
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    metadata_json: str | None = None


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if text is None:
        return {}
    if not text.strip():  # e.g. an unset shell variable: not the same as leaving the option out
        raise PipelineError(f"{flag} is empty: give a JSON object, or leave the option out")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise PipelineError(f"{flag} is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per level: thousands of [ or { exhaust the stack
        raise PipelineError(f"{flag} is not usable JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{flag} must be a JSON object")
    return value


def run_submit(options: SubmitOptions) -> int:
    """Submit the job; unless `options.wait` is off, stream its logs and return 0 only if it SUCCEEDED."""
    if options.runtime_env_path is not None and options.runtime_env_json is not None:
        raise PipelineError("give --runtime-env or --runtime-env-json, not both (as `ray job submit`)")
    extra_metadata = _json_object(options.metadata_json, "--metadata-json")
    if not all(isinstance(value, str) for value in extra_metadata.values()):
        raise PipelineError("--metadata-json values must be strings")
    wait = options.wait
    address = resolve_address(options.address)
    project_root = Path.cwd()
    command = entrypoint_command(options.entrypoint)
    runtime_env, passed = build_runtime_env(
        options.runtime_env_path,
        project_root,
        os.environ,
        given=_json_object(options.runtime_env_json, "--runtime-env-json")
        if options.runtime_env_json is not None
        else None,
    )
    uploads_here = "://" not in runtime_env["working_dir"]
    if command == DEFAULT_ENTRYPOINT and uploads_here and not (project_root / PIPELINE_SCRIPT).is_file():
        raise PipelineError(f"{project_root} has no {PIPELINE_SCRIPT}: run `submit` from the project root")
    headers, token_source = auth_headers(os.environ)
    check_jobs_api(address, headers, token_source)
    for warning in tracking_warnings(runtime_env["env_vars"]):
        print(f"warning: {warning}", file=sys.stderr)

    client = _connect(address, headers)
    # Ray repeats "Ignoring upload ... .gitignore" per pass and warns about .git/.venv, excluded anyway.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    if uploads_here:
        secrets = excluded_secrets(Path(runtime_env["working_dir"]))
        if secrets:
            listed = ", ".join(f"{path} ({pattern})" for path, pattern in secrets)
            print(f"not uploaded, secret by name: {listed}", file=sys.stderr)
    print(
        f"submitting to {address}: working dir {runtime_env['working_dir']}, "
        f"env from this shell: {', '.join(passed) or 'none'}\n  entrypoint: {command}",
        file=sys.stderr,
    )
    job_id = _submit(
        client,
        address,
        command,
        runtime_env,
        {**_metadata(runtime_env["env_vars"]), **extra_metadata},
        submission_id=options.submission_id,
        entrypoint_num_cpus=options.entrypoint_num_cpus,
        entrypoint_num_gpus=options.entrypoint_num_gpus,
    )
    follow_hint = _cli_hint(address, token_source)
    if not wait:
        print(f"submitted job {job_id}")
        print(f"follow it:  {follow_hint}ray job logs -f {job_id}")
        print(f"stop it:    {follow_hint}ray job stop {job_id}")
        return 0
    print(f"submitted job {job_id}; its output follows (Ctrl-C leaves it running)", file=sys.stderr)
    try:
        status = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running on the cluster. "
            f"Stop it with: {follow_hint}ray job stop {job_id}",
            file=sys.stderr,
        )
        return 130
    line = f"job {job_id} finished: {status.value}"
    if status.value != "SUCCEEDED":
        message = _job_message(client, job_id)
        line += f" ({message})" if message else ""
    print(line, flush=True)
    return 0 if status.value == "SUCCEEDED" else 1


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS (Ray's own order), else the local head."""
    chosen = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    ).strip()
    if chosen in ("auto", "local"):
        chosen = DEFAULT_ADDRESS
    if chosen.startswith("ray://"):  # a Ray Client address: the jobs API is on the same host's dashboard
        chosen = f"http://{urlparse(chosen).hostname}:8265"
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    return chosen.rstrip("/")


def entrypoint_command(entrypoint: list[str]) -> str:
    """The shell command the job runs.

    Several words are quoted as they are (what `ray job submit -- CMD...` does); a single word is taken as
    a whole command line, so `-- "python -m pipeline prepare && python -m pipeline preprocess"` works.
    """
    if not entrypoint:
        return DEFAULT_ENTRYPOINT
    if len(entrypoint) == 1:
        return entrypoint[0]
    return shlex.join(entrypoint)


def auth_headers(environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The bearer token for Ray's token authentication, and where it came from.

    Ray's own client sends a token only when RAY_AUTH_MODE=token is set in the client's environment, even
    when ~/.ray/auth_token exists (an HTTP 401 otherwise), so the token is read here, in Ray's order:
    RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. RAY_AUTH_MODE=disabled
    sends none. A server without authentication ignores the header.
    """
    if environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return {}, None
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return {"Authorization": f"Bearer {token}"}, "RAY_AUTH_TOKEN"
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        try:
            token = Path(token_path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as error:
            raise PipelineError(
                f"cannot read the Ray token file RAY_AUTH_TOKEN_PATH={token_path}: {error}"
            ) from None
        if not token:
            raise PipelineError(f"the Ray token file RAY_AUTH_TOKEN_PATH={token_path} is empty")
        return {"Authorization": f"Bearer {token}"}, f"RAY_AUTH_TOKEN_PATH={token_path}"
    default_path = Path.home() / ".ray" / "auth_token"
    try:
        token = default_path.read_text(encoding="utf-8").strip()
    except OSError:
        return {}, None
    if not token:
        return {}, None
    return {"Authorization": f"Bearer {token}"}, str(default_path)


def check_jobs_api(address: str, headers: Mapping[str, str], token_source: str | None) -> str:
    """Ask the dashboard for its version first: a clear error for each way this goes wrong, and a timeout
    (Ray's client has none and waits forever on an address that drops packets). Returns Ray's version."""
    url = f"{address}/api/version"
    try:
        response = requests.get(url, headers=dict(headers), timeout=15)
    except requests.exceptions.Timeout:
        raise PipelineError(
            f"the Ray jobs API at {address} did not answer within 15 s. {_ADDRESS_HELP}"
        ) from None
    except requests.exceptions.ConnectionError:
        raise PipelineError(f"nothing answers at {address}. {_ADDRESS_HELP}") from None
    except requests.exceptions.RequestException as error:
        raise PipelineError(f"cannot reach the Ray jobs API at {address}: {error}. {_ADDRESS_HELP}") from None
    if response.status_code == 401:
        sent = f"it did not take the one from {token_source}" if token_source else "this shell has none"
        raise PipelineError(f"the Ray cluster at {address} wants a token (HTTP 401); {sent}. {_TOKEN_HELP}")
    if response.status_code == 403:
        raise PipelineError(
            f"the Ray cluster at {address} rejected the token from {token_source} (HTTP 403): it is not this "
            f"cluster's token. {_TOKEN_HELP}"
        )
    try:
        version = str(response.json()["ray_version"]) if response.ok else ""
    except (ValueError, KeyError, TypeError):
        version = ""
    if not version:
        raise PipelineError(
            f"{address} answered HTTP {response.status_code} but is not a Ray dashboard with the jobs API "
            f"(a head started without ray[default] has none). {_ADDRESS_HELP}"
        )
    if version.split(".")[:2] != ray.__version__.split(".")[:2]:
        print(f"warning: the cluster runs Ray {version}, this shell Ray {ray.__version__}", file=sys.stderr)
    return version


def follow_job(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's output as it comes, then its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except (RuntimeError, OSError) as error:
        # Also what aiohttp's errors derive from. The job itself is unaffected: keep waiting for it.
        print(f"warning: lost the job's log stream ({error}); waiting for it to finish", file=sys.stderr)
    return _wait_until_done(client, job_id)


def _wait_until_done(client: JobSubmissionClient, job_id: str, poll_s: float = 1.0) -> JobStatus:
    # The log stream closes when the job ends; the status can lag it by a moment.
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    """JobSubmissionClient lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override its `address` argument."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _connect(address: str, headers: Mapping[str, str]) -> JobSubmissionClient:
    try:
        with _address_env_cleared():
            return JobSubmissionClient(address, headers=dict(headers))
    except (ConnectionError, RuntimeError, AuthenticationError) as error:
        raise PipelineError(f"cannot use the Ray jobs API at {address}: {error}") from None


def _submit(
    client: JobSubmissionClient,
    address: str,
    command: str,
    runtime_env: dict[str, Any],
    metadata: dict[str, str],
    **options: Any,
) -> str:
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return submitted_once_the_agent_is_up(
            lambda: client.submit_job(entrypoint=command, runtime_env=runtime_env, metadata=metadata, **given)
        )
    except (RuntimeError, ValueError, TypeError, OSError, AuthenticationError) as error:
        raise PipelineError(f"the job was not submitted to {address}: {error}") from None


# A head whose node's job agent is still starting (Ray waits 10 s for it; a head just started by `ray start`
# or `ray up` on a loaded machine takes longer) answers 500 with this text and asks for a retry: the job was
# not submitted, so submitting again is safe.
AGENT_NOT_UP = "No available agent to submit job"
AGENT_WAIT_S = 120.0
AGENT_RETRY_S = 2.0


def submitted_once_the_agent_is_up(
    submit: Callable[[], str], wait_s: float = AGENT_WAIT_S, retry_s: float = AGENT_RETRY_S
) -> str:
    """`submit()`, again while the cluster says its job agent is not up, for at most `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return submit()
        except RuntimeError as error:
            if AGENT_NOT_UP not in str(error) or time.monotonic() + retry_s > deadline:
                raise
            print(
                f"the cluster's job agent is not up yet: submitting again in {retry_s:.0f} s", file=sys.stderr
            )
            time.sleep(retry_s)


def _metadata(env_vars: Mapping[str, str]) -> dict[str, str]:
    """Shown by `ray job list` and the dashboard: who submitted what."""
    metadata = {"project": "seq2seq-pipeline"}
    with suppress(KeyError, OSError):
        metadata["submitted_by"] = getpass.getuser()
    if env_vars.get(GIT_COMMIT_ENV):
        metadata["git_commit"] = env_vars[GIT_COMMIT_ENV]
    if env_vars.get(GIT_DIRTY_ENV):
        metadata["git_dirty"] = env_vars[GIT_DIRTY_ENV]
    return metadata


def _job_message(client: JobSubmissionClient, job_id: str) -> str:
    """Why the job ended, without the copy of its last logs that Ray appends (they were just streamed)."""
    try:
        message = client.get_job_info(job_id).message or ""
    except Exception:  # only decoration for the final line
        return ""
    return message.split(", last available logs", 1)[0].splitlines()[0].strip() if message.strip() else ""


def _cli_hint(address: str, token_source: str | None) -> str:
    """The environment the `ray job` CLI needs for the same job (it sends no token without RAY_AUTH_MODE)."""
    parts = [f"RAY_API_SERVER_ADDRESS={shlex.quote(address)}"]
    if token_source:
        parts.append("RAY_AUTH_MODE=token")
        if token_source.startswith("RAY_AUTH_TOKEN_PATH="):
            parts.append(shlex.quote(token_source))
    return " ".join(parts) + " "
