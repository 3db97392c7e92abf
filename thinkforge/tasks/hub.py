"""The benchmarks of the recipe's tables (SPEC 5), read from the hub or from a local copy in the hub's schema
(`data_path`): GSM8K (openai/gsm8k main), MATH-500 (HuggingFaceH4/MATH-500), AIME 2024 (HuggingFaceH4/aime_2024),
GPQA Diamond (Idavidrein/gpqa gpqa_diamond, gated; options shuffled with a fixed seed). Graded by the built-in
grader. Only GSM8K has a training split on the hub; the others train from a local file of training problems."""

from __future__ import annotations

import random

from thinkforge.errors import UserError
from thinkforge.grading import gsm8k_reference
from thinkforge.tasks.base import Problem, Task
from thinkforge.tasks.local import need, read_local

GPQA_SHUFFLE_SEED = 1234


def read_hub(repo: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # offline, gated or missing: the user must know which
        raise UserError(
            f"cannot load {repo} ({config or 'default'}, {split}) from the hub: {str(e).splitlines()[0][:200]}; "
            "pass a local copy with --data-path"
        ) from None
    return [dict(r) for r in ds]


class _Hub(Task):
    repo: str = ""
    config: str | None = None
    test_split: str = "test"
    train_split: str | None = None  # a hub split that is not the one evaluated on

    def problems(self, split: str, n: int | None, seed: int, levels: list[int] | None = None,
                 stream: str = "") -> list[Problem]:
        if self.data_path:
            rows, where = read_local(self.data_path), str(self.data_path)
        elif split == "test":
            rows, where = read_hub(self.repo, self.config, self.test_split), self.repo
        elif self.train_split:
            rows, where = read_hub(self.repo, self.config, self.train_split), f"{self.repo} {self.train_split}"
        else:
            raise UserError(f"training on {self.family!r} from the hub would train on its test split; pass a local file "
                            "of training problems (data_path) in its schema")
        out = self.convert(rows, where)
        return out[:n] if n else out

    def convert(self, rows: list[dict], where: str) -> list[Problem]:
        raise NotImplementedError


class GSM8K(_Hub):
    family, repo, config, train_split = "gsm8k", "openai/gsm8k", "main", "train"

    def convert(self, rows: list[dict], where: str) -> list[Problem]:
        out = []
        for i, r in enumerate(rows):
            need(r, ["question", "answer"], where, i)
            out.append(self.make(str(r.get("id", f"gsm8k-{i}")), r["question"], gsm8k_reference(r["answer"]),
                                 solution=r["answer"]))
        return out


class MATH500(_Hub):
    family, repo = "math500", "HuggingFaceH4/MATH-500"

    def convert(self, rows: list[dict], where: str) -> list[Problem]:
        out = []
        for i, r in enumerate(rows):
            need(r, ["problem", "answer"], where, i)
            meta = {k: r[k] for k in ("subject", "level", "solution") if k in r}
            out.append(self.make(str(r.get("unique_id", f"math500-{i}")), r["problem"], r["answer"], **meta))
        return out


class AIME24(_Hub):
    family, repo, test_split = "aime24", "HuggingFaceH4/aime_2024", "train"

    def convert(self, rows: list[dict], where: str) -> list[Problem]:
        out = []
        for i, r in enumerate(rows):
            need(r, ["problem", "answer"], where, i)
            meta = {"solution": r["solution"]} if r.get("solution") else {}
            out.append(self.make(str(r.get("id", f"aime24-{i}")), r["problem"], r["answer"], **meta))
        return out


class GPQADiamond(_Hub):
    family, repo, config, test_split = "gpqa_diamond", "Idavidrein/gpqa", "gpqa_diamond", "train"

    def convert(self, rows: list[dict], where: str) -> list[Problem]:
        cols = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
        out = []
        for i, r in enumerate(rows):
            need(r, cols, where, i)
            options = [str(o).strip() for o in [r["Correct Answer"]] + [r[f"Incorrect Answer {k}"] for k in (1, 2, 3)]]
            order = list(range(4))
            random.Random(f"{GPQA_SHUFFLE_SEED}-{i}").shuffle(order)  # fixed per question: reproducible letters
            shuffled = [options[j] for j in order]
            letter = "ABCD"[order.index(0)]
            text = str(r["Question"]).strip() + "\n\n" + "\n".join(f"({'ABCD'[k]}) {o}" for k, o in enumerate(shuffled))
            text += "\n\nAnswer with the letter of the correct option."
            out.append(self.make(str(r.get("Record ID", f"gpqa-{i}")), text, letter, kind="mcq", choices=shuffled))
        return out
