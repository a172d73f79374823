"""What every Ray Data pipeline of the project shares: a stream read as blocks, the execution settings, and
the translation of a failed task back into the project's one-line error.

A stream (a corpus split through the project's own readers, an Arrow file, lines of text) is read by one
Ray task that yields Arrow tables; Ray Data then cuts them into blocks that the map tasks and actors of
every node work on. The read task runs on the driver's node: that is where a local corpus, data/prepared
and an input file are, whatever other nodes the cluster has. Rows stay in input order throughout
(`preserve_order`), so what a pipeline writes does not depend on which task finished first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.errors import PipelineError
from pipeline.progress import quiet

# Where Ray Data logs a failed task's traceback before it raises the error.
_TRACEBACK_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")
# Ray Data appends this to the message of an exception raised in a task; the project's errors are one line.
_RAY_SUFFIX = "\nFailed to apply UDF transform"
# The largest block of a pipeline that starts with `read_stream` (its read task's, and every later
# operator's): about 7,000 pairs of short sentences, about the size of a cleaned or encoded 5,000-pair
# block of them.
READ_BLOCK_BYTES = 1 << 20


class StreamSource(Datasource):
    """One read task that yields the tables of `read()` (a picklable function run on the worker)."""

    def __init__(self, read: Callable[[], Iterable[pa.Table]], name: str) -> None:
        super().__init__()
        self._read, self._name = read, name

    def get_name(self) -> str:
        return self._name

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: DataContext | None = None
    ) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(self._read, metadata)]


def read_stream(read: Callable[[], Iterable[pa.Table]], name: str, block_rows: int) -> ray.data.Dataset:
    """The stream as a dataset of blocks of at most `block_rows` rows, read on this (the driver's) node."""
    here = ray.get_runtime_context().get_node_id()
    dataset = ray.data.read_datasource(
        StreamSource(_in_directory(read, os.getcwd()), name),
        override_num_blocks=1,
        num_cpus=0,  # reading is light, and actors that hold every CPU must not starve it
        label_selector={"ray.io/node-id": here},  # as Ray pins its own local:// reads to the driver
    )
    # The read task's tables would otherwise be merged into one block of up to 128 MiB (Ray Data's default),
    # so nothing downstream starts before the read has held that much: small blocks stream out as they are
    # read, then are cut to `block_rows` rows.
    dataset.context.target_max_block_size = READ_BLOCK_BYTES
    return dataset.repartition(target_num_rows_per_block=block_rows, strict=True)


def _in_directory(read: Callable[[], Iterable[pa.Table]], directory: str) -> Callable[[], Iterator[pa.Table]]:
    """`read` run in the driver's working directory: relative paths (data/prepared, corpus/...) mean what
    they mean to the driver, and messages name them as the local engine does."""

    def in_directory() -> Iterator[pa.Table]:
        previous = os.getcwd()
        os.chdir(directory)
        try:
            yield from read()
        finally:
            os.chdir(previous)

    return in_directory


@contextmanager
def ordered_execution(wait_for_actors_s: int | None = None) -> Iterator[DataContext]:
    """Ray Data settings for the project's pipelines: input order kept, progress bars unless -q, and no
    retries of a task that failed on bad data (it would fail again); restored afterwards. With
    `wait_for_actors_s`, an actor pool takes no block until all its actors are up (Ray Data's
    `wait_for_min_actors_s`), and fails after that many seconds."""
    context = DataContext.get_current()
    # Ray Data logs a failed task's traceback before raising; a bad line is reported once, in one line,
    # by the caller (other errors still propagate with their traceback).
    logs = [logging.getLogger(name) for name in _TRACEBACK_LOGGERS]
    saved_levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    saved = (
        context.execution_options.preserve_order,
        context.enable_progress_bars,
        context.max_errored_blocks,
        context.wait_for_min_actors_s,
    )
    context.execution_options.preserve_order = True
    if wait_for_actors_s is not None:
        context.wait_for_min_actors_s = wait_for_actors_s
    context.enable_progress_bars = not quiet()
    context.max_errored_blocks = 0
    try:
        yield context
    finally:
        for log, level in zip(logs, saved_levels, strict=True):
            log.setLevel(level)
        (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.max_errored_blocks,
            context.wait_for_min_actors_s,
        ) = saved


def pipeline_error(error: BaseException) -> PipelineError | None:
    """The PipelineError a Ray task raised, with its own message (Ray wraps it and adds lines), if any."""
    seen: BaseException | None = error
    for _ in range(20):
        if seen is None:
            return None
        if isinstance(seen, PipelineError) and not isinstance(seen, ray.exceptions.RayError):
            message = str(seen.args[0]) if seen.args else str(seen)
            return PipelineError(message.split(_RAY_SUFFIX, 1)[0])
        cause: Any = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return None


@contextmanager
def task_errors_as_pipeline_errors() -> Iterator[None]:
    """A PipelineError raised inside a Ray task (a bad line) reaches the caller as that PipelineError."""
    try:
        yield
    except Exception as error:
        found = pipeline_error(error)
        if found is None:
            raise
        raise found from None


# The tokenizers library encodes a batch on a thread pool as large as the machine unless RAYON_NUM_THREADS
# says otherwise: with one actor per CPU that is cores x cores threads a node, which only thrash. Each
# actor (tokenizer or model) is one CPU's worth of work, so it gets one thread.
ONE_THREAD_ACTOR_ENV = {"env_vars": {"RAYON_NUM_THREADS": "1"}}


def actor_pool(actors: int | None, flag: str = "--actors") -> tuple[int, dict[str, Any]]:
    """(pool size, `map_batches` arguments) for a pool of CPU actors: `actors`, default one per CPU of the
    cluster, at most one per CPU (more would only queue for the same cores; `flag` names the setting in
    the refusal). The pool leaves a CPU per node free, so the tasks that read and cut blocks always find
    one beside actors that wait for those very blocks (Ray Data spreads the actors over the nodes)."""
    total = ray.cluster_resources().get("CPU", 1.0)
    if actors is not None and actors > max(1, int(total)):
        raise PipelineError(
            f"{flag} {actors}: each CPU actor holds a model or tokenizer on up to a CPU, and the cluster has "
            f"{int(total)} CPUs: use at most {max(1, int(total))}"
        )
    nodes = max(1, sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")))
    pool = actors or max(1, int(total))
    return pool, {
        "compute": ray.data.ActorPoolStrategy(size=pool),
        "num_cpus": min(1.0, max(0.0, total - nodes) / pool),
        "runtime_env": ONE_THREAD_ACTOR_ENV,
    }
