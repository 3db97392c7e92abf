"""Reading and writing JSONL/JSON atomically: write to a temporary file, then rename (with the modes the
umask gives a plain write, not the temporary file's 0600).

A reader that meets a malformed line names the file and the line number.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from thinkforge.errors import UserError


def read_jsonl(path: str | Path, required: Iterable[str] = (), nonempty: bool = False) -> list[dict]:
    """All rows of a JSONL file; a malformed or non-UTF-8 line, a missing required key, or (nonempty) a file
    without rows is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    required = list(required)
    rows: list[dict] = []
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                _row(path, lineno, line, required, rows)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} near line {lineno + 1}); give a UTF-8 JSONL file") from None
    if not rows and nonempty:
        raise UserError(f"{path}: no rows; give a JSONL file with one JSON object per line")
    return rows


def _row(path: Path, lineno: int, line: str, required: list[str], rows: list[dict]) -> None:
    """Parse one line into rows (blank lines are skipped)."""
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
    if not isinstance(row, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise UserError(
            f"{path}:{lineno}: missing column {', '.join(repr(m) for m in missing)}; "
            f"every row needs {', '.join(required)}"
        )
    rows.append(row)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and all inside it) the modes a plain open() or mkdir() would have under
    the process umask: temporary files and folders are created 0600 / 0700, which would hide outputs from a
    colleague once renamed into place."""
    path = Path(path)
    mask = current_umask()
    files, dirs = 0o666 & ~mask, 0o777 & ~mask
    if path.is_dir():
        for root, _, names in os.walk(path):
            os.chmod(root, dirs)
            for name in names:
                os.chmod(os.path.join(root, name), files)
    else:
        os.chmod(path, files)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file beside `path`; rename it over `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | Path, obj) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
