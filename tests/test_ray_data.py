"""The Ray Data engine against the local one, and batch translation against `translate` on stdin, on one
real local Ray instance shared by the module.

The corpus is small, so blocks are made small too: several map tasks, actors and group-by partitions
take part, as they do at scale.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import (
    different_files,
    joining_ray_env,
    random_model_dir,
    run_data_stages,
    stdin_translation,
    working_directory,
    write_params,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_instance", "one_torch_thread", "small_blocks")]


@pytest.fixture(scope="module")
def small_blocks() -> object:
    from pipeline.data import ray_encode, ray_prepare

    saved = ray_prepare.BLOCK_ROWS, ray_encode.BLOCK_ROWS
    ray_prepare.BLOCK_ROWS = ray_encode.BLOCK_ROWS = 64
    yield
    ray_prepare.BLOCK_ROWS, ray_encode.BLOCK_ROWS = saved


def messy_corpus(folder: Path) -> Path:
    """train.tsv with exact and whitespace-only duplicates, pairs also in test, empty, too long and
    badly proportioned pairs; test.parquet given, validation carved."""
    from pipeline.data.builtin_corpus import iter_corpus

    pairs = list(iter_corpus(400, seed=3))
    test = pairs[:30]
    train = list(pairs[30:])
    train += pairs[40:80]  # exact duplicates, later: the first occurrence is kept
    train += [
        (f"  {src}\u00a0", tgt.replace(" ", "  ")) for src, tgt in pairs[100:120]
    ]  # same after cleaning
    train += pairs[5:25]  # in the test split
    train += [("", "x"), ("word", "")] + [("a " * 80, "b " * 80), ("one", "one two three four five six")]
    train = [train[(i * 37) % len(train)] for i in range(len(train))]  # interleave (37 is coprime)
    folder.mkdir()
    lines = ["en\tart"] + [f"{src}\t{tgt}" for src, tgt in train]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    columns = {"art": [tgt for _, tgt in test], "en": [src for src, _ in test]}
    pq.write_table(pa.table(columns), folder / "test.parquet", row_group_size=8)
    return folder


@pytest.fixture(scope="module")
def engine_projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engines")
    corpus = messy_corpus(root / "corpus")
    run_data_stages(root / "local", str(corpus), "local")
    run_data_stages(root / "ray", str(corpus), "ray")
    return root / "local", root / "ray"


def test_engines_write_the_same_pairs_splits_ids_and_reports(engine_projects: tuple[Path, Path]) -> None:
    import json

    local, ray_project = engine_projects
    assert different_files(local, ray_project) == []
    stats = json.loads((ray_project / "reports/prepare_stats.json").read_text())
    dropped = stats["dropped"]["train"]
    assert dropped["duplicate"] >= 60 and dropped["in_eval_split"] == 20, dropped
    assert dropped["empty"] == 2 and dropped["too_long"] == 1 and dropped["length_ratio"] == 1, dropped
    assert stats["carved"] == {"validation": True, "test": False}


def prepare_stderr(project: Path, engine: str) -> tuple[int, str]:
    """`prepare` in a process of its own; with the Ray engine it joins this module's Ray (RAY_ADDRESS), as a
    stage in a Ray job does."""
    write_params(project, {"data": {"source": str(project / "corpus"), "engine": engine, "src_lang": "de"}})
    env = joining_ray_env()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "prepare"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done.returncode, done.stderr


def test_a_bad_line_gives_the_local_engines_one_line_error(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [f"line {i}" for i in range(300)]
    (corpus / "train.de").write_bytes("\n".join(good).encode() + b"\n")
    (corpus / "train.art").write_bytes(
        "\n".join(good[:250]).encode() + b"\nbad \xff byte\n" + "\n".join(good[251:]).encode() + b"\n"
    )
    local_code, local_err = prepare_stderr(tmp_path, "local")
    ray_code, ray_err = prepare_stderr(tmp_path, "ray")
    expected = f"error: {corpus / 'train.art'}:251: invalid UTF-8"
    assert local_code == ray_code == 2
    error_lines = [line for line in ray_err.splitlines() if line.startswith("error:")]
    assert error_lines == [line for line in local_err.splitlines() if line.startswith("error:")]
    assert error_lines[0].startswith(expected), error_lines
    assert "Traceback" not in ray_err, ray_err[-3000:]
    assert not (tmp_path / "data/prepared").exists()


def test_a_null_in_a_prepared_evaluation_split_names_the_file_under_ray(tmp_path: Path) -> None:
    """The tokenizer actors get checked text: a null is the local engine's one line, from the read task."""
    from pipeline.config import PreprocessConfig
    from pipeline.data.prepared import PreparedData
    from pipeline.data.ray_encode import ray_encoder
    from pipeline.errors import PipelineError
    from pipeline.network.tokenization import train_tokenizer

    path = tmp_path / "validation.arrow"
    table = pa.table({"src": ["ein hund", None, "eine katze"], "tgt": ["a dog", "a man", "a cat"]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    prepared = PreparedData(tmp_path, {"validation": 3})
    assert prepared.split_path("validation") == path
    tokenizer = train_tokenizer(["a dog", "a cat", "ein hund"], PreprocessConfig())
    with pytest.raises(PipelineError, match=rf"^{path}: column 'src' has 1 null value"):
        list(ray_encoder(prepared, tokenizer, tokenizer, actors=1)("validation"))


def test_split_files_of_other_string_types_and_columns_encode_as_the_local_engine(tmp_path: Path) -> None:
    """The splits go through one stream, whose blocks join the end of one file and the start of the next:
    files the local engine reads (large strings in one, plain in the other, a column of their own, even one
    named like the stream's split tag) give the local engine's batches, split by split."""
    import numpy as np

    from pipeline.config import PreprocessConfig
    from pipeline.data.prepared import PreparedData
    from pipeline.data.processed import local_encoder
    from pipeline.data.ray_encode import ray_encoder
    from pipeline.network.tokenization import train_tokenizer

    texts = {
        "validation": (["ein hund", "eine katze"], ["a dog", "a cat"]),
        "test": (["ein mann", "zwei hunde", "eine frau"], ["a man", "two dogs", "a woman"]),
    }
    large = pa.large_string()
    tables = {
        "validation": pa.table(
            {
                "split": ["x", "y"],  # the stream's own tag column has this name
                "src": pa.array(texts["validation"][0], large),
                "tgt": texts["validation"][1],
            }
        ),
        "test": pa.table({"src": texts["test"][0], "tgt": texts["test"][1]}),
    }
    for name, table in tables.items():
        with (
            pa.OSFile(str(tmp_path / f"{name}.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
    prepared = PreparedData(tmp_path, {name: len(table) for name, table in tables.items()})
    every_text = [text for pair in texts.values() for side in pair for text in side]
    tokenizer = train_tokenizer(every_text, PreprocessConfig())

    def encoded(encoder) -> dict[str, list[list[int]]]:
        return {
            name: [np.concatenate(parts).tolist() for parts in zip(*encoder(name), strict=True)]
            for name in ("validation", "test")
        }

    ray_side = ray_encoder(prepared, tokenizer, tokenizer, actors=1)
    try:
        assert encoded(ray_side) == encoded(local_encoder(prepared, tokenizer, tokenizer))
    finally:
        ray_side.close()


def test_cpu_actors_run_one_tokenizer_thread_and_no_more_actors_than_cpus() -> None:
    """RAYON_NUM_THREADS in every actor's environment (one thread each, not one per core each), and a pool
    larger than the cluster's CPUs refused before any actor starts."""
    import ray

    from pipeline.data.ray_blocks import actor_pool
    from pipeline.errors import PipelineError

    class Environment:
        def __call__(self, block: dict) -> dict:
            return {"threads": [os.environ.get("RAYON_NUM_THREADS", "unset")] * len(block["id"])}

    _, options = actor_pool(1)
    seen = ray.data.range(4).map_batches(Environment, batch_size=None, **options).take_all()
    assert {row["threads"] for row in seen} == {"1"}
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(PipelineError, match=rf"^--actors {cpus + 1}: .* the cluster has {cpus} CPUs"):
        actor_pool(cpus + 1)


# ------------------------------------------------------------------------------------------ batch translation


@pytest.fixture(scope="module")
def model_dir(engine_projects: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model_dir(
        engine_projects[1] / "data/processed", tmp_path_factory.mktemp("model") / "models"
    )


def test_batch_translation_keeps_order_and_equals_stdin(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder's files translate in order, as `translate` on stdin does; the output is written in a folder
    the translation makes, alone there, with the umask's permissions (as every other output; once 0600)."""
    import stat

    from pipeline.__main__ import main
    from pipeline.data.builtin_corpus import iter_corpus

    sources = [src for src, _ in iter_corpus(120, seed=9)]
    sources[7], sources[60] = "", "  odd\u00a0 spacing\tand   runs "  # empty lines translate to empty lines
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "a.txt").write_text("\n".join(sources[:70]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(sources[70:]) + "\n", encoding="utf-8")
    args = ["-q", "translate", "--model", str(model_dir), "--max-sentences", "25", "--actors", "2"]
    output = tmp_path / "out" / "translations.txt"
    previous_umask = os.umask(0o022)
    try:
        assert main([*args, "--input", str(folder), "--output", str(output)]) == 0
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o644
    assert [path.name for path in output.parent.iterdir()] == ["translations.txt"]
    batch = output.read_text(encoding="utf-8")
    expected = stdin_translation(model_dir, ("\n".join(sources) + "\n").encode(), capsys, monkeypatch)
    assert batch.count("\n") == len(sources)
    assert batch == expected
    assert batch.splitlines()[7] == ""


def _translator_actors() -> int:
    """The model actors this module's Ray has started so far, alive or not."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, detail=True)
    return sum("TranslatorActor" in (actor.class_name or "") for actor in actors)


def test_batch_translation_names_the_bad_line_before_any_model_actor_starts(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The bad byte is on the last line: the job stops with it before a model actor starts, not after
    translating the lines before it."""
    from pipeline.__main__ import main

    (tmp_path / "in.txt").write_bytes(b"one\ntwo\n" * 100 + b"th\xffree\n")
    started_before = _translator_actors()
    code = main(
        [
            "-q",
            "translate",
            "--model",
            str(model_dir),
            "--input",
            str(tmp_path / "in.txt"),
            "--output",
            str(tmp_path / "out.txt"),
        ]
    )
    assert code == 2
    assert f"error: {tmp_path / 'in.txt'}:201: invalid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()
    assert _translator_actors() == started_before


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, path.read_text(errors="replace")
        assert time.monotonic() < deadline, path.read_text(errors="replace")
        time.sleep(0.2)


def test_sigterm_during_a_batch_translation_stops_it_cleanly(tmp_path: Path, model_dir: Path) -> None:
    """The job joins this module's Ray; SIGTERM while the model actor translates (a random model decodes
    each line to its length limit) ends it as SIGTERM ends a stage, not with Ray's native stack dump and
    exit 134."""
    (tmp_path / "in.txt").write_text("alpha bravo charlie delta echo\n" * 5000)
    (tmp_path / "out.txt").write_text("the previous translations\n")
    stderr = tmp_path / "stderr.txt"
    env = joining_ray_env()
    command = [sys.executable, "-m", "pipeline", "-q", "translate", "--model", str(model_dir)]
    command += ["--input", "in.txt", "--output", "out.txt", "--actors", "1", "--max-sentences", "20"]
    with stderr.open("w") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        _wait_for(stderr, "translating in.txt with 1 CPU actor(s)", process, 120)
        time.sleep(1)  # the job is under way: the output's temporary is open, the actor starting
        assert process.poll() is None, stderr.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = stderr.read_text().splitlines()
    assert lines[-1] == "stopped by SIGTERM: outputs of the interrupted step were not replaced", lines
    assert not any("Traceback" in line or "SIGTERM received" in line for line in lines), lines
    assert (tmp_path / "out.txt").read_text() == "the previous translations\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.txt", "out.txt", "stderr.txt"]


def test_a_model_pool_that_cannot_start_stops_with_one_line(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CPU held by a placement group: the pool's actors cannot start, and after the timeout the
    job stops with what it asked for, rather than waiting for ever; the output is not written."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.errors import PipelineError
    from pipeline.jobs import batch_translate

    (tmp_path / "in.txt").write_text("one\ntwo\n", encoding="utf-8")
    monkeypatch.setattr(batch_translate, "ACTOR_START_TIMEOUT_S", 5)
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(held.ready(), timeout=30)
    try:
        with pytest.raises(PipelineError, match=r"the 2 model actor\(s\) did not all start within 5 s"):
            batch_translate.translate_file(
                tmp_path / "in.txt", tmp_path / "out.txt", str(model_dir), actors=2
            )
    finally:
        remove_placement_group(held)
    assert not (tmp_path / "out.txt").exists()


def _gpu_demand(gcs_address: str) -> float:
    """The GPUs that pending requests ask of the cluster: what an autoscaler reads to add GPU nodes."""
    from ray._raylet import GcsClient
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(GcsClient(address=gcs_address))
    pending = state.pending_resource_requests
    return sum(request.request.resources_bundle.get("GPU", 0.0) for request in pending)


def test_cuda_actors_are_asked_for_before_the_cluster_has_a_gpu(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda` on a cluster without GPUs yet (an autoscaler adds them when asked): the pool asks for
    GPU actors, the demand shows in the cluster's pending requests, and with no GPU node coming the job
    stops after the start timeout with one line. `auto` would have picked CPU actors and never asked."""
    import threading
    import time

    import ray

    from pipeline.errors import PipelineError
    from pipeline.jobs import batch_translate

    gcs_address = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", gcs_address)  # a driver that joined a cluster, as a Ray job's does
    monkeypatch.setattr(batch_translate, "ACTOR_START_TIMEOUT_S", 12)
    assert not ray.cluster_resources().get("GPU")
    (tmp_path / "in.txt").write_text("one\ntwo\n", encoding="utf-8")
    errors: list[BaseException] = []

    def translate() -> None:
        try:
            batch_translate.translate_file(
                tmp_path / "in.txt", tmp_path / "out.txt", str(model_dir), actors=1, device="cuda"
            )
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    worker = threading.Thread(target=translate, daemon=True)
    worker.start()
    demanded, deadline = 0.0, time.monotonic() + 11
    while not demanded and time.monotonic() < deadline:
        demanded = _gpu_demand(gcs_address)
        time.sleep(0.5)
    worker.join(timeout=90)
    assert demanded >= 1, "no GPU request reached the cluster's pending demand"
    assert len(errors) == 1 and isinstance(errors[0], PipelineError), errors
    assert "did not all start within 12 s" in str(errors[0])
    assert not (tmp_path / "out.txt").exists()


def test_blocks_leave_the_read_task_while_it_is_still_reading(tmp_path: Path) -> None:
    """A split is read by one task: its first blocks must reach the map tasks and the driver before the
    read ends, or no other core works meanwhile and the read task holds up to a whole block of text.
    Halfway, the read waits (up to 60 s) for the driver to have a block."""
    import time

    from pipeline.data.ray_blocks import READ_BLOCK_BYTES, read_stream

    seen, finished = tmp_path / "driver-has-a-block", tmp_path / "read-finished"
    rows, tables = 2_000, 8
    text = "x" * (2 * READ_BLOCK_BYTES // rows)  # each table is two read blocks' worth of text

    def read() -> object:
        for number in range(tables):
            yield pa.table({"text": [text] * rows})
            deadline = time.monotonic() + 60
            while number == tables // 2 and not seen.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        finished.touch()

    blocks = read_stream(read, "WaitingRead", block_rows=rows).iter_batches(
        batch_format="pyarrow", batch_size=None
    )
    first = next(iter(blocks))
    seen.touch()
    assert first.num_rows == rows
    assert not finished.exists(), "the driver had no block before the whole split had been read"


def _sleep_on_even_blocks(block: pa.Table) -> pa.Table:
    """A map step whose even blocks finish last: without the order setting, blocks come out of order."""
    import time

    if block.column("n")[0].as_py() // 32 % 2 == 0:
        time.sleep(1.0)  # long enough that an odd block overtakes it even on a busy machine
    return block


@pytest.mark.parametrize("preserve_order", [True, False])
def test_the_engines_order_survives_blocks_that_finish_out_of_order(preserve_order: bool) -> None:
    """What keeps the Ray engine's files equal to the local engine's on any number of cores: blocks that
    finish out of order (forced here; rare on 2 CPUs) still come out in input order under
    `ordered_execution`. The same pipeline without the setting shows that the disorder is real."""
    from pipeline.data.ray_blocks import ordered_execution, read_stream

    def read() -> object:
        for start in range(0, 256, 32):
            yield pa.table({"n": list(range(start, start + 32))})

    with ordered_execution() as context:
        context.execution_options.preserve_order = preserve_order
        mapped = read_stream(read, "NumberedRead", block_rows=32).map_batches(
            _sleep_on_even_blocks, batch_format="pyarrow", batch_size=None, concurrency=4
        )
        numbers = [
            n
            for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None)
            for n in batch.column("n").to_pylist()
        ]
    assert sorted(numbers) == list(range(256))
    assert (numbers == list(range(256))) == preserve_order


def test_a_driver_that_joined_a_cluster_puts_the_training_data_in_the_object_store(
    engine_projects: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An autoscaling cluster adds its workers after the stage asked for them: with only the driver's node
    alive now, a driver that joined a cluster (RAY_ADDRESS, as every Ray job's does) must still put the
    splits in the object store, or a worker that joins later opens the driver's data/processed path."""
    import ray

    from pipeline.data.processed import load_processed
    from pipeline.training.trainer import put_training_data

    local, _ = engine_projects
    assert sum(node["Alive"] for node in ray.nodes()) == 1
    with working_directory(local):
        processed = load_processed()
        alone = put_training_data(processed)
        monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        joined = put_training_data(processed, max_examples=10)
    assert alone.train.ref is None, "a local Ray started for the stage has one node for good"
    assert joined.train.ref is not None and joined.validation.ref is not None
    replica = ray.get(joined.train.ref)
    assert len(replica) == 10 and replica.src(3).tolist() == joined.train.open().src(3).tolist()
