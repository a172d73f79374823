"""`python -m pipeline submit` against a real local Ray head with token authentication on.

One head serves the module (tests/ray_head.py; start-up ~12 s, each job ~10 s on 2 cores). The default
entrypoint (the whole pipeline as a job) is tested in test_pipeline_end_to_end.py, on the pipeline that
test already ran, so the suite runs the full pipeline once.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.jobs.runtime_env import ALWAYS_EXCLUDE, build_runtime_env, tracking_warnings
from pipeline.jobs.submit import (
    DEFAULT_ENTRYPOINT,
    SubmitOptions,
    auth_headers,
    entrypoint_command,
    run_submit,
)
from pipeline.tracking.lineage import GIT_COMMIT_ENV, GIT_DIRTY_ENV, user
from tests.ray_head import REPO_ROOT, RayHead, copy_project, free_ports, output, submit

TRACKING_URI = "http://mlflow.invalid:5000"  # only checked for arrival; nothing connects to it

# A quick proof that the job runs the project's own code from the uploaded copy, with the submitter's
# settings and without the excluded paths; the job writes what it saw to $SUBMIT_TEST_MARKER.
JOB_CHECK = textwrap.dedent(
    """
    import json, os, pathlib, subprocess, sys
    import pipeline
    subprocess.run([sys.executable, "-m", "pipeline", "--help"], check=True, stdout=subprocess.DEVNULL)
    pathlib.Path(os.environ["SUBMIT_TEST_MARKER"]).write_text(json.dumps({
        "cwd": os.getcwd(),
        "pipeline_file": pipeline.__file__,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
        "present": sorted(
            p for p in ("data", ".git", ".dvc/config.local", "params.yaml") if os.path.exists(p)
        ),
    }))
    print("job check done")
    """
)
JOB_ENTRYPOINT = ["python", "-c", JOB_CHECK]


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("submit-project"))
    # Present locally, never uploaded.
    (project / "data").mkdir(exist_ok=True)
    (project / "data" / "planted.txt").write_text("local only")
    (project / ".dvc").mkdir(exist_ok=True)
    (project / ".dvc" / "config.local").write_text("[core]\n    remote = secret-local-remote\n")
    return project


@pytest.mark.slow
def test_submit_wait_runs_project_code_in_uploaded_copy_with_shell_settings(
    ray_head: RayHead, project_copy: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker.json"
    runtime_env = yaml.safe_load((REPO_ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["SUBMIT_TEST_MARKER"] = str(marker)
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    result = submit(
        project_copy,
        *("--address", ray_head.address, "--runtime-env", str(env_file), "--", *JOB_ENTRYPOINT),
        # The token as most users have it: no RAY_AUTH_MODE, which Ray's own client would need.
        RAY_AUTH_TOKEN=ray_head.token,
        MLFLOW_TRACKING_URI=TRACKING_URI,
    )

    assert result.returncode == 0, output(result)
    assert "finished: SUCCEEDED" in result.stdout, output(result)
    assert "job check done" in result.stdout, output(result)  # the logs were streamed
    seen = json.loads(marker.read_text())
    assert seen["cwd"] != str(project_copy), "the job must run in Ray's uploaded copy"
    assert Path(seen["pipeline_file"]).is_relative_to(seen["cwd"]), seen
    assert seen["tracking_uri"] == TRACKING_URI
    assert seen["unbuffered"] == "1"  # from cluster/runtime_env.yaml
    assert seen["present"] == ["params.yaml"], "data/, .git and .dvc/config.local must stay local"


@pytest.mark.slow
def test_submit_wait_exits_nonzero_and_prints_failed_for_a_failing_job(
    ray_head: RayHead, project_copy: Path
) -> None:
    result = submit(
        project_copy,
        *("--address", ray_head.address, "--", "python", "-c", "import sys; sys.exit(3)"),
        RAY_AUTH_TOKEN=ray_head.token,
    )

    assert result.returncode == 1, output(result)
    assert "finished: FAILED" in result.stdout, output(result)
    assert "exit code 3" in result.stdout, output(result)


@pytest.mark.slow
def test_submit_without_wait_prints_job_id_and_how_to_follow_it(
    ray_head: RayHead, project_copy: Path
) -> None:
    import requests

    options = ["--no-wait", "--submission-id", "seq2seq-test-1", "--entrypoint-num-cpus", "0.5"]
    options += ["--metadata-json", '{"team": "mt"}']
    result = submit(
        project_copy, "--address", ray_head.address, *options, "--", "true", RAY_AUTH_TOKEN=ray_head.token
    )

    assert result.returncode == 0, output(result)
    job_id = result.stdout.split("submitted job ", 1)[1].split()[0]
    assert job_id == "seq2seq-test-1"
    hint = f"RAY_API_SERVER_ADDRESS={ray_head.address} RAY_AUTH_MODE=token ray job logs -f {job_id}"
    assert hint in result.stdout, output(result)
    # Known to the cluster; not waited for, the head goes at the end of the module anyway. (That the
    # printed RAY_AUTH_MODE=token is what `ray job ...` needs was checked by hand: the CLI costs seconds.)
    bearer = {"Authorization": f"Bearer {ray_head.token}"}
    job = requests.get(f"{ray_head.address}/api/jobs/{job_id}", headers=bearer, timeout=10)
    assert job.status_code == 200 and job.json()["entrypoint"] == "true", job.text
    # (Ray's job details do not echo entrypoint_num_cpus; Ray would refuse a malformed one at submission.)
    assert job.json()["metadata"]["team"] == "mt", job.text
    assert job.json()["metadata"]["project"] == "seq2seq-pipeline", "the project's metadata stays"


@pytest.mark.slow
def test_submit_without_token_fails_with_401_naming_address_and_fix(
    ray_head: RayHead, project_copy: Path, tmp_path: Path
) -> None:
    # HOME without ~/.ray/auth_token: nothing to send.
    result = submit(project_copy, "--address", ray_head.address, "--", "true", HOME=str(tmp_path))

    assert result.returncode == 2, output(result)
    assert ray_head.address in result.stderr
    assert "HTTP 401" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr, output(result)


@pytest.mark.slow
def test_submit_with_wrong_token_fails_with_403_naming_its_source(
    ray_head: RayHead, project_copy: Path
) -> None:
    args = ("--address", ray_head.address, "--", "true")
    result = submit(project_copy, *args, RAY_AUTH_TOKEN="not-the-token")

    assert result.returncode == 2, output(result)
    assert "HTTP 403" in result.stderr and "from RAY_AUTH_TOKEN" in result.stderr, output(result)


# Fast: no cluster.


def test_unreachable_address_fails_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PipelineError, match=rf"127\.0\.0\.1:{port}.*--address or RAY_API_SERVER_ADDRESS"):
        run_submit(SubmitOptions(address=f"127.0.0.1:{port}", wait=False, entrypoint=["true"]))


def test_runtime_env_merges_file_shell_settings_and_mandatory_excludes(tmp_path: Path) -> None:
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {FROM_FILE: 'yes', MLFLOW_TRACKING_URI: http://file}\nexcludes: [/data]\n")
    shell = {
        "MLFLOW_TRACKING_URI": "http://shell:5000",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
        "HF_TOKEN": "hf_x",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_REGION": "eu-west-1",
        "UNRELATED": "x",
    }

    runtime_env, passed = build_runtime_env(env_file, tmp_path, shell)

    assert runtime_env["working_dir"] == str(tmp_path)
    assert runtime_env["excludes"][0] == "/data"
    assert set(ALWAYS_EXCLUDE) <= set(runtime_env["excludes"])
    env_vars = runtime_env["env_vars"]
    assert env_vars["FROM_FILE"] == "yes"
    assert env_vars["MLFLOW_TRACKING_URI"] == "http://shell:5000"  # the shell wins over the file
    assert env_vars["MLFLOW_TRACKING_PASSWORD"] == "s3cret" and env_vars["HF_TOKEN"] == "hf_x"
    assert "AWS_SECRET_ACCESS_KEY" not in env_vars, "AWS keys only when named in PIPELINE_SUBMIT_ENV"
    assert "UNRELATED" not in env_vars
    assert passed == ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_REGION"]
    assert GIT_COMMIT_ENV not in env_vars and GIT_DIRTY_ENV not in env_vars  # tmp_path is no git checkout


@pytest.mark.slow
def test_the_job_gets_the_plain_commit_and_whether_the_checkout_had_changes() -> None:
    import subprocess

    runtime_env, _ = build_runtime_env(None, REPO_ROOT, {}, given={})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert runtime_env["env_vars"][GIT_COMMIT_ENV] == head.stdout.strip()
    assert runtime_env["env_vars"][GIT_DIRTY_ENV] in ("true", "false")


def test_extra_env_names_are_passed_only_when_asked_and_set(tmp_path: Path) -> None:
    shell = {"PIPELINE_SUBMIT_ENV": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID": "id"}
    with pytest.raises(PipelineError, match="AWS_SECRET_ACCESS_KEY"):
        build_runtime_env(None, tmp_path, shell)
    shell["AWS_SECRET_ACCESS_KEY"] = "key"
    runtime_env, passed = build_runtime_env(None, tmp_path, shell)
    assert runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "key"
    assert passed == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]


def test_runtime_env_file_with_a_non_string_env_var_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  OMP_NUM_THREADS: 4\n")
    with pytest.raises(PipelineError, match=r"env_vars\.OMP_NUM_THREADS must be a string"):
        build_runtime_env(env_file, tmp_path, {})


def test_entrypoint_default_single_command_line_and_quoted_words() -> None:
    assert entrypoint_command([]) == DEFAULT_ENTRYPOINT
    assert entrypoint_command(["dvc repro && echo ok"]) == "dvc repro && echo ok"
    assert entrypoint_command(["python", "-c", "print('a b')"]) == "python -c 'print('\"'\"'a b'\"'\"')'"


def test_cli_drops_only_the_leading_separator(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.jobs.submit
    from pipeline.__main__ import main

    seen: list[list[str]] = []

    def fake_run_submit(options: pipeline.jobs.submit.SubmitOptions) -> int:
        seen.append((options.entrypoint, options.wait))
        return 0

    monkeypatch.setattr(pipeline.jobs.submit, "run_submit", fake_run_submit)
    assert main(["submit", "--no-wait", "--", "pytest", "--", "-k", "x"]) == 0
    assert main(["submit"]) == 0
    assert seen == [(["pytest", "--", "-k", "x"], False), ([], True)], "waits by default, as ray job submit"
    with pytest.raises(SystemExit):  # one runtime env source, as in `ray job submit`
        main(["submit", "--runtime-env", "a.yaml", "--runtime-env-json", "{}"])


@pytest.mark.parametrize(
    ("options", "env_file", "message"),
    [
        (
            ["--runtime-env-json", ""],
            None,
            "--runtime-env-json is empty: give a JSON object, or leave the option out",
        ),
        (
            ["--runtime-env-json", '{"working_dir": 5}'],
            None,
            "--runtime-env-json: working_dir must be a string (a local folder or a URI such as s3://...),"
            " got 5",
        ),
        (
            ["--runtime-env", "env.yaml"],
            "env_vars:\n  A: [1,\n",
            "env.yaml:3: expected the node content, but found '<stream end>'",
        ),
    ],
    ids=["json-empty", "json-working-dir-number", "yaml-syntax"],
)
def test_a_bad_runtime_env_option_is_one_line_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    env_file: str | None,
    message: str,
) -> None:
    """Refused before any connection is tried: the address leads nowhere."""
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    if env_file is not None:
        (tmp_path / "env.yaml").write_text(env_file)
    assert main(["submit", "--address", "http://127.0.0.1:9", *options, "--", "true"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_token_is_read_in_rays_order_and_disabled_sends_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_headers({}) == ({}, None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "token").write_text("from-path\n")
    bearer = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731

    assert auth_headers({}) == (bearer("from-home"), str(tmp_path / ".ray" / "auth_token"))
    path_env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    assert auth_headers(path_env)[0] == bearer("from-path")
    assert auth_headers({**path_env, "RAY_AUTH_TOKEN": "from-env"}) == (bearer("from-env"), "RAY_AUTH_TOKEN")
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == ({}, None)
    with pytest.raises(PipelineError, match="RAY_AUTH_TOKEN_PATH"):
        auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_tracking_store_local_to_the_job_copy_is_warned_about() -> None:
    assert tracking_warnings({}) and "not set" in tracking_warnings({})[0]
    assert tracking_warnings({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert tracking_warnings({"MLFLOW_TRACKING_URI": "./mlruns"})
    assert tracking_warnings({"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}) == []


SECRET_FILES = (
    ".env",
    ".env.local",
    "prod.env",
    "credentials.json",
    ".aws/credentials",
    ".netrc",
    "id_rsa",
    "id_ed25519.pub",
    "server.pem",
    "tls/private.key",
    "secrets/db.yaml",
    "token",
    "hf_token",
    ".git-credentials",
    "configs/gcp-credentials.json",
)
PROJECT_FILES = ("params.yaml", "pipeline/network/tokenization.py", "recipes/a.yaml", "docs/tokens.md")


def test_the_job_package_leaves_out_secret_files_and_what_gitignore_ignores(tmp_path: Path) -> None:
    """The very package Ray uploads (its own packaging, the runtime env's excludes): no secret, all code."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from pipeline.jobs.runtime_env import excluded_secrets

    project = tmp_path / "project"
    for name in (*SECRET_FILES, *PROJECT_FILES, "scratch/notes.txt"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    (project / ".gitignore").write_text("scratch/\n")
    runtime_env, _ = build_runtime_env(None, project, {})

    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, excludes=runtime_env["excludes"])
    packed = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}

    assert not packed & set(SECRET_FILES), sorted(packed & set(SECRET_FILES))
    assert set(PROJECT_FILES) <= packed
    assert "scratch/notes.txt" not in packed
    reported = dict(excluded_secrets(project))
    assert set(reported) == set(SECRET_FILES)
    assert reported[".env.local"] == ".env.*" and reported["secrets/db.yaml"] == "secrets/"


def test_build_outputs_stay_behind_by_the_projects_own_gitignore(tmp_path: Path) -> None:
    """`pip wheel .` and `python -m build` leave build/ and dist/ (copies of the code) in the project: its
    .gitignore alone keeps them out of the upload, without the runtime env file's excludes."""
    import shutil
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    built = ("build/lib/pipeline/config.py", "dist/seq2seq_pipeline-0.1.0-py3-none-any.whl")
    for name in ("pipeline/config.py", *built):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    shutil.copy(REPO_ROOT / ".gitignore", project / ".gitignore")
    runtime_env, _ = build_runtime_env(None, project, {}, given={})

    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, excludes=runtime_env["excludes"])
    packed = {name for name in zipfile.ZipFile(package).namelist() if not name.endswith("/")}

    assert "pipeline/config.py" in packed
    assert not packed & set(built), sorted(packed & set(built))


def test_runtime_env_json_is_the_starting_point_and_the_project_settings_still_apply(tmp_path: Path) -> None:
    given = {"env_vars": {"FROM_JSON": "1"}, "excludes": ["/scratch"], "pip": ["rich"]}
    runtime_env, _ = build_runtime_env(None, tmp_path, {"HF_TOKEN": "hf_x"}, given=given)
    assert runtime_env["pip"] == ["rich"] and runtime_env["working_dir"] == str(tmp_path)
    assert runtime_env["env_vars"] == {"FROM_JSON": "1", "HF_TOKEN": "hf_x", "PIPELINE_USER": user()}
    assert runtime_env["excludes"][0] == "/scratch" and set(ALWAYS_EXCLUDE) <= set(runtime_env["excludes"])
    with pytest.raises(PipelineError, match="--runtime-env-json: env_vars.N must be a string"):
        build_runtime_env(None, tmp_path, {}, given={"env_vars": {"N": 1}})


def test_a_head_whose_job_agent_is_not_up_yet_gets_the_job_again_and_other_errors_at_once() -> None:
    """Ray's jobs API answers 500 "No available agent to submit job, please try again later." while the
    head's job agent starts, which on a loaded machine takes longer than the head waits for it."""
    from pipeline.jobs.submit import submitted_once_the_agent_is_up

    answers: list[object] = [
        RuntimeError(
            "Request failed with status code 500: No available agent to submit job, please try again later."
        ),
        RuntimeError(
            "Request failed with status code 500: No available agent to submit job, please try again later."
        ),
        "raysubmit_1",
    ]

    def submit() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert submitted_once_the_agent_is_up(submit, wait_s=5, retry_s=0.01) == "raysubmit_1" and answers == []

    def refused() -> str:
        raise RuntimeError("Request failed with status code 400: bad runtime_env")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="400"):
        submitted_once_the_agent_is_up(refused, wait_s=5, retry_s=1)
    assert time.monotonic() - started < 1, "another error is not retried"

    def never_up() -> str:
        raise RuntimeError("500: No available agent to submit job, please try again later.")

    with pytest.raises(RuntimeError, match="No available agent"):
        submitted_once_the_agent_is_up(never_up, wait_s=0.05, retry_s=0.01)
