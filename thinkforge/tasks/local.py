"""Any local JSONL/Parquet file (or folder of them) of problems: `columns` maps question / answer / id to the
file's column names; `options.kind` is how the built-in grader reads the answer (math, gsm8k: a solution ending
in `#### N`, or mcq). The same file serves training and evaluation: keep the two files apart yourself (a run
checks that no training problem is an evaluation problem)."""

from __future__ import annotations

from pathlib import Path

from thinkforge.errors import UserError
from thinkforge.tasks.base import Problem, Task


def read_local(path: str | Path) -> list[dict]:
    from thinkforge.io import read_jsonl

    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.parquet")])
        if not files:
            raise UserError(f"{path}: folder holds no .jsonl or .parquet file")
        return [row for f in files for row in read_local(f)]
    if not path.is_file():
        raise UserError(f"data file {path} not found; check the path")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise UserError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl or .parquet")


def need(row: dict, cols: list[str], where: str, i: int) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise UserError(f"{where} row {i}: missing column {', '.join(map(repr, missing))}; expected {', '.join(cols)}")


class Local(Task):
    family = "local"
    accepts = frozenset({"kind"})

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        from thinkforge.grading import gsm8k_reference

        if not self.data_path:
            raise UserError("task 'local' needs a file: pass --data-path FILE (and --column question=COL ...)")
        kind = self.options.get("kind", "math")
        if kind not in ("math", "gsm8k", "mcq"):
            raise UserError(f"task local: options.kind={kind!r}; use math, gsm8k or mcq")
        cols = {"question": "question", "answer": "answer", "id": "id", **self.columns}
        out = []
        for i, r in enumerate(read_local(self.data_path)):
            need(r, [cols["question"], cols["answer"]], str(self.data_path), i)
            ref = str(r[cols["answer"]])
            meta = {"solution": ref} if kind == "gsm8k" else {}
            out.append(self.make(str(r.get(cols["id"], f"local-{i}")), str(r[cols["question"]]),
                                 gsm8k_reference(ref) if kind == "gsm8k" else ref,
                                 kind="math" if kind == "gsm8k" else kind, choices=r.get("choices"), **meta))
        return out[:n] if n else out
