"""Files and directories that concurrent readers (other trials, other nodes on shared storage) see whole or
not at all: written beside their place, then published with one rename. Every atomic write in nds goes
through here."""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` if the block succeeds (one rename:
    a reader finds the old file, the new one, or none), removed if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: Path, keep_existing: Callable[[Path], bool] = lambda existing: False) -> Iterator[Path]:
    """A staging sibling of the directory ``path`` to fill; if the block succeeds its files are flushed and
    it is renamed onto ``path`` (a reader finds the whole directory or none; a crash before the rename
    leaves only a hidden staging directory that nothing reads), and it is removed if the block raises.
    An existing ``path`` is replaced, unless ``keep_existing(path)`` says it is a valid entry that a
    concurrent writer published first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.staging")
    staging.mkdir()
    try:
        yield staging
        for f in staging.iterdir():
            fsync(f)
        fsync(staging)
        if path.exists():
            if keep_existing(path):
                return
            shutil.rmtree(path)
        os.rename(staging, path)
        fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
