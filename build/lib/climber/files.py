"""Crash-safe file operations shared by checkpoints, prepared data and logs: a directory is
built under a temporary sibling name and swapped in by renames, a file is rewritten through
a temporary file, and a file's content is identified by its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory `tmp` at `dest`. Two renames: an existing `dest` is moved to
    `dest.old` and deleted only once `tmp` is in place, so a kill at any moment leaves the old
    or the new directory whole (between the renames, as `dest.old`: `recover_dir` puts it back)."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(dest: Path) -> None:
    """Undo a `replace_dir` killed between its two renames: `dest.old` back to `dest`."""
    old = dest.with_name(dest.name + ".old")
    if old.exists() and not dest.exists():
        old.rename(dest)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` through a temporary file and a rename (a kill leaves one of the two)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
