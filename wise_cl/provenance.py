"""Which code and which files a result came from: the git commit of this package's checkout, file hashes."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path


def code_version() -> str:
    """The commit of the checkout this package runs from, `+dirty` when tracked files other than the
    committed results differ from it (`unknown` outside a git checkout, e.g. an installed wheel)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout

    here = Path(__file__).resolve().parent
    try:
        commit, dirty = (
            git("rev-parse", "HEAD"),
            git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results"),
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per path, size and modification time (a run names its data file
    in every checkpoint, and a resumed checkpoint is checked by the CLI and again by the module)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
