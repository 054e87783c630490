"""Which code a result came from: the git commit of this package's checkout."""

from __future__ import annotations

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
