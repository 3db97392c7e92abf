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


def _main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_folder(path: str | Path, resumable: Iterable[str] = ("step-", "final")) -> Iterator[Path]:
    """Hold the run folder `path` for this process while the block runs.

    - A lock file (`.lock`, flock: released by the kernel when the process dies, so never stale): a second
      process writing the same folder is refused with one line instead of interleaving metrics.
    - A folder this call created is removed again when the block fails before anything resumable was written
      (a name starting with one of `resumable`): a bad-data start leaves no folder holding only config.yaml.
    Only rank 0 of a multi-process launch locks and cleans; the other ranks write nothing.
    """
    path = Path(path)
    if not _main_rank():
        yield path
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = (path / ".lock").open("a+")
    try:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: no lock
            pass
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise UserError(f"{path} is being written by another thinkforge process (pid {holder}); wait for it to "
                            f"finish or pass another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield path
        except BaseException:
            kept = [p.name for p in path.iterdir() if p.name.startswith(tuple(resumable))]
            if created and not kept:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            raise
    finally:
        try:
            (path / ".lock").unlink()  # while still held: a process that opens it next makes a new one
        except FileNotFoundError:
            pass
        lock.close()
