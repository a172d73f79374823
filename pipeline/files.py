"""The pipeline's files: outputs that appear complete or not at all (written to a temporary sibling, then
renamed into place), JSON read and written one way, and content hashes read in chunks."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _default_mode(is_dir: bool) -> int:
    """mkdtemp/mkstemp create owner-only entries; outputs should get the usual permissions instead
    (other users on shared cluster storage read them)."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def usual_permissions(path: Path) -> None:
    """Give a file or folder that a library created owner-only the permissions the umask gives others."""
    path.chmod(_default_mode(is_dir=path.is_dir()))


def _owner_tag() -> str:
    """Host and process in every temporary's name: a later run can tell a dead run's leftovers from a
    live run's work in progress (on shared storage, only its own host's processes can be checked)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _temporary(target: Path, make: Any) -> Any:
    """mkdtemp/mkstemp beside `target`; a PipelineError naming the folder when it cannot be written."""
    try:
        return make(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent)
    except OSError as error:
        raise PipelineError(f"cannot write in {target.parent}: {error.strerror}") from None


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries of `target` left by processes of this host that no longer run (a SIGKILL, a
    power cut); a live process's are kept. Returns what was removed."""
    target = Path(target)
    host = socket.gethostname()
    removed = []
    for kind in ("tmp", "old"):
        for leftover in target.parent.glob(f".{target.name}.{kind}-{host}-*"):
            pid = leftover.name.removeprefix(f".{target.name}.{kind}-{host}-").split("-")[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


class _OutputGroup:
    """Outputs written under `outputs_together()`: complete temporaries, renamed into place together."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (complete temporary, target)
        self.open_dirs: list[Path] = []  # temporaries still being written: what is inside them is private

    def private(self, target: Path) -> bool:
        return any(target.resolve().is_relative_to(folder.resolve()) for folder in self.open_dirs)

    def commit(self) -> None:
        """Move every old target aside, every temporary into place, then drop the old ones; if a rename
        fails, undo the ones done, so the targets stay all old."""
        for tmp, target in self.pending:
            check_output_place(target, folder=tmp.is_dir())
        aside: list[tuple[Path, Path]] = []
        placed: list[tuple[Path, Path]] = []
        try:
            for _, target in self.pending:
                if target.exists():
                    old = target.with_name(f".{target.name}.old-{_owner_tag()}")
                    target.rename(old)
                    aside.append((old, target))
            for tmp, target in self.pending:
                tmp.rename(target)
                placed.append((tmp, target))
        except OSError as error:
            for tmp, target in reversed(placed):
                target.rename(tmp)
            for old, target in reversed(aside):
                old.rename(target)
            raise PipelineError(
                f"cannot put {error.filename} in place: {error.strerror}; outputs unchanged"
            ) from None
        for old, _ in aside:
            _remove(old)

    def discard(self) -> None:
        for tmp, _ in self.pending:
            _remove(tmp)


_GROUP: contextvars.ContextVar[_OutputGroup | None] = contextvars.ContextVar("output_group", default=None)


@contextlib.contextmanager
def outputs_together() -> Iterator[None]:
    """A stage's outputs (every `atomic_dir` and `atomic_file` in the block, except those inside another
    one's temporary) appear together when the block succeeds, or none of them does: never new data beside
    old statistics."""
    group = _OutputGroup()
    token = _GROUP.set(group)
    try:
        yield
    except BaseException:
        group.discard()
        raise
    finally:
        _GROUP.reset(token)
    try:
        group.commit()
    except BaseException:
        group.discard()
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir())
        raise PipelineError(
            f"{blocking} is a file, but {target} goes inside it: move the file away"
        ) from None
    except OSError as error:
        raise PipelineError(f"cannot create {target.parent}: {error.strerror}") from None


def check_output_place(target: Path, folder: bool) -> None:
    """Refuse an output that could not be put in place, before the work that makes it: a file where the
    stage writes a folder or the reverse, or a mount point (the new output is renamed into place, and a
    mount point cannot be renamed)."""
    target = Path(target)
    writes, other = ("folder", "file") if folder else ("file", "folder")
    if target.exists() and target.is_dir() != folder:
        raise PipelineError(f"{target} is a {other} where the stage writes a {writes}: move it away")
    if os.path.ismount(target):
        raise PipelineError(
            f"{target} is a mount point, which the stage cannot replace (it renames a complete new {writes}"
            " into place): mount the folder above it instead"
        )


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    _make_parent(target)
    check_output_place(target, folder=True)
    remove_stale_temporaries(target)
    tmp = Path(_temporary(target, tempfile.mkdtemp))
    tmp.chmod(_default_mode(is_dir=True))
    group = _GROUP.get()
    deferred = group is not None and not group.private(target)
    if deferred:
        group.open_dirs.append(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if deferred:
            group.open_dirs.remove(tmp)
    if deferred:
        group.pending.append((tmp, target))
        return
    alone = _OutputGroup()  # a group of one: the same checks, and the same undo when a rename fails
    alone.pending.append((tmp, target))
    try:
        alone.commit()
    except BaseException:
        alone.discard()
        raise


def check_file_target(target: Path, name: str) -> None:
    """Refuse, before any work, a file output (`name`: how the user gave it) that could not be put in place:
    something other than a file there, a file where a folder of its path should be, a folder that cannot
    be written. Nothing is created."""
    target = Path(target)
    if os.path.lexists(target):
        kind = not_a_regular_file(target)
        if kind is not None and kind != "a broken symlink":  # a broken link is replaced like a missing file
            raise PipelineError(f"{name} {target} is {kind}: give the path of a file to write")
    existing = next(folder for folder in target.parents if os.path.lexists(folder))
    if not existing.is_dir():
        what = not_a_regular_file(existing) or "a file"
        raise PipelineError(f"{name}: {existing} is {what}, but {target} goes inside it: move it away")
    try:
        handle, probe = _temporary(existing / target.name, tempfile.mkstemp)
    except PipelineError as error:
        raise PipelineError(f"{name} {target}: {error}") from None
    os.close(handle)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it over `target` on success."""
    target = Path(target)
    _make_parent(target)
    check_output_place(target, folder=False)
    remove_stale_temporaries(target)
    fd, tmp_name = _temporary(target, tempfile.mkstemp)
    tmp = Path(tmp_name)
    tmp.chmod(_default_mode(is_dir=False))
    group = _GROUP.get()
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        if group is not None and not group.private(target):
            group.pending.append((tmp, target))
        else:
            tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(target: Path, payload: Any) -> None:
    """Indented, sorted keys, one trailing newline: stable text that diffs well under git and DVC."""
    with atomic_file(target) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


def read_json_object(path: Path, hint: str = "") -> dict[str, Any]:
    """The JSON object in `path`; a PipelineError naming the file (and `hint`: what to run) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found" + (f": {hint}" if hint else ""))
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PipelineError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise PipelineError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:  # the parser recurses once per level: thousands of [ or { exhaust the stack
        raise PipelineError(f"{path} is not usable JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return payload


def not_a_regular_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file (following symlinks); None when it is one."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symlink"
    except OSError as error:
        return "a symlink loop" if error.errno == errno.ELOOP else f"unreadable ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def update_with_file(digest: Any, path: Path) -> None:
    """Feed a file to a hashlib digest in 1 MiB chunks: bounded memory whatever the file's size."""
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.digest()
