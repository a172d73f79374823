"""`translate --input FILE_OR_DIR --output PATH`: a file (or a folder of files, in name order) translated by
a pool of model actors on Ray Data, one GPU each where the cluster has GPUs, else CPU actors.

    read lines (one task, on this node, where the input is) -> blocks of `max_sentences` lines
    -> map_batches(TranslatorActor) on every node -> lines written in input order, as they come

The input is cut into the very chunks `translate` cuts stdin into, and each actor runs the same
`Translator.translate` on a chunk, so the output equals `translate < FILE` line for line; on a GPU the
Translator cuts each chunk into batches by padded tokens. Nothing holds the file: the driver writes each
block once it is next in order, into a temporary file renamed to PATH at the end. The model folder goes to
the actors through Ray's object store, so nodes need no shared disk. Run it on a cluster as a Ray job:
`python -m pipeline submit -- python -m pipeline translate --input ... --output ...`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import ray
import torch

from pipeline.data.folder_source import read_lines
from pipeline.data.ray_blocks import (
    ONE_THREAD_ACTOR_ENV,
    actor_pool,
    ordered_execution,
    read_stream,
    task_errors_as_pipeline_errors,
)
from pipeline.errors import PipelineError
from pipeline.files import atomic_file, check_file_target, not_a_regular_file
from pipeline.jobs import object_store
from pipeline.network.model_files import load_model_dir
from pipeline.network.translator import InputBounds, Translator
from pipeline.tracking.registry import local_model_dir
from pipeline.training.ray_session import cluster_address

logger = logging.getLogger(__name__)

# How long the whole pool may take to start (an autoscaling cluster adds a GPU node in a few minutes).
ACTOR_START_TIMEOUT_S = 600


def input_files(path: Path) -> list[Path]:
    """The file itself, or a folder's visible regular files in name order."""
    if not os.path.lexists(path):
        raise PipelineError(f"--input {path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if files:
            return files
        raise PipelineError(f"--input {path}: the folder holds no files to translate")
    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO is read once, and Ray may read its input twice: stdin is for streams
        raise PipelineError(
            f"--input {path} is {kind}, not a regular file: give a file or a folder of files (send a stream"
            " to `translate` on stdin)"
        )
    return [path]


def check_locations(source: str | Path, output: str | Path) -> None:
    """What can be known before Ray starts: the input is there, the output can be written, and writing it
    would not replace the input (its translations would take the place of the text)."""
    # Path("") is the current folder: the project's every file would be the input.
    if str(source) == "":
        raise PipelineError("--input is empty: give the file, or the folder of files, to translate")
    if str(output) == "":
        raise PipelineError("--output is empty: give the path of the file to write")
    if object_store.is_uri(output) and str(source).rstrip("/") == str(output).rstrip("/"):
        raise PipelineError(f"--output {output} is the --input: write the translations elsewhere")
    if not object_store.is_uri(source):
        input_files(Path(source))
    if not object_store.is_uri(output):
        if not object_store.is_uri(source):
            _check_apart(Path(source), Path(output))
        check_file_target(Path(output), "--output")


def _check_apart(source: Path, output: Path) -> None:
    """Refuse an `output` that is the input file, or a file of the input folder, under any spelling: through
    symlinks, `..`, a hard link."""
    target = output.resolve()
    if source.is_dir():
        # Also a file not written yet: the next run would translate it as input.
        if target.parent == source.resolve() and not target.name.startswith("."):
            raise PipelineError(
                f"--output {output} is in the --input folder {source}, whose every file is translated:"
                " write it elsewhere"
            )
    elif target == source.resolve() or (output.exists() and output.samefile(source)):
        raise PipelineError(
            f"--output {output} is the --input {source}: writing it would replace the text with its"
            " translations; write them elsewhere"
        )


def check_text(files: list[Path]) -> None:
    """Every line of every input file is strict UTF-8, or one error naming the file and line, before the
    pool starts: in the read task, a bad byte near the end of a long input would stop the job after the
    translation of everything before it. One pass of reading, small beside translating the same lines."""
    for path in files:
        for _ in read_lines(path):
            pass


def _read_chunks(files: list[Path], chunk: int) -> Callable[[], Iterator[pa.Table]]:
    """The read task: every file's lines end to end (strict UTF-8; a bad byte names file and line), in
    tables of `chunk` lines, numbered from 1 across files as `translate` numbers stdin lines."""

    def read() -> Iterator[pa.Table]:
        lines: list[str] = []
        first = 1
        for path in files:
            for _, text in read_lines(path):
                lines.append(text)
                if len(lines) == chunk:
                    yield pa.table({"number": range(first, first + chunk), "text": lines})
                    first, lines = first + chunk, []
        if lines:
            yield pa.table({"number": range(first, first + len(lines)), "text": lines})

    return read


class TranslatorActor:
    """One model, loaded once from the folder's files, translating a chunk of lines per call."""

    def __init__(
        self, files: dict[str, bytes], device: str, beam_size: int | None, bounds: InputBounds
    ) -> None:
        if device == "cpu":  # one thread per actor: the actors are the parallelism, and threads would fight
            torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
            self.translator = Translator.from_dir(folder, device=device, bounds=bounds)
        self.beam_size = beam_size

    def __call__(self, block: pa.Table) -> pa.Table:
        texts = block.column("text").to_pylist()
        first = block.column("number")[0].as_py() if block.num_rows else 1
        out = self.translator.translate(texts, beam_size=self.beam_size, unit="line", first_number=first)
        # One line per input, always: a stray newline in an output would shift every later line.
        return pa.table({"translation": [" ".join(text.splitlines()) for text in out]})


def model_files(model: str) -> dict[str, bytes]:
    """The model folder's files, from a folder or an MLflow models:/ URI, checked by loading it once."""
    with local_model_dir(model) as folder:
        load_model_dir(folder)  # a bad folder fails here, with the file at fault, not in every actor
        return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def translate_file(
    source: str | Path,
    output: str | Path,
    model: str,
    beam_size: int | None = None,
    actors: int | None = None,
    bounds: InputBounds | None = None,
    device: str = "auto",
) -> int:
    """Translate `source` into `output` on the connected Ray cluster; returns the lines written. Either may be
    an object-store URI (s3://...; see object_store.py), else a path on the driver's machine. `device`
    auto: GPU actors when the cluster has GPUs now, else CPU actors; cuda: GPU actors whether or not the
    cluster has GPUs yet (the request is what makes an autoscaler add GPU nodes); cpu: CPU actors."""
    check_locations(source, output)
    with tempfile.TemporaryDirectory(prefix="translate-") as staging:
        local_source = (
            object_store.fetch(str(source), Path(staging)) if object_store.is_uri(source) else source
        )
        local_output = Path(staging, "output.txt") if object_store.is_uri(output) else Path(output)
        written = _translate_local(
            Path(local_source),
            local_output,
            model,
            beam_size,
            actors,
            bounds or InputBounds.resolve(),
            device,
        )
        if object_store.is_uri(output):
            object_store.upload(local_output, str(output))
            logger.info("uploaded -> %s", output)
    return written


def _translate_local(
    source: Path,
    output: Path,
    model: str,
    beam_size: int | None,
    actors: int | None,
    bounds: InputBounds,
    device: str,
) -> int:
    files = input_files(source)
    check_text(files)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpus = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpus:
        pool = actors or max(1, gpus)
        # A cluster may add GPU nodes for the pool (an autoscaler); a local Ray never will.
        if pool > gpus and cluster_address() is None:
            raise PipelineError(
                f"--actors {pool}: each model actor takes a GPU, and this machine's Ray has {gpus}"
            )
        options = {
            "compute": ray.data.ActorPoolStrategy(size=pool),
            "num_gpus": 1,
            "num_cpus": 0,
            "runtime_env": ONE_THREAD_ACTOR_ENV,
        }
    else:
        pool, options = actor_pool(actors)
    kind = "GPU" if use_gpus else "CPU"
    logger.info("translating %s with %d %s actor(s) -> %s", source, pool, kind, output)
    settings = {"device": "cuda" if use_gpus else "cpu", "beam_size": beam_size, "bounds": bounds}
    # Inside the context: a dataset keeps the Ray Data settings of the moment it is made. Every model
    # actor is up before the first chunk goes out: without the wait, the first actors to load their model
    # would take a short job's every chunk. Ray Data then gives a chunk to an actor on the node holding
    # it while one there has room, else to the least busy actor anywhere.
    with (
        ordered_execution(ACTOR_START_TIMEOUT_S),
        task_errors_as_pipeline_errors(),
        _actor_start_errors(pool),
    ):
        lines = read_stream(_read_chunks(files, bounds.max_sentences), "ReadLines", bounds.max_sentences)
        translated = lines.map_batches(
            TranslatorActor,
            fn_constructor_args=(model_files(model),),
            fn_constructor_kwargs=settings,
            batch_format="pyarrow",
            batch_size=bounds.max_sentences,
            **options,
        )
        return _write_in_order(translated, output)


@contextmanager
def _actor_start_errors(pool: int) -> Iterator[None]:
    """Ray Data's timeout for a pool that cannot start, as one line that says what was asked for."""
    try:
        yield
    except ray.exceptions.GetTimeoutError:
        raise PipelineError(
            f"the {pool} model actor(s) did not all start within {ACTOR_START_TIMEOUT_S} s; the cluster has"
            f" {ray.cluster_resources()} in all, {ray.available_resources()} free now: lower --actors"
        ) from None


def _write_in_order(translated: ray.data.Dataset, output: Path) -> int:
    """Into a temporary beside `output` (with the umask's permissions), renamed over it once complete: a
    failed or stopped job leaves the previous file, and no partial one."""
    written = 0
    with atomic_file(output) as sink:
        for batch in translated.iter_batches(batch_format="pyarrow", batch_size=None):
            for text in batch.column("translation").to_pylist():
                sink.write(text + "\n")
            written += batch.num_rows
    logger.info("%d lines -> %s", written, output)
    return written
