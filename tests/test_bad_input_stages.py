"""Bad input met by the stages themselves, refused with one line before their work and with nothing
replaced: a broken reports/train_run.json at evaluate, something other than a folder at data/processed, a
Ray storage path that is empty or cannot be opened, a Parquet corpus with a column twice, a database
tracking store without its driver, a tracking server that does not answer. Each runs the real command line
in-process on a small real project; none starts Ray."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.errors import PipelineError
from pipeline.training.ray_session import check_storage_path
from tests.helpers import TINY_PARAMS, deep_merge, prepare_project, random_model_dir, write_params


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command printed on stderr: `error: ...`, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _leftovers(directory: Path) -> list[Path]:
    """Temporaries or moved-aside outputs of any stage."""
    return [p for p in directory.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def project_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/prepared and data/processed of the tiny corpus, and a random model on them (no training)."""
    root = tmp_path_factory.mktemp("template")
    prepare_project(root)
    random_model_dir(root / "data" / "processed", root / "models")
    return root


@pytest.fixture
def project(project_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the template to spoil, as the working directory, with the default tracking store."""
    root = tmp_path / "project"
    shutil.copytree(project_template, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return root


def _set_params(root: Path, overrides: dict) -> None:
    write_params(root, deep_merge(TINY_PARAMS, overrides))


def _closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A port of 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


# ---------------------------------------------------------------------------------------------------------
# evaluate and preprocess: their outputs are kept
# ---------------------------------------------------------------------------------------------------------


def test_evaluate_refuses_a_broken_train_run_before_replacing_its_reports(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = project / "reports"
    (reports / "train_run.json").write_text('{"mlflow_run_id": ')  # cut off mid-write
    (reports / "metrics.json").write_text('{"bleu": 31.5}\n')
    (reports / "samples.jsonl").write_text('{"source": "previous"}\n')
    before = _snapshot(project)

    assert main(["evaluate"]) == 2

    assert _error(capsys).startswith("reports/train_run.json is not valid JSON")
    assert _snapshot(project) == before, "metrics.json and samples.jsonl are the previous ones"
    assert _leftovers(project) == []


def test_preprocess_refuses_a_file_where_data_processed_goes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processed = project / "data" / "processed"
    shutil.rmtree(processed)
    processed.write_text("user notes, not a folder\n")
    before = _snapshot(project)

    assert main(["preprocess"]) == 2

    assert _error(capsys) == "data/processed is a file where the stage writes a folder: move it away"
    assert _snapshot(project) == before
    assert _leftovers(project) == []
    assert main(["preprocess"]) == 2  # a second run does not take the file for a leftover either
    assert _snapshot(project) == before


def test_preprocess_refuses_a_mount_point_at_data_processed(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    processed = project / "data" / "processed"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(processed)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        (processed / "kept.txt").write_text("on the mounted file system")

        assert main(["preprocess"]) == 2

        assert _error(capsys).startswith("data/processed is a mount point, which the stage cannot replace")
        assert (processed / "kept.txt").read_text() == "on the mounted file system"
        assert _leftovers(project) == []
    finally:
        subprocess.run(["umount", str(processed)], check=True)


# ---------------------------------------------------------------------------------------------------------
# runtime.storage_path: checked before Ray starts
# ---------------------------------------------------------------------------------------------------------


def test_an_empty_storage_path_is_refused(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _set_params(project, {"runtime": {"storage_path": ""}})

    assert main(["train"]) == 2

    err = capsys.readouterr().err
    assert "runtime.storage_path: empty: give a folder" in err and "Traceback" not in err
    assert not _ray_started()


def test_a_storage_path_that_cannot_be_opened_is_refused_before_ray_starts(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _set_params(project, {"runtime": {"storage_path": "nosuchfs://bucket/runs"}})

    assert main(["train"]) == 2

    message = _error(capsys)
    assert message.startswith("runtime.storage_path nosuchfs://bucket/runs cannot be used: "), message
    assert "Unrecognized filesystem type" in message
    assert not _ray_started() and not (project / "reports" / "train_run.json").exists()


def test_a_storage_path_that_does_not_answer_is_refused_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Credentials in the environment: the S3 client asks no metadata service; every request goes to the
    # silent port on 127.0.0.1 (pyarrow's client alone would retry for over a minute and a half).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with _silent_listener() as port:
        uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
        started = time.monotonic()
        with pytest.raises(
            PipelineError, match=r"^runtime\.storage_path s3://bucket/runs\?.*: no answer within 2 s"
        ):
            check_storage_path(uri, timeout_s=2)
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------------------
# A Parquet corpus with a column twice
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("struct", [False, True], ids=["columns", "translation-struct"])
def test_a_parquet_corpus_with_a_language_twice_names_the_file_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], struct: bool
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [pa.array(["ein Haus"] * 20), pa.array(["a house"] * 20), pa.array(["the house"] * 20)]
    columns = pa.Table.from_arrays(texts, names=["de", "en", "en"])
    table = (
        pa.table({"translation": pa.StructArray.from_arrays(texts, ["de", "en", "en"])})
        if struct
        else columns
    )
    pq.write_table(table, corpus / "train.parquet")
    write_params(tmp_path, {"data": {"source": "corpus", "src_lang": "de", "tgt_lang": "en"}})
    monkeypatch.chdir(tmp_path)

    assert main(["prepare"]) == 2

    column = "translation.en" if struct else "en"
    assert _error(capsys) == (
        f"corpus/train.parquet: column {column} appears 2 times; keep one column per language"
    )
    assert not (tmp_path / "data" / "prepared").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# The MLflow tracking store: checked before the stage's work
# ---------------------------------------------------------------------------------------------------------


def test_a_database_store_without_its_driver_names_the_package_to_install(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sqlalchemy")
    with pytest.raises(ModuleNotFoundError):
        __import__("pg8000")  # the driver this URI names is not installed here
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"postgresql+pg8000://mlflow:s3cret@127.0.0.1:{_closed_port()}/mlflow"
    )
    before = _snapshot(project)

    assert main(["register"]) == 2

    message = _error(capsys)
    assert message.startswith("MLFLOW_TRACKING_URI=postgresql+pg8000://mlflow:***@127.0.0.1:"), message
    assert message.endswith("its database driver pg8000 is not installed here: pip install 'pg8000'")
    assert "s3cret" not in message
    assert _snapshot(project) == before


@pytest.mark.parametrize("stage", ["train", "evaluate", "register"])
def test_a_tracking_server_that_cannot_be_reached_is_one_line_before_the_stage_works(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # evaluate logs to the run that trained the model, when there is one
    (project / "reports" / "train_run.json").write_text(
        '{"mlflow_run_id": "abc", "ray_run_name": "train-x"}\n'
    )
    (project / "reports" / "metrics.json").write_text('{"bleu": 31.5, "chrf": 50.0}\n')
    before = _snapshot(project)
    started = time.monotonic()

    assert main([stage]) == 2

    assert _error(capsys) == (
        f"MLFLOW_TRACKING_URI={uri}: the MLflow tracking server cannot be reached (Connection refused):"
        " start it, or fix the address"
    )
    assert time.monotonic() - started < 15, "one request, no retries"
    assert _snapshot(project) == before and not _ray_started()


def test_the_tracking_check_passes_the_default_store_and_bounds_a_silent_server(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.tracking import store

    store.check_tracking_store()  # the default SQLite store: its driver is Python's own
    assert not (project / "mlflow.db").exists(), "the check creates nothing"
    with _silent_listener() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(PipelineError, match=r"cannot be reached \(no answer within 1 s\)"):
            store.check_tracking_store(timeout_s=1.0)
        assert time.monotonic() - started < 10
