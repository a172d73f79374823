"""Short content hashes that name runs: same inputs -> same name (a restarted driver resumes),
different inputs -> a new name (a changed config never silently resumes an old run)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.files import update_with_file

_PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(*parts: Any, length: int = 12) -> str:
    digest = hashlib.sha256()
    for part in parts:
        value = part.model_dump(mode="json") if isinstance(part, BaseModel) else part
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:length]


def directory_fingerprint(directory: Path) -> str:
    """Names and contents, not times: a `dvc checkout` or `dvc pull` on another node must give the same
    name (so a restarted driver resumes there too). blake2b reads about 1 GB/s: seconds for a big corpus."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        update_with_file(digest, path)
    return digest.hexdigest()[:12]


def code_fingerprint() -> str:
    """The package's source: a code change must not resume a run trained by older code."""
    digest = hashlib.sha256()
    for source in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]
