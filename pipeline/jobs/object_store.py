"""`translate --input/--output` in an object store (`s3://`, `gs://`, ... as pyarrow's filesystems read
them): on a cluster the job's driver runs on the head, whose disk the submitting machine never sees, so the
object store is where input and output meet. An input object is fetched to the driver's disk before the
job translates it; the output is written there and then uploaded whole, so a failed job leaves no partial
object."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs

from pipeline.errors import PipelineError

URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "hdfs://")


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(URI_SCHEMES)


def _filesystem(uri: str, flag: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise PipelineError(f"{flag} {uri}: {error}") from None


def fetch(uri: str, folder: Path) -> Path:
    """The object (or every object under the prefix, in name order) copied into `folder`: a file or a
    folder of files, as `--input` takes locally. PipelineError naming the URI when there is nothing."""
    filesystem, path = _filesystem(uri, "--input")
    try:
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            target = folder / Path(path).name
            pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem)
            return target
        if info.type == pyarrow.fs.FileType.Directory:
            target = folder / "input"
            pyarrow.fs.copy_files(path, str(target), source_filesystem=filesystem)
            return target
    except (pa.ArrowException, OSError) as error:
        raise PipelineError(f"--input {uri}: cannot read it: {error}") from None
    raise PipelineError(f"--input {uri}: no such object or prefix")


def upload(local: Path, uri: str) -> None:
    """`local` copied to the object `uri` (replacing it)."""
    filesystem, path = _filesystem(uri, "--output")
    try:
        pyarrow.fs.copy_files(str(local), path, destination_filesystem=filesystem)
    except (pa.ArrowException, OSError) as error:
        raise PipelineError(f"--output {uri}: cannot write it: {error}") from None
