"""Stage-1 data: ask a teacher for N chain-of-thought rollouts per problem, grade each, write them all.

Every rollout is kept with its grade, by its problem's own task (rejection sampling happens in `select`), so the
incorrect ones can become the rejected side of DPO pairs. Output rows: problem_id, task, question, reference,
completion, correct, score, teacher, length (words), finish_reason, difficulty. The output file is appended problem by problem: a
rerun skips problems that are done, and a kill loses at most the rollouts in flight.

Teachers (each yields (problem, [(completion, finish_reason), ...]) as results arrive):
- SyntheticTeacher: the synthetic task's programmatic teacher with a slip rate (the demo's).
- SolutionTeacher: a task's own worked solutions (GSM8K's, MATH's, reasoning-gym's where it has them), once each.
- HFTeacher: a local Hugging Face model, batched (the model itself, asked in its own words: a self-sample teacher).
- ThinkAnswer: any teacher's rollouts rewritten in the <think>/<answer> form (distill.rewrite).
- OpenAITeacher: any OpenAI-compatible endpoint (DeepSeek-R1's API, vLLM, SGLang, `thinkforge serve`),
  with bounded concurrency, retries and timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from thinkforge.errors import UserError
from thinkforge.formats import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    answer_statement,
    format_completion,
    parse,
    response,
)
from thinkforge.monitor import progress_bar
from thinkforge.rollout.types import SamplingParams, stream_key
from thinkforge.tasks import Problem, is_correct

Result = tuple[Problem, list[tuple[str, str]]]


class SyntheticTeacher:
    name = "synthetic"

    def __init__(self, slip_rate: float = 0.3, seed: int = 0):
        self.slip_rate, self.seed = slip_rate, seed

    def solve(self, problems: list[Problem], n: int) -> Iterator[Result]:
        from thinkforge.tasks.synthetic import Synthetic, teacher_completion

        for p in problems:
            if not isinstance(p.task, Synthetic):
                raise UserError(f"the synthetic teacher writes the synthetic task's solutions; {p.id} is of task "
                                f"{p.task_name}: use distill.teacher=solution (its own worked solutions) or a model teacher")
            rng = random.Random(f"{self.seed}-{p.id}")  # per problem: reruns give the same rollouts
            row = {"answer": p.meta["solution"]}
            yield p, [(teacher_completion(row, rng, self.slip_rate)[0], "stop") for _ in range(n)]


class SolutionTeacher:
    """The task's worked solution as the chain of thought, its reference as the answer: one rollout per problem
    (a problem without a solution is an error naming it). Every rollout is right, so `select.max_pass_rate` has
    nothing to tell apart: the hard subset is by difficulty or length."""

    name = "solution"

    def solve(self, problems: list[Problem], n: int) -> Iterator[Result]:
        for p in problems:
            text = p.meta.get("solution")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"distill.teacher=solution: problem {p.id} of task {p.task_name} has no worked solution; "
                                "use a model teacher (hf, openai) for this task")
            body = text.rpartition("####")[0].strip() if "####" in text else text.strip()
            yield p, [(format_completion(body, p.reference), "stop")]


class HFTeacher:
    def __init__(self, generator, prompt_fn, params: SamplingParams, name: str, chunk: int = 8):
        self.generator, self.prompt_fn, self.params, self.name, self.chunk = generator, prompt_fn, params, name, chunk

    def solve(self, problems: list[Problem], n: int) -> Iterator[Result]:
        for i in range(0, len(problems), self.chunk):
            batch = problems[i : i + self.chunk]
            # Each problem's own stream (who samples, the seed, the problem): chunks, resumes and reruns agree.
            streams = tuple(stream_key(self.name, self.params.seed, p.id, p.question) for p in batch)
            prompts = [self.prompt_fn(p.question) for p in batch]
            outs = self.generator.generate(prompts, n, dataclasses.replace(self.params, streams=streams))
            for j, p in enumerate(batch):  # the whole response where the prompt pre-filled <think>
                yield p, [(response(prompts[j], c.text), c.finish_reason) for c in outs if c.prompt_index == j]


class ThinkAnswer:
    """A teacher's rollouts written in the `<think>`/`<answer>` form: its working as the thinking (its text less
    the closing sentence that states the answer, "The answer is 7."), the answer the parser reads in it as the
    answer. A rollout that stated only its answer gets an empty thinking, not the answer dressed as reasoning. A
    rollout already in that form, with no answer to read, or whose answer the rewriting would change, is kept as
    written: every rollout grades as the teacher wrote it."""

    def __init__(self, teacher):
        self.teacher, self.name = teacher, teacher.name

    def solve(self, problems: list[Problem], n: int) -> Iterator[Result]:
        for p, outs in self.teacher.solve(problems, n):
            yield p, [(think_answer(text), finish) for text, finish in outs]


def think_answer(text: str) -> str:
    parsed = parse(text)
    if parsed.format_ok or parsed.answer is None:
        return text
    body = text
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        body = body.replace(tag, " ")
    span = answer_statement(body)
    if span is not None:  # the sentence that states the answer goes; the working around it stays
        body = body[: span[0]] + " " + body[span[1] :]
    out = format_completion(body.strip(), parsed.answer)
    return out if parse(out).answer == parsed.answer else text


class OpenAITeacher:
    def __init__(self, client, params: SamplingParams, system: str | None = None):
        self.client, self.params, self.system = client, params, system
        self.name = client.model_name

    def _one(self, p: Problem, n: int) -> Result:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": p.question}]
        streams = (stream_key(self.name, self.params.seed, p.id, p.question),)  # each problem its own seed
        return p, self.client.chat(messages, n, dataclasses.replace(self.params, streams=streams))

    def solve(self, problems: list[Problem], n: int) -> Iterator[Result]:
        with ThreadPoolExecutor(self.client.concurrency) as pool:
            futures = [pool.submit(self._one, p, n) for p in problems]
            for f in as_completed(futures):
                yield f.result()


def done_counts(out_path: Path) -> dict[str, int]:
    """Rollouts already written per problem; a torn last line (a kill mid-write) is cut off."""
    counts: dict[str, int] = {}
    if not out_path.exists():
        return counts
    good_bytes = 0
    with out_path.open("rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            counts[row["problem_id"]] = counts.get(row["problem_id"], 0) + 1
            good_bytes += len(line)
    if good_bytes != out_path.stat().st_size:
        with out_path.open("r+b") as f:
            f.truncate(good_bytes)
    return counts


def main(problems: list[Problem], teacher, n: int, out_path: str | Path, progress: bool = True,
         label: str = "distill") -> dict:
    """Distill `n` graded rollouts per problem into out_path (JSONL, appended); returns counts. `label` names
    the progress bar (what is being sampled)."""

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_counts(out_path)
    partial = {pid for pid, k in done.items() if k < n}
    if partial:  # a torn write: redo those problems whole, so reruns match an uninterrupted run
        from thinkforge.io import read_jsonl, write_jsonl

        write_jsonl(out_path, [r for r in read_jsonl(out_path) if r["problem_id"] not in partial])
        done = {pid: k for pid, k in done.items() if pid not in partial}
    todo = [p for p in problems if done.get(p.id, 0) < n]
    stats = {"problems": len(problems), "skipped_done": len(problems) - len(todo), "rollouts": 0, "correct": 0}
    bar = progress_bar(len(problems), label, "problem", progress, stats["skipped_done"])
    with out_path.open("a", encoding="utf-8") as f:
        for problem, outs in teacher.solve(todo, n):
            lines = []
            for text, finish in outs[:n]:
                score = problem.score(parse(text).answer)  # the task's own checker, on the extracted answer
                ok = is_correct(score)
                stats["rollouts"] += 1
                stats["correct"] += ok
                lines.append(json.dumps({
                    "problem_id": problem.id, "task": problem.task_name, "question": problem.question,
                    "reference": problem.reference, "kind": problem.kind, "completion": text, "correct": ok,
                    "score": score, "teacher": teacher.name,
                    "length": len(text.split()), "finish_reason": finish,
                    "difficulty": problem.meta.get("difficulty", problem.meta.get("level")),
                }, ensure_ascii=False) + "\n")
            f.write("".join(lines))  # one problem at a time: a kill tears at most this write
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix(accept=f"{stats['correct'] / max(1, stats['rollouts']):.2f}", refresh=False)
    bar.close()
    stats["acceptance"] = stats["correct"] / max(1, stats["rollouts"])
    return stats


def problems_for(recipe) -> list[Problem]:
    """The problems the recipe's distill section names (its task's training split, checked against evaluation)."""
    from thinkforge import tasks

    d = recipe.distill
    return tasks.for_training(recipe, "distill", d.n_problems, d.difficulties, data_path=d.data_path, columns=d.columns)


def policy_problems(recipe) -> list[Problem]:
    """Problems the SFT model samples its own rollouts on. A procedural task: its own draw of training problems
    (`policy_fresh`), because on the distilled problems, whose answers stages 1-2 memorized, nearly every
    rollout is right and the pairs teach nothing that transfers. Other sources: the first distilled problems."""
    from thinkforge import tasks

    p, d = recipe.pipeline, recipe.distill
    if p.policy_fresh and tasks.load(d.source, recipe.tasks.options, recipe.tasks.mixes).procedural:
        return tasks.for_training(recipe, "distill", p.policy_problems, p.policy_difficulties or d.difficulties,
                                  stream="policy")
    return problems_for(recipe)[: p.policy_problems]


def sample_policy(recipe, model_path: str, problems: list[Problem], out: Path, progress: bool = True) -> dict:
    """The model's own graded rollouts on `problems` (the policy side of DPO pairs): pairs.policy_samples per
    problem at pairs.temperature (sampling, so that one problem can give a correct and an incorrect one)."""
    from thinkforge import rollout
    from thinkforge.formats import prompt_renderer

    m, g = recipe.model, recipe.generation
    generator, tok = rollout.load_generator(m, model_path, g.batch_size, recipe.rollout, out.parent, g.max_new_tokens)
    params = SamplingParams(g.max_new_tokens, recipe.pairs.temperature, 1.0, 0, recipe.seed)
    with contextlib.closing(generator):
        return main(problems, HFTeacher(generator, prompt_renderer(m, tok), params, "policy"),
                    recipe.pairs.policy_samples, out, progress,
                    f"DPO pairs: policy samples ({recipe.pairs.policy_samples} per problem)")


def teacher_for(cfg, recipe):
    """Build the teacher a DistillConfig names."""
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, recipe.seed)
    if cfg.teacher == "synthetic":
        return SyntheticTeacher(cfg.slip_rate, recipe.seed)
    if cfg.teacher == "solution":
        if cfg.samples != 1:
            raise UserError(f"distill.teacher=solution writes one rollout per problem (its worked solution): set "
                            f"distill.samples=1 (got {cfg.samples})")
        return SolutionTeacher()
    if not cfg.teacher_model:
        raise UserError(f"distill.teacher={cfg.teacher} needs distill.teacher_model")
    from thinkforge import rollout

    system = recipe.model.system_prompt if cfg.teacher_system_prompt is None else cfg.teacher_system_prompt
    if cfg.teacher == "hf":
        from thinkforge.formats import prompt_renderer

        generator, tok = rollout.load_generator(recipe.model, cfg.teacher_model, recipe.generation.batch_size)
        asked = recipe.model.model_copy(update={"system_prompt": system})
        teacher = HFTeacher(generator, prompt_renderer(asked, tok), params, cfg.teacher_model)
    else:
        if not cfg.base_url:
            raise UserError("distill.teacher=openai needs distill.base_url (e.g. http://127.0.0.1:8000/v1)")
        client = rollout.server_client(cfg.base_url, cfg.teacher_model, os.environ.get(cfg.api_key_env), cfg.timeout,
                                       retries=cfg.max_retries, concurrency=cfg.concurrency)
        teacher = OpenAITeacher(client, params, system)
    return ThinkAnswer(teacher) if cfg.rewrite == "think_answer" else teacher
