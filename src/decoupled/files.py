"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from decoupled.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the final rename is atomic; pid-named rather than mkstemp'd, so the
    # file gets the usual umask permissions (mkstemp makes it 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically. Serialised in memory first, then written with
    Python's own I/O, so that a full disk or a read-only folder is an ``OSError`` naming
    ``path`` (torch's writer reports it as "file write failed", naming neither)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """``target`` becomes a second name of ``source`` (a hard link: no copy on disk), or a copy
    where the file system has no hard links; atomically, replacing what ``target`` was."""
    import shutil

    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; UserError naming the file if it is missing, malformed or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return data
