"""`python -m pipeline <command>`: one subcommand per DVC stage, plus translate, submit and set-params.

Each command imports its modules where it is dispatched, not at the top: `--help`, `set-params` and a
folder's `translate` load only what they use (no pydantic for `--help`, no Ray or MLflow for `translate`).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

STAGES = {
    "prepare": "load the corpus, clean it, split it -> data/prepared",
    "preprocess": "train tokenizers and encode every split -> data/processed",
    "tune": "Ray Tune search over model sizes and dropout -> reports/best_params.json",
    "train": "Ray Train (DDP) with the best config -> models/, reports/train_history.csv",
    "evaluate": "beam search on the test split, sacreBLEU and chrF -> reports/metrics.json",
    "register": "log and register the model in MLflow, gate the champion alias",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no epoch lines or progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in STAGES.items():
        commands.add_parser(name, help=help_text, description=help_text)

    translate = commands.add_parser("translate", help="translate sentences (arguments or stdin)")
    translate.add_argument("sentences", nargs="*", help="source sentences; read stdin, one a line, if none")
    translate.add_argument("--model", default="models", help="a model folder or an MLflow models:/ URI")
    translate.add_argument("--beam-size", type=int, default=None, help="default: the model's setting")
    translate.add_argument(
        "--input",
        default=None,
        help="a file, or a folder of files in name order, on this machine or in an object store"
        " (s3://...): translated on Ray Data (the cluster in $RAY_ADDRESS, else a local Ray) into --output,"
        " line for line",
    )
    translate.add_argument(
        "--output",
        default=None,
        help="with --input: the file to write, on this machine or an s3://... object",
    )
    translate.add_argument(
        "--actors",
        type=int,
        default=None,
        help="with --input: model actors (default: one per GPU of the cluster, else one per CPU)",
    )
    translate.add_argument(
        "--device",
        default=None,
        help="auto (default: a CUDA GPU when present), cpu or cuda; or $PIPELINE_DEVICE. With --input: the"
        " model actors' device; cuda asks the cluster for GPU actors even before it has GPUs (an autoscaler"
        " adds them)",
    )
    translate.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="longer sentences are cut to their first N source tokens, with a warning"
        " (default: $PIPELINE_MAX_INPUT_TOKENS, else 256)",
    )
    translate.add_argument(
        "--max-sentences",
        type=int,
        default=None,
        help="refuse more input sentences than this (default: $PIPELINE_MAX_SENTENCES, else 1000)",
    )

    set_params = commands.add_parser(
        "set-params", help="rewrite params.yaml with a recipe and/or KEY=VALUE assignments"
    )
    set_params.add_argument(
        "--recipe", type=Path, default=None, help="overrides in params.yaml's shape, e.g. recipes/*.yaml"
    )
    set_params.add_argument("assignments", nargs="*", metavar="KEY=VALUE", help="e.g. runtime.use_gpu=true")

    submit = commands.add_parser(
        "submit",
        help="run the pipeline (or ENTRYPOINT) as a Ray job on a cluster",
        description="Like `ray job submit`: follows the logs, exits with the job's status unless --no-wait.",
    )
    submit.add_argument(
        "--address",
        default=None,
        help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)",
    )
    submit.add_argument("--no-wait", action="store_true", help="return once submitted; print how to follow")
    submit.add_argument("--submission-id", default=None, help="the job's id (default: Ray makes one)")
    submit.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs for the entrypoint")
    submit.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs for the entrypoint")
    submit.add_argument(
        "--metadata-json", default=None, help="JSON object of strings, shown by `ray job list`"
    )
    environments = submit.add_mutually_exclusive_group()
    environments.add_argument("--runtime-env", type=Path, default=None, help="runtime env YAML to start from")
    environments.add_argument("--runtime-env-json", default=None, help="runtime env as JSON, to start from")
    submit.add_argument(
        "entrypoint",
        nargs=argparse.REMAINDER,
        help="-- COMMAND... (default: bash cluster/run_pipeline.sh, i.e. dvc repro)",
    )
    return parser


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the stage is so every `with` block unwinds (temporaries removed,
    previous outputs kept). No `except Exception` on the way may swallow it; and a KeyboardInterrupt, the
    one exception Ray's waits (`ray.get` of a Train run) give way to at once: any other is held until the
    awaited work ends, then raised as a SystemError. Ray re-raises it as a plain KeyboardInterrupt, so the
    signal is told by `_RECEIVED`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The stop signals received during this run. Raised inside a library's C code (Ray Data's executor, for
# one), Stopped can come out as that library's own error, its cause dropped: what follows a stop signal
# is still the stop.
_RECEIVED: list[int] = []


# An exception raised inside logging's lock handling (between `_acquireLock` and its release) leaves the
# lock held: every later log call of every thread then waits forever, and the stopped stage hangs at exit.
# A signal that arrives there is sent again shortly; logging's critical sections take microseconds.
_REDELIVERY_S = 0.05
_MAX_REDELIVERIES = 20
_redeliveries = itertools.count()


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    inside_logging = frame is not None and frame.f_code.co_filename == logging.__file__
    if inside_logging and next(_redeliveries) < _MAX_REDELIVERIES:
        threading.Timer(_REDELIVERY_S, os.kill, (os.getpid(), signum)).start()
        return
    _RECEIVED.append(signum)
    raise Stopped(signum)


def _stop_signal(error: BaseException) -> int | None:
    """The signal that ended the run in `error`, or None when it was not stopped."""
    if isinstance(error, Stopped):
        return error.signum
    if _RECEIVED:
        return _RECEIVED[0]
    return signal.SIGINT if isinstance(error, KeyboardInterrupt) else None


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    _RECEIVED.clear()
    if args.quiet:
        from pipeline.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # the Ray processes the stage starts inherit it
    # SIGTERM (a timeout, a CI cancel, a cluster preemption) and SIGHUP end the stage as Ctrl-C does, and
    # Ctrl-C gets the same handler instead of Python's (which raises inside logging's lock as well). Only
    # in the main thread of a program run as a command: a library caller keeps its own handlers.
    if argv is None and threading.current_thread() is threading.main_thread():
        for stop in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(stop, _raise_stopped)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command in STAGES:
            from pipeline.params_file import load_config

            config = load_config(args.params)
            stage = importlib.import_module(f"pipeline.stages.{args.command}")
            stage.run(config)
            return 0
        if args.command == "set-params":
            from pipeline.params_file import set_params

            if args.recipe is None and not args.assignments:
                raise PipelineError("set-params needs --recipe FILE or KEY=VALUE assignments")
            set_params(args.params, args.assignments, args.recipe, pin=_pin_init_from)
            return 0
        if args.command == "translate" and args.input is not None:
            return run_batch_translate(args)
        if args.command == "translate":
            if args.output is not None or args.actors is not None:
                raise PipelineError("--output and --actors go with --input FILE_OR_DIR")
            return run_translate(
                args.sentences,
                args.model,
                args.beam_size,
                args.device,
                max_input_tokens=args.max_input_tokens,
                max_sentences=args.max_sentences,
            )
        from pipeline.jobs.submit import SubmitOptions, run_submit

        # Drop only the separator: a later "--" belongs to the entrypoint (`-- pytest -- -k x`).
        entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
        return run_submit(
            SubmitOptions(
                address=args.address,
                wait=not args.no_wait,
                entrypoint=entrypoint,
                runtime_env_path=args.runtime_env,
                runtime_env_json=args.runtime_env_json,
                submission_id=args.submission_id,
                entrypoint_num_cpus=args.entrypoint_num_cpus,
                entrypoint_num_gpus=args.entrypoint_num_gpus,
                metadata_json=args.metadata_json,
            )
        )
    except BaseException as error:
        signum = _stop_signal(error)
        if signum is not None:  # first: an error raised while stopping is the stop's
            name = signal.Signals(signum).name
            print(f"stopped by {name}: outputs of the interrupted step were not replaced", file=sys.stderr)
            return 128 + signum
        if isinstance(error, PipelineError):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise


def _pin_init_from(config: PipelineConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """set-params' check of train.init_from, when it is set: an alias is written as the version it names
    now, and said so on one line (the registry, and MLflow, are imported only then)."""
    train = overrides.get("train")
    if not isinstance(train, dict) or "init_from" not in train:
        return {}
    from pipeline.tracking.parent import pin_init_from

    pinned = pin_init_from(config.train.init_from)
    if pinned is None:
        return {}
    print(pinned.line())
    return {"train": {"init_from": pinned.pinned_uri}}


def run_translate(
    sentences: Sequence[str],
    model: str,
    beam_size: int | None,
    device: str | None = None,
    max_input_tokens: int | None = None,
    max_sentences: int | None = None,
) -> int:
    """Sentences from arguments or stdin, one translation per line on stdout. `model` is a model folder or
    an MLflow registry URI (models:/name/version or models:/name@alias). `device` None: $PIPELINE_DEVICE,
    else auto; the bounds: see `InputBounds.resolve`."""
    from pipeline.network.translator import InputBounds, Translator, check_beam_size
    from pipeline.tracking.registry import local_model_dir  # MLflow is imported only for a models:/ URI

    if beam_size is not None:
        check_beam_size(beam_size, "--beam-size")
    bounds = InputBounds.resolve(max_input_tokens, max_sentences)
    if not sentences and sys.stdin is None:  # started with stdin closed (`<&-`), not an empty one
        raise PipelineError("no sentences: give them as arguments, or one a line on stdin (it is closed)")
    if sentences:  # arguments are one request: too many is refused before the model loads
        bounds.check_count(len(sentences), "argument")
        requests: Iterator[list[str]] = iter([list(sentences)])
        unit = "argument"
    else:  # stdin is a stream of requests of at most max_sentences lines: any length, bounded memory
        requests = _stdin_chunks(bounds.max_sentences)
        unit = "stdin line"
    with local_model_dir(model) as folder:
        # load_model_dir reads every file into memory, so a downloaded folder can go once it returns.
        translator = Translator.from_dir(folder, device=device, bounds=bounds)
    done = 0
    for request in requests:
        for translation in translator.translate(
            request, beam_size=beam_size, unit=unit, first_number=done + 1
        ):
            # One line per input, always: a stray newline in an output would shift every later line.
            print(" ".join(translation.splitlines()))
        sys.stdout.flush()
        done += len(request)
    return 0


def run_batch_translate(args: argparse.Namespace) -> int:
    """`translate --input FILE_OR_DIR --output PATH`: a Ray Data job (`pipeline.jobs.batch_translate`)."""
    if args.sentences:
        raise PipelineError("give sentences as arguments or --input FILE_OR_DIR, not both")
    if args.output is None:
        raise PipelineError("--input needs --output PATH, the file the translations go to")
    if args.actors is not None and args.actors < 1:
        raise PipelineError(f"--actors must be at least 1, got {args.actors}")
    if args.device not in (None, "auto", "cpu", "cuda"):
        raise PipelineError(f"--device with --input: auto, cpu or cuda, got {args.device!r}")
    from pipeline.jobs.batch_translate import check_locations, translate_file
    from pipeline.network.model_files import check_model_dir
    from pipeline.network.translator import InputBounds, check_beam_size
    from pipeline.tracking.registry import is_registry_uri
    from pipeline.training.ray_session import ray_session

    if args.beam_size is not None:
        check_beam_size(args.beam_size, "--beam-size")
    bounds = InputBounds.resolve(args.max_input_tokens, args.max_sentences)
    check_locations(args.input, args.output)  # before Ray starts and the model loads
    if not is_registry_uri(args.model):  # a registry model is checked where it is downloaded
        check_model_dir(args.model)
    with ray_session():
        translate_file(
            args.input, args.output, args.model, args.beam_size, args.actors, bounds, args.device or "auto"
        )
    return 0


def _stdin_chunks(size: int) -> Iterator[list[str]]:
    """stdin in chunks of `size` lines, decoded as UTF-8 whatever the locale (whose decoder would turn a bad
    byte into a surrogate that the tokenizer then rejects with a TypeError)."""
    from pipeline.data.folder_source import decode_lines

    lines = (text for _, text in decode_lines(sys.stdin.buffer, "stdin"))
    while chunk := list(itertools.islice(lines, size)):
        yield chunk


if __name__ == "__main__":
    sys.exit(main())
