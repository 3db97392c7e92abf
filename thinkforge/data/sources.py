"""Benchmarks and datasets as `Problem` records.

Hub sources (SPEC 5): GSM8K (openai/gsm8k main/test), MATH-500 (HuggingFaceH4/MATH-500 test),
AIME 2024 (HuggingFaceH4/aime_2024 train), GPQA Diamond (Idavidrein/gpqa gpqa_diamond train, gated;
options shuffled with a fixed seed). Any of them can be read from a local JSONL/Parquet file in the same
schema (`path=`), and any local file with a column mapping (`local`). `synthetic` is the built-in task.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path

from thinkforge.errors import UserError
from thinkforge.grading import gsm8k_reference

GPQA_SHUFFLE_SEED = 1234


@dataclass(frozen=True)
class Problem:
    """One question. `reference` is what the grader compares with; `kind` is math, gsm8k or mcq."""

    id: str
    question: str
    reference: str
    kind: str = "math"
    choices: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False)


def _read_local(path: str | Path) -> list[dict]:
    from thinkforge.io import read_jsonl

    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.parquet")])
        if not files:
            raise UserError(f"{path}: folder holds no .jsonl or .parquet file")
        return [row for f in files for row in _read_local(f)]
    if not path.is_file():
        raise UserError(f"data file {path} not found; check the path")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise UserError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl or .parquet")


def _read_hub(repo: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # offline, gated or missing: the user must know which
        raise UserError(
            f"cannot load {repo} ({config or 'default'}, {split}) from the hub: {str(e).splitlines()[0][:200]}; "
            "pass a local copy with --data-path"
        ) from None
    return [dict(r) for r in ds]


def _need(row: dict, cols: list[str], where: str, i: int) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise UserError(f"{where} row {i}: missing column {', '.join(map(repr, missing))}; expected {', '.join(cols)}")


def _gsm8k(rows: list[dict], where: str) -> list[Problem]:
    out = []
    for i, r in enumerate(rows):
        _need(r, ["question", "answer"], where, i)
        out.append(Problem(str(r.get("id", f"gsm8k-{i}")), r["question"], gsm8k_reference(r["answer"]), "math",
                           meta={"solution": r["answer"]}))
    return out


def _math500(rows: list[dict], where: str) -> list[Problem]:
    out = []
    for i, r in enumerate(rows):
        _need(r, ["problem", "answer"], where, i)
        meta = {k: r[k] for k in ("subject", "level", "solution") if k in r}
        out.append(Problem(str(r.get("unique_id", f"math500-{i}")), r["problem"], str(r["answer"]), "math", meta=meta))
    return out


def _aime(rows: list[dict], where: str) -> list[Problem]:
    out = []
    for i, r in enumerate(rows):
        _need(r, ["problem", "answer"], where, i)
        out.append(Problem(str(r.get("id", f"aime24-{i}")), r["problem"], str(r["answer"]), "math"))
    return out


def _gpqa(rows: list[dict], where: str) -> list[Problem]:
    cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    out = []
    for i, r in enumerate(rows):
        _need(r, cols, where, i)
        options = [r["Correct Answer"]] + [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
        options = [str(o).strip() for o in options]
        order = list(range(4))
        random.Random(f"{GPQA_SHUFFLE_SEED}-{i}").shuffle(order)  # fixed per question: reproducible letters
        shuffled = [options[j] for j in order]
        letter = "ABCD"[order.index(0)]
        text = str(r["Question"]).strip() + "\n\n" + "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(shuffled))
        text += "\n\nAnswer with the letter of the correct option."
        out.append(Problem(str(r.get("Record ID", f"gpqa-{i}")), text, letter, "mcq", tuple(shuffled)))
    return out


def synthetic(split: str = "test", n: int = 200, difficulty: int = 1, seed: int = 0, stream: str = "") -> list[Problem]:
    from thinkforge.data import synthetic as task

    return [Problem(r["id"], r["question"], r["final"], "math", meta={"solution": r["answer"], "difficulty": r["difficulty"]})
            for r in task.generate(n, split, difficulty, seed, stream)]


# name -> (hub repo, config, split, converter)
HUB = {
    "gsm8k": ("openai/gsm8k", "main", "test", _gsm8k),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", _math500),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", _aime),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train", _gpqa),
}
BENCHMARKS = (*HUB, "synthetic", "local")


def local(path: str | Path, columns: dict[str, str] | None = None, kind: str = "math") -> list[Problem]:
    """Any JSONL/Parquet: `columns` maps question/answer/id to the file's column names."""
    cols = {"question": "question", "answer": "answer", "id": "id", **(columns or {})}
    rows = _read_local(path)
    out = []
    for i, r in enumerate(rows):
        _need(r, [cols["question"], cols["answer"]], str(path), i)
        ref = str(r[cols["answer"]])
        if kind == "gsm8k":
            ref, kind_ = gsm8k_reference(ref), "math"
        else:
            kind_ = kind
        out.append(Problem(str(r.get(cols["id"], f"local-{i}")), str(r[cols["question"]]), ref, kind_))
    return out


def load_benchmark(name: str, path: str | None = None, columns: dict[str, str] | None = None,
                   limit: int | None = None, seed: int = 0, difficulty: int = 1, n: int = 200) -> list[Problem]:
    """Problems of a named benchmark; `path` reads a local copy in the hub schema instead of the hub."""
    if name == "synthetic":
        try:
            problems = synthetic("test", n, difficulty, seed)
        except ValueError as e:
            raise UserError(f"synthetic benchmark (synthetic.n_test={n}, synthetic.difficulty={difficulty}): {e}") from None
    elif name == "local":
        if not path:
            raise UserError("benchmark 'local' needs a file: pass --data-path FILE (and --column question=COL ...)")
        problems = local(path, columns)
    elif name in HUB:
        repo, config, split, convert = HUB[name]
        rows = _read_local(path) if path else _read_hub(repo, config, split)
        problems = convert(rows, str(path or repo))
    else:
        close = difflib.get_close_matches(name, BENCHMARKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown benchmark {name!r}; {hint}choose one of {', '.join(BENCHMARKS)}")
    if not problems:
        raise UserError(f"benchmark {name!r} has no problems")
    return problems[:limit] if limit else problems


def training_problems(source: str, n: int, difficulties: list[int], seed: int, data_path: str | None = None,
                      columns: dict[str, str] | None = None, stream: str = "") -> list[Problem]:
    """Problems to train on: n synthetic training problems (equal shares per difficulty, the first levels one
    more where n does not divide; `stream` names an independent draw), or a local file / a local copy of a hub
    set. Never a test split of the synthetic task."""
    if source == "synthetic":
        k = len(difficulties)
        shares = [n // k + (i < n % k) for i in range(k)]
        return [p for d, share in zip(difficulties, shares, strict=True) if share for p in synthetic("train", share, d, seed, stream)]
    if data_path or source == "local":
        return load_benchmark(source, data_path, columns, n, seed)
    if source == "gsm8k":  # the hub's training split, never the test split we evaluate on
        return _gsm8k(_read_hub("openai/gsm8k", "main", "train"), "openai/gsm8k train")[:n]
    raise UserError(f"training on {source!r} from the hub would train on its test split; pass a local file of "
                    f"training problems (data_path) in its schema")
