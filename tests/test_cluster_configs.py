"""The configs in cluster/ are well-formed: checked offline, against Ray's own schema where it has one."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.jobs.runtime_env import ALWAYS_EXCLUDE
from pipeline.jobs.submit import DEFAULT_ENTRYPOINT, PIPELINE_SCRIPT

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER = REPO_ROOT / "cluster"


def _load(relative: str) -> Any:
    return yaml.safe_load((CLUSTER / relative).read_text())


def _ray_schema() -> dict[str, Any]:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_launcher_config_validates_against_the_schema_in_the_ray_package() -> None:
    import jsonschema

    jsonschema.validate(_load("aws-gpu.yaml"), _ray_schema())


def test_launcher_config_passes_rays_own_checks_after_defaults_are_filled_in() -> None:
    """What `ray up` does before it talks to AWS (private helpers: re-check when Ray is upgraded)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_load("aws-gpu.yaml"))))


def test_launcher_config_scales_gpu_workers_from_zero_and_holds_no_keys() -> None:
    config = _load("aws-gpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]

    assert "GPU" not in head["resources"]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t["min_workers"] == 0 and t["max_workers"] <= config["max_workers"] for t in workers)
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|aws_secret_access_key|AKIA[0-9A-Z]{16}", text)
    assert "2.60" in config["docker"]["image"]  # the Ray that `submit` talks to
    # The project is synced and installed, CUDA torch before it.
    assert "." in config["file_mounts"].values()
    torch_step = next(i for i, c in enumerate(config["setup_commands"]) if "torch" in c)
    project_step = next(i for i, c in enumerate(config["setup_commands"]) if "pip install" in c and "-e" in c)
    assert "download.pytorch.org/whl/cu" in config["setup_commands"][torch_step] and torch_step < project_step
    # Token authentication on every node.
    for command in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]):
        assert "ray stop" in command or "RAY_AUTH_MODE=token" in command


@pytest.mark.parametrize("relative", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests_carry_a_head_and_an_autoscaling_gpu_worker_group(relative: str) -> None:
    manifest = _load(relative)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]

    assert spec["rayVersion"].startswith("2.60")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert isinstance(head["rayStartParams"], dict)

    def gpus(group: dict[str, Any]) -> int:
        return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))

    gpu_groups = [group for group in spec["workerGroupSpecs"] if gpus(group) >= 1]
    assert gpu_groups, "a worker group must ask Kubernetes for GPUs"
    for group in gpu_groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_raycluster_and_rayjob_have_their_kinds() -> None:
    assert _load("kuberay/raycluster.yaml")["kind"] == "RayCluster"
    assert _load("kuberay/rayjob.yaml")["kind"] == "RayJob"


def test_rayjob_runs_the_pipeline_entrypoint_and_cleans_up() -> None:
    spec = _load("kuberay/rayjob.yaml")["spec"]

    assert spec["entrypoint"] == DEFAULT_ENTRYPOINT  # the one definition, shared with `submit`
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert "://" in runtime_env["working_dir"]  # nothing to upload from inside Kubernetes
    assert all(isinstance(value, str) for value in runtime_env["env_vars"].values())


# Ray matches excludes with pathspec's "gitwildmatch" (deprecated by pathspec); match the same way.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_runtime_env_file_parses_and_keeps_stage_outputs_and_environments_local() -> None:
    runtime_env = _load("runtime_env.yaml")
    assert set(runtime_env) <= {"env_vars", "excludes", "working_dir", "py_modules", "pip", "uv", "conda"}
    assert all(isinstance(value, str) for value in runtime_env.get("env_vars", {}).values())

    from pathspec import PathSpec

    excluded = PathSpec.from_lines("gitwildmatch", [*runtime_env["excludes"], *ALWAYS_EXCLUDE]).match_file
    for path in (
        "data",
        "data/processed/train.pt",
        "models",
        ".venv",
        ".git",
        "mlflow.db",
        ".dvc/cache",
        "build/lib/pipeline/config.py",
        "dist/seq2seq_pipeline-0.1.0-py3-none-any.whl",
    ):
        assert excluded(path), f"{path} would be uploaded"
    for path in (
        "pipeline/data/__init__.py",
        "params.yaml",
        "dvc.yaml",
        ".dvc/config",
        "cluster/run_pipeline.sh",
    ):
        assert not excluded(path), f"{path} would be left behind"


def test_the_pipeline_script_exists_and_avoids_git() -> None:
    script = (REPO_ROOT / PIPELINE_SCRIPT).read_text()
    assert "core.no_scm true" in script and "repro" in script


SCHEMAS = Path(__file__).parent / "schemas"
KUBERAY_VERSION = "v1.7.0"  # the release the vendored schemas come from (tests/schemas/*.json.gz)


def _kuberay_schema(kind: str) -> dict[str, Any]:
    """KubeRay's own openAPIV3Schema for `kind`, strict: an object that lists its properties allows no
    others (the API server would prune an unknown field silently; a misspelt key is a mistake here)."""
    import gzip

    vendored = json.loads(
        gzip.decompress((SCHEMAS / f"kuberay-{KUBERAY_VERSION}-{kind.lower()}.json.gz").read_bytes())
    )
    assert vendored["kuberay_version"] == KUBERAY_VERSION and vendored["kind"] == kind

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            node = {key: strict(value) for key, value in node.items()}
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            return node
        if isinstance(node, list):
            return [strict(value) for value in node]
        return node

    return strict(vendored["openAPIV3Schema"])


@pytest.mark.parametrize(
    ("relative", "kind"), [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob.yaml", "RayJob")]
)
def test_kuberay_manifests_validate_against_kuberays_own_crd_schema(relative: str, kind: str) -> None:
    import jsonschema

    documents = [
        doc for doc in yaml.safe_load_all((CLUSTER / relative).read_text()) if doc and doc.get("kind") == kind
    ]
    assert documents, f"no {kind} in {relative}"
    validator = jsonschema.Draft7Validator(_kuberay_schema(kind))
    for document in documents:
        errors = sorted(validator.iter_errors(document), key=lambda error: list(error.absolute_path))
        assert not errors, "\n".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
        )


def test_the_strict_schema_catches_a_misspelt_field() -> None:
    import jsonschema

    manifest = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text()) if d)
    broken = copy.deepcopy(manifest)
    broken["spec"]["headGroupSpec"]["rayStartParam"] = {}  # rayStartParams, misspelt
    assert list(jsonschema.Draft7Validator(_kuberay_schema("RayCluster")).iter_errors(broken))


def test_every_cluster_file_installs_the_same_cuda_build_and_the_cluster_extra() -> None:
    texts = {name: (CLUSTER / name).read_text() for name in ("Dockerfile", "aws-gpu.yaml")}
    builds = {
        name: set(re.findall(r"download\.pytorch\.org/whl/(cu\d+)", text)) for name, text in texts.items()
    }
    assert set().union(*builds.values()) == {"cu128"} and all(builds.values()), builds
    assert all("[cluster]" in text for text in texts.values()), "dvc-s3 comes with the cluster extra"


def _install_commands() -> dict[str, list[str]]:
    """Each shell command (split at && and ;) of the Dockerfile's RUN lines and of aws-gpu.yaml's
    *_commands lists that runs `pip install`, by file."""
    dockerfile = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.split("RUN", 1)[1] for line in dockerfile.splitlines() if line.startswith("RUN ")]
    config = _load("aws-gpu.yaml")
    setup = [command for key, value in config.items() if key.endswith("_commands") for command in value]
    found = {}
    for name, lines in (("Dockerfile", runs), ("aws-gpu.yaml", setup)):
        commands = [part.strip() for line in lines for part in re.split(r"&&|;|\n", line)]
        found[name] = [command for command in commands if re.search(r"\bpip3? install\b", command)]
    return found


def test_every_install_in_the_cluster_files_uses_the_constraints_except_cuda_torch() -> None:
    """The nodes get the versions the tests passed with. torch is the exception, on purpose: it comes first
    from PyTorch's CUDA index, and constraints.txt leaves it out so pip keeps that build."""
    constraint = re.compile(r"(^|\s)(-c|--constraint)[\s=]\"?\S*constraints\.txt\b")
    cuda_torch = re.compile(r"pip install (--no-cache-dir )?torch --index-url \S+$")
    for name, commands in _install_commands().items():
        torch_first, *project = commands
        assert cuda_torch.fullmatch(torch_first), f"{name}: {torch_first}"
        assert project, f"{name} installs nothing but torch"
        unconstrained = [command for command in project if not constraint.search(command)]
        assert not unconstrained, f"{name} installs without -c constraints.txt: {unconstrained}"
    copied = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    assert any("constraints.txt" in line for line in copied), "the image needs constraints.txt to use it"


def test_the_cluster_extra_brings_boto3_and_constraints_pin_it() -> None:
    """`ray up` (here) and the autoscaler (on the head) need boto3 to talk to EC2."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^cluster = \[(.*)\]$", pyproject, flags=re.MULTILINE)
    assert extra and '"boto3' in extra[1]
    pins = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    for package in ("boto3", "botocore", "dvc-s3"):
        assert any(line.startswith(f"{package}==") for line in pins), f"constraints.txt lacks {package}"


def test_the_submit_commands_shown_in_the_cluster_files_parse() -> None:
    """Each `python -m pipeline submit ...` written out as a command (not quoted in a sentence) is one the
    real argument parser accepts."""
    import shlex

    from pipeline.__main__ import _build_parser

    shown = re.compile(r"(?<!`)python -m pipeline submit(?P<arguments>[^`\n]*)$", flags=re.MULTILINE)
    commands = [
        match["arguments"]
        for path in sorted(CLUSTER.rglob("*"))
        if path.is_file() and path.suffix in {".md", ".yaml", ""}
        for match in shown.finditer(path.read_text())
    ]
    assert len(commands) >= 3
    for arguments in commands:
        _build_parser().parse_args(["submit", *shlex.split(arguments, comments=True)])
