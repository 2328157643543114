"""Small helpers with no place in a stage: a file's sha256, installed package versions.

Imports nothing from the project, so any module may use it (the adapter algebra reads no
training or data-generation code). ``data_gen.store`` keeps its own copies of the two
functions: ``data_gen`` never imports ``character_training``.
"""
from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The file's sha256 as hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each installed package's (packages not installed are left out)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def unsafe_place(path: Path) -> str | None:
    """What ``path`` (resolved) is, when it is a place no output may be written over or cleared:
    the filesystem root, home, the current directory or one above it."""
    if path == Path(path.anchor):
        return "the filesystem root"
    if path == Path.home().resolve():
        return "your home directory"
    cwd = Path.cwd().resolve()
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a directory above the current one"
    return None
