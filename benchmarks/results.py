"""One result format for every benchmark: its table rows inside an envelope saying where they were measured.

    {"benchmark": "throughput", "command": "python -m benchmarks.throughput --epochs 3",
     "date": "2026-11-27", "commit": "<hash>", "dirty": false,
     "machine": {"cpu": ..., "cores": 2, "memory_gib": 23.5, "gpu": null, "torch": "2.13.0+cpu",
                 "cuda": null, "ray": "2.60.0"},
     "rows": [{"run": "bare PyTorch loop", "target tokens/s": 2878.0, ...}, ...],
     "notes": ["..."]}

`benchmark` names the script whose section of docs/benchmarks.md shows the run; `command` is the command
as typed from the project root. Rows are flat: each value a number, a string or null.
`benchmarks/report.py` renders the files in benchmarks/results/ as docs/benchmarks.md. Only the standard
library is imported at module level, so a torch-only box (benchmarks/gpu_torch.py) can write results too.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
ENVELOPE_KEYS = ("benchmark", "command", "date", "commit", "dirty", "machine", "rows")
MACHINE_KEYS = ("cpu", "cores", "memory_gib", "gpu", "torch", "cuda", "ray")
Row = dict[str, Any]


def command_line(benchmark: str) -> str:
    """The command as typed from the project root. Under `python -m`, argv[0] is the module's file path, not
    its name: an entry script (benchmarks/gpu_check.py) keeps its own name; an absolute path in the
    arguments inside or beside the project is written relative to the project root."""
    script = Path(sys.argv[0])
    module = script.stem if script.suffix == ".py" and script.parent.name == "benchmarks" else benchmark
    arguments = [relative_argument(argument) for argument in sys.argv[1:]]
    return shlex.join(["python", "-m", f"benchmarks.{module}", *arguments])


def relative_argument(argument: str) -> str:
    """`argument` (a path, or `--key=path`) relative to the project root where its path is absolute and lies
    in the project or beside it, in the folder that holds it (../shared/data/multi30k); else as it is."""
    key, equals, value = argument.partition("=") if argument.startswith("-") else ("", "", argument)
    path = Path(value)
    around = REPO_ROOT.parent if REPO_ROOT.parent != Path(REPO_ROOT.anchor) else REPO_ROOT
    if not path.is_absolute() or not path.is_relative_to(around):
        return argument
    return key + equals + os.path.relpath(path, REPO_ROOT)


def git_state(written: Path | None = None, repo: Path = REPO_ROOT) -> tuple[str, bool | None]:
    """(commit hash, whether the work tree differs from it); ("unknown", None) outside a git checkout.
    `written`, the result file being written, does not count: a run that rewrites its committed result
    as it goes would otherwise call its own checkout modified."""
    exclude = []
    if written is not None and (path := written.resolve()).is_relative_to(root := repo.resolve()):
        exclude = ["--", ".", f":(exclude){path.relative_to(root)}"]
    try:
        commit = git_output("rev-parse", "HEAD", repo=repo)
        dirty = bool(git_output("status", "--porcelain", "--untracked-files=no", *exclude, repo=repo))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, dirty


def git_output(*arguments: str, repo: Path = REPO_ROOT) -> str:
    """What a git command prints in the checkout `repo`, stripped; raises if it fails."""
    done = subprocess.run(
        ["git", *arguments], cwd=repo, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, memory, GPU and the versions of torch and Ray."""
    import torch  # every benchmark has imported it already

    on_gpu = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "ray": _installed_version("ray"),
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _installed_version(package: str) -> str | None:
    # The installed distribution, not an import: importing Ray costs seconds and may be blocked on purpose.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def envelope(
    benchmark: str, rows: list[Row], notes: list[str] | None = None, written: Path | None = None
) -> dict[str, Any]:
    commit, dirty = git_state(written)
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "command": command_line(benchmark),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "dirty": dirty,
        "machine": machine(),
        "rows": rows,
    }
    if notes:
        result["notes"] = notes
    return result


def write_result(
    path: Path, benchmark: str, rows: list[Row], notes: list[str] | None = None
) -> dict[str, Any]:
    """Write one benchmark run's rows, in the envelope, as a JSON document at `path`; returns the document."""
    result = envelope(benchmark, rows, notes, written=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def figure(value: Any) -> str:
    """Numbers as a reader compares them: thousands separated, about four significant digits."""
    if value is None:
        return ""
    if not is_number(value):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.4g}"


def is_number(value: Any) -> bool:
    """Missing figures count as numbers: a column is right-aligned unless it holds text."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def text_table(rows: list[Row]) -> str:
    """Rows as a markdown table, every key a column (as a benchmark prints its result)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(figure(row.get(key)) for key in columns) for row in rows]
    return "\n".join(f"| {line} |" for line in lines)


def read_result(path: Path) -> dict[str, Any]:
    result = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in ENVELOPE_KEYS if key not in result]
    if missing:
        raise ValueError(f"{path}: not a benchmark result, missing {missing}")
    return result
