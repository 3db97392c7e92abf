"""`thinkforge run`: the four-stage recipe end to end, each stage feeding the next, evaluated after each.

    distill -> select -> midtrain (stage 1, packed) -> sft (stage 2, harder subset)
            -> pairs (SFT model's own rollouts + teacher's) -> dpo (stage 3) -> rl (stage 4)

The run folder holds the resolved config, each stage's run folder (checkpoints, metrics, final model) and
evaluation, `state.json`, and at the end `summary.json`, `report.md` with PNG plots and a model card in the
final model folder. A rerun skips finished stages and resumes the one that was cut off (each stage resumes
from its own newest checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from thinkforge import evaluate, tasks, tiny
from thinkforge.config import Recipe, dump_config
from thinkforge.data import distill, pairs, selection
from thinkforge.errors import UserError
from thinkforge.io import atomic_write, read_jsonl, run_folder, write_json
from thinkforge.stages import STAGES

LABELS = {"base": "base", **{s.name: s.label for s in STAGES.values()}}


class Run:
    """The run folder and its state file (stage -> {model, eval, seconds})."""

    def __init__(self, out: Path):
        self.out = out
        self.state_path = out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}, "seconds": 0.0}

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def record(self, stage: str, **info) -> None:
        self.state["stages"][stage] = info
        write_json(self.state_path, self.state)

    def add_seconds(self, seconds: float) -> None:
        self.state["seconds"] = self.state.get("seconds", 0.0) + seconds
        write_json(self.state_path, self.state)


# What each step of the pipeline is made from (recipe sections, dotted), besides everything before it. A rerun
# compares what a finished step recorded with the recipe it is given: a changed evaluation protocol redoes the
# evaluations (the models are there); a changed stage input is refused (the stage and those after it are stale).
# How a run executes (device, memory savers, attention kernel) is not what it is made from: left out. The
# weights' dtype is an input only where frozen weights train under an adapter; else it is the evaluation's.
STAGE_INPUTS = {
    "base": ["seed", "model.name_or_path", "model.trainable_dtype", "model.load_in_4bit", "model.prompt_format",
             "model.system_prompt", "init", "lora"],
    "distill": ["distill", "select", "tasks"],
    "pairs": ["generation.max_new_tokens", "pairs", "tasks", "pipeline.policy_problems", "pipeline.policy_fresh",
              "pipeline.policy_difficulties", "pipeline.pair_sources"],
    **{s.name: [s.name, *s.inputs] for s in STAGES.values()},
}
PAIRS = "pairs.jsonl"  # the data step before the stage that trains on pairs
EVAL_INPUTS = ["seed", "eval", "generation", "synthetic", "model.dtype", "model.prompt_format", "model.system_prompt"]


def fingerprint(recipe: Recipe, sections: list[str]) -> dict[str, str]:
    """section -> a short hash of its resolved values."""
    import hashlib

    data = recipe.model_dump(mode="json")
    out = {}
    for section in sections:
        value = data
        for part in section.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if section in STAGES:
            value = _as_recorded(value, section)
        elif isinstance(value, dict):
            value = _without_added(value, section)
        if isinstance(value, dict) and "difficulties" in value:
            value = {**value, "difficulties": _levels_recorded(recipe, value)}
        if section in SECTIONS_ADDED_SINCE and value == type(getattr(recipe, section))().model_dump(mode="json"):
            continue
        out[section] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
    return out


def _levels_recorded(recipe: Recipe, section: dict) -> list[int] | str:
    """A section's `difficulties` as a fingerprint holds it. Unset (since 2026-12-07; the default was [1, 2]) is the
    task's default levels where it has them (synthetic's [1, 2]: runs recorded before keep their fingerprint), else
    "own configuration": a reasoning-gym task's own configuration and its levels 1 and 2 are different problems
    (a run recorded before, whose [1, 2] meant its own configuration, is stale: it is)."""
    if section["difficulties"] is not None:
        return section["difficulties"]
    task = tasks.load(section["source"], recipe.tasks.options, recipe.tasks.mixes)
    return list(task.default_levels) if task.default_levels else "own configuration"


# Settings added after runs were recorded, left out of a fingerprint at these (their default) values: a run made
# before they existed made what their defaults make. A whole section added: its key is left out at its default.
ADDED_SINCE = {"rl": {"curriculum": False, "curriculum_window": 16, "curriculum_up": 0.7, "curriculum_down": 0.1,
                      "time_budget": None},
               "distill": {"teacher_system_prompt": None, "rewrite": "none"}}
SECTIONS_ADDED_SINCE = ("tasks",)

# Stage settings that change how a stage runs or whether it starts, never what it makes: the output head's chunk
# (float rounding), RL's learnability preflight, how often RL logs its entropy.
RUNS_ONLY = ("head_chunk", "preflight", "preflight_groups", "entropy_every")


def _without_added(values: dict, section: str) -> dict:
    """A section's values less the settings added to it since runs were recorded, where they are at their default."""
    added = ADDED_SINCE.get(section, {})
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def _as_recorded(stage: dict, section: str) -> dict:
    """A stage section in the flat form finished steps recorded before the nested optim/checkpoints schemas
    (2026-11-29), so their runs still resume; how it runs (RUNS_ONLY) is not what it is made from."""
    flat = {k: v for k, v in _without_added(stage, section).items() if k not in ("optim", "checkpoints", *RUNS_ONLY)}
    return {**flat, **stage["optim"], "save_every": stage["checkpoints"]["every"],
            "keep_checkpoints": stage["checkpoints"]["keep"]}


def steps(recipe: Recipe) -> list[str]:
    """The pipeline's steps in order, as `_stages` runs them (distill when a stage needs its data; DPO's pairs)."""
    stages = [s for s in recipe.pipeline.stages if s != "distill"]
    runs_distill = _runs_distill(recipe)
    out = ["base", *(["distill"] if runs_distill else [])]
    for s in stages:
        out += ["pairs", s] if STAGES[s].data == PAIRS else [s]
    return out


def _runs_distill(recipe: Recipe) -> bool:
    """Distillation runs when asked for or when a stage trains on its selected rollouts."""
    return "distill" in recipe.pipeline.stages or any(
        STAGES[s].data and STAGES[s].data.startswith("sel/") for s in recipe.pipeline.stages if s in STAGES)


def stage_inputs(recipe: Recipe, step: str) -> dict[str, str]:
    """The fingerprint of everything `step` was made from: its own sections, every earlier step's, and which
    steps came before it (a stage inserted before a finished one makes it stale)."""
    done = steps(recipe)[: steps(recipe).index(step) + 1]
    sections = [x for name in done for x in STAGE_INPUTS[name]]
    if recipe.lora.enabled or recipe.model.load_in_4bit:
        sections.append("model.dtype")
    return {**fingerprint(recipe, sections), "steps": ",".join(done)}


def _check_not_stale(out: Path, stage: str, info: dict, now: dict[str, str]) -> None:
    was = info.get("made_from")
    if was == now:
        return
    changed = sorted(k for k in set(now) | set(was or {}) if (was or {}).get(k) != now.get(k))
    why = "recorded by an older thinkforge, without its inputs" if was is None else f"changed: {', '.join(changed)}"
    raise UserError(f"{out}: the finished {stage} step was made from another recipe than this one ({why}); "
                    f"give a new --out folder, or restore those settings to resume this run")


def with_model(recipe: Recipe, path: str) -> Recipe:
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": path})}, deep=True)


def main(recipe: Recipe, out_dir: str | Path, progress: bool = True, stop_after_stage: str | None = None) -> dict:

    out = Path(out_dir)
    with run_folder(out, resumable=("data", "base-model", "state.json", *LABELS)):  # what a rerun resumes from
        return _main(recipe, out, progress, stop_after_stage)


def _main(recipe: Recipe, out: Path, progress: bool, stop_after_stage: str | None) -> dict:
    with atomic_write(out / "config.yaml") as f:
        f.write(dump_config(recipe))
    run = Run(out)
    t_start = time.time()
    try:
        base, current = _stages(recipe, out, run, progress, stop_after_stage)
    finally:  # an interrupted invocation's time counts too: wall_seconds totals every invocation of the run
        run.add_seconds(time.time() - t_start)
    return write_outputs(recipe, out, run, base, current)


def _stages(recipe: Recipe, out: Path, run: Run, progress: bool, stop_after_stage: str | None) -> tuple[str, str]:
    """Evaluate the base, distill, then each stage from the previous one's final model; (base, final model)."""
    log = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    base = recipe.model.name_or_path
    if recipe.init is not None and not Path(base).exists():
        base = str(out / "base-model")
        if not (Path(base) / "config.json").is_file():
            tiny.init_model(base, recipe.init, recipe.seed)
    current = base

    protocol = fingerprint(recipe, EVAL_INPUTS)

    def stage_eval(name: str, model_path: str) -> None:
        made_from = stage_inputs(recipe, name)
        if recipe.pipeline.eval_after_each or name == order[-1]:
            results = evaluate.run(recipe, model_path, out / name / "eval", progress=False)
            first = next(iter(results.values()))
            log(f"[{name}] accuracy {first['accuracy']:.3f}  format {first['format_rate']:.3f}  "
                f"think words {first['avg_think_words']:.1f}")
            run.record(name, model=model_path, eval=results, made_from=made_from, eval_from=protocol)
        else:
            run.record(name, model=model_path, eval=None, made_from=made_from, eval_from=protocol)

    def finished(name: str) -> dict | None:
        """The step's record if it is done and made from this recipe (its evaluation redone if only the
        evaluation protocol changed); None if it has not run; a stale step is refused."""
        info = run.done(name)
        if not info:
            return None
        _check_not_stale(out, name, info, stage_inputs(recipe, name))
        if name != "distill" and info.get("eval_from") != protocol:
            log(f"[{name}] the evaluation protocol changed: evaluating {info['model']} again")
            stage_eval(name, info["model"])
        return run.done(name)

    order = ["base", *[s for s in recipe.pipeline.stages if s != "distill"]]
    if not finished("base"):
        stage_eval("base", base)

    data_dir = out / "data"
    rollouts = data_dir / "rollouts.jsonl"
    if _runs_distill(recipe):
        if not finished("distill"):
            log("[distill] teacher rollouts, graded")
            _rollouts_made_from(recipe, rollouts)
            problems = distill.problems_for(recipe)
            stats = distill.main(problems, distill.teacher_for(recipe.distill, recipe), recipe.distill.samples, rollouts, progress)
            sel = recipe.select
            stats["select"] = selection.main(rollouts, data_dir / "sel", sel.max_pass_rate, sel.min_difficulty, sel.min_words)
            run.record("distill", stats=stats, made_from=stage_inputs(recipe, "distill"))

    for stage in recipe.pipeline.stages:
        if stage == "distill":
            continue
        info = finished(stage)
        if info:
            current = info["model"]
            continue
        log(f"[{stage}] from {current}")
        spec = STAGES[stage]
        stage_recipe = with_model(recipe, current)
        if spec.data == PAIRS:  # pairs made from another recipe (an unfinished earlier run) are made again
            made_from = data_dir / "pairs.made_from.json"
            wanted = stage_inputs(recipe, "pairs")
            if (data_dir / "pairs.jsonl").exists() and (not made_from.exists() or json.loads(made_from.read_text()) != wanted):
                (data_dir / "pairs.jsonl").unlink()
            if not (data_dir / "pairs.jsonl").exists():
                _make_pairs(recipe, stage_recipe, data_dir, current, log, progress)
                write_json(made_from, wanted)
        with run_folder(out / stage):
            data = str(data_dir / spec.data) if spec.data else None
            final = spec.run(stage_recipe, out / stage, data=data, progress=progress)
        current = str(final)
        stage_eval(stage, current)
        if stop_after_stage == stage:
            break
    return base, current




# What a teacher's rollouts are made from: its settings, the problems, the prompt it is asked with and the dtype a
# local teacher computes in; not how a server is reached (its address, key, concurrency, retries, timeout: what
# one changes to resume after the server failed).
ROLLOUT_INPUTS = ["seed", "distill", "tasks", "model.prompt_format", "model.system_prompt", "model.dtype"]
TEACHER_RUNS_ONLY = ("base_url", "api_key_env", "concurrency", "max_retries", "timeout")


def _rollouts_made_from(recipe: Recipe, rollouts: Path) -> None:
    """An unfinished distillation resumes by appending to its rollouts: rollouts made from other settings (a
    rewritten form, another teacher prompt) would be mixed in silently, so that is one line naming what changed.
    A file from before this record existed is taken as it is."""
    made_from = rollouts.with_name("rollouts.made_from.json")
    reached = {k: type(recipe.distill).model_fields[k].default for k in TEACHER_RUNS_ONLY}
    wanted = fingerprint(recipe.model_copy(update={"distill": recipe.distill.model_copy(update=reached)}), ROLLOUT_INPUTS)
    if rollouts.exists() and made_from.exists():
        had = json.loads(made_from.read_text())
        changed = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
        if changed:
            raise UserError(f"{rollouts} holds the rollouts of an unfinished distillation made from other settings "
                            f"(changed: {', '.join(changed)}): restore them to resume, or delete the file to start over")
    rollouts.parent.mkdir(parents=True, exist_ok=True)
    write_json(made_from, wanted)


def _make_pairs(recipe: Recipe, stage_recipe: Recipe, data_dir: Path, current: str, log, progress: bool) -> None:
    """DPO pairs of the policy's own samples (and the teacher's); none is an error that leaves no file (an empty
    pairs.jsonl would make every rerun fail the same way)."""
    pairs_path, rollouts = data_dir / "pairs.jsonl", data_dir / "rollouts.jsonl"
    sources = recipe.pipeline.pair_sources
    teacher = [rollouts] if "teacher" in sources and rollouts.exists() else []
    stats = pairs.make(stage_recipe, pairs_path, teacher, current if "policy" in sources else None, progress)
    log(f"[pairs] {stats['pairs']} pairs from {stats['problems_with_both']} problems")
    if not stats["pairs"]:
        pairs_path.unlink(missing_ok=True)
        raise UserError(f"no DPO pairs: no problem of {', '.join(sources)} samples had both a correct and an incorrect "
                        f"rollout ({stats}); raise pipeline.policy_problems or pairs.policy_samples, or add "
                        f"`teacher` to pipeline.pair_sources")


def stage_rows(recipe: Recipe, out: Path, run: Run) -> list[dict]:
    """The stage table's rows: each evaluated stage's metrics on the first benchmark, and under `benchmarks` each
    benchmark's accuracy, 95% interval and gain over the stage above, paired by problem."""
    stages = []
    previous_samples: dict[str, list | None] = {}
    for name in ["base", *[s for s in recipe.pipeline.stages if s != "distill"]]:
        info = run.done(name)
        if not info or not info.get("eval"):
            continue
        first = next(iter(info["eval"].values()))
        benchmarks = {}
        for bench, result in info["eval"].items():  # each benchmark's accuracy, interval, and gain over the stage above
            entry = {k: result[k] for k in ("accuracy", "format_rate", "n")}
            samples_file = out / name / "eval" / f"{evaluate.file_stem(bench)}.samples.jsonl"
            samples = read_jsonl(samples_file) if samples_file.is_file() else None
            if samples:
                entry["ci95"] = evaluate.accuracy_interval(samples)
            if samples and previous_samples.get(bench):  # paired by problem
                try:
                    entry["change"] = evaluate.paired_change(previous_samples[bench], samples)
                except ValueError as e:  # other problems than the stage above's: no pairing, said in the summary
                    entry["unpaired"] = str(e)
            previous_samples[bench] = samples
            benchmarks[bench] = entry
        stage = {"name": name, "label": LABELS[name], "accuracy": first["accuracy"], "format_rate": first["format_rate"],
                 "reasoning_rate": first["reasoning_rate"], "avg_think_words": first["avg_think_words"],
                 "n": first["n"], "benchmarks": benchmarks,
                 **{k: v for k, v in next(iter(benchmarks.values())).items() if k in ("ci95", "change")}}
        stages.append(stage)
    return stages


def write_outputs(recipe: Recipe, out: Path, run: Run, base: str, final_model: str) -> dict:
    from thinkforge import report

    stages = stage_rows(recipe, out, run)
    example = None
    if recipe.eval.benchmarks:
        example = tasks.for_evaluation(recipe, recipe.eval.benchmarks[0])[1][0].question
    summary = {"stages": stages, "wall_seconds": round(run.state.get("seconds", 0.0), 1),
               "final_model": str(Path(final_model).resolve()), "example_question": example,
               "protocol": {"temperature": recipe.generation.temperature, "top_p": recipe.generation.top_p,
                            "max_new_tokens": recipe.generation.max_new_tokens, "samples": recipe.eval.samples,
                            "benchmarks": recipe.eval.benchmarks}}
    write_json(out / "summary.json", summary)
    report.write(recipe, out, summary, base)
    return summary
