"""Learning per CPU-minute: thinkforge's GRPO vs TRL's GRPOTrainer, trained for the same wall-clock budget from
the same model on the same tasks, then evaluated on the same held-out items.

    python benchmarks/learning_vs_trl.py --model models/smollm2-135m-instruct --lora --autocast \\
        --task reasoning_gym:chain_sum --task reasoning_gym:products --level 1 --level 2 --eval-level 2 \\
        --minutes 15 --eval-items 200 --curve-every 10 --lr 1e-4 --out runs/learning-vs-trl/s0 --seed 0

What is the same on both sides: the model folder; the training problems (the recipe's own pool,
`tasks.for_training`, which refuses any overlap with the evaluation items); the prompt text (rendered once by
thinkforge and handed to TRL as plain text); the reward (+1 when the task's own checker scores the extracted
answer 1.0, else -1: `train.sampling.score`, the very function thinkforge's RL calls); the sampling (temperature,
top-p 1, no top-k, `--max-new-tokens`); the batch (`--prompts` x `--group` completions per optimizer step, one
update per batch: mu = 1); the loss (the clipped ratio, token mean over the batch: TRL's `loss_type="dapo"`,
thinkforge's `loss_agg=token`; advantages (r - mean) / std within a group; no KL); AdamW at a constant `--lr`,
betas (0.9, 0.95), no weight decay, gradients clipped at 1; LoRA r 16 / alpha 32 on the same modules; every
dropout off in training (thinkforge's RL always, TRL by `disable_dropout=True`); fp32 weights, the loss pass
under bf16 autocast (`--autocast`). Sampling precision is each trainer's own: thinkforge samples under the same
autocast, TRL in fp32 (its `bf16=True` autocasts the loss pass only; `--trl-sampling bf16` autocasts its
sampling too, 5% slower per step on this CPU: 48-51 s vs 50-52 s, SmolLM2, 3 steps each). The budget is counted from each trainer's first step (loading and thinkforge's preflight, which is off
here, not counted): `rl.time_budget` on one side, a callback that ends training at the first step end past the
budget on the other.

Evaluation: each final model and the base, greedy, on `--eval-items` held-out items per task (the task's test
split at the training levels), each scored by its own task's checker; the gains over the base and the
difference between the two trained models with 95% intervals paired by item. Checkpoints every
`--curve-every` steps are evaluated on the first `--curve-items` items per task for the learning curve
(held-out accuracy against minutes of training), written with the results to `--out` (a PNG when matplotlib is
installed). The intervals are over the held-out items of one training run per trainer:
they say how sure the item sample makes each number, not how much another seed would move it (RL runs vary by
seed more than that): run several `--seed`s (the order of the two trainers alternates with the seed's parity).
Prints a table, then one JSON line: the two accuracy gains (points) and their ratio (null when TRL's gain is not
above 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SYSTEM = "Solve the problem. Be brief. End your reply with: The answer is <number>."
MIX = "learn"  # the name of the task mix in the recipe built here


def make_recipe(model_dir: str, a, budget: float | None = None):
    """The thinkforge recipe both trainers' settings are read from."""
    from thinkforge.config import load_config

    mix = {t: 1.0 for t in a.tasks}
    over = [f"model.name_or_path={model_dir}", f"model.system_prompt={json.dumps(a.system)}", f"seed={a.seed}",
            f"tasks.mixes={json.dumps({MIX: mix})}", f"rl.source={MIX}", f"rl.difficulties={json.dumps(a.levels)}",
            f"eval.benchmarks={json.dumps([MIX])}", f"eval.limit={a.eval_items * len(a.tasks)}",
            "rl.algo=grpo", f"rl.steps={a.max_steps}", f"rl.prompts_per_step={a.prompts}", f"rl.group_size={a.group}",
            f"rl.max_new_tokens={a.max_new_tokens}", f"rl.temperature={a.temperature}", "rl.temperature_start=null",
            "rl.top_p=1.0", "rl.mu=1", "rl.beta=0.0", "rl.advantage=grpo", "rl.loss_agg=token",
            "rl.policy_loss=ppo_clip", "rl.clip_high=0.2", "rl.truncation=none", "rl.reward=verifiable", "rl.drop_easy=false",
            "rl.preflight=false", f"rl.optim.lr={a.lr}", "rl.optim.warmup_ratio=0.0", "rl.optim.min_lr_ratio=1.0",
            "rl.optim.weight_decay=0.0", "rl.optim.clip=1.0", f"rl.micro_batch={a.micro_batch}",
            f"rl.gen_batch={a.prompts * a.group}", f"rl.n_problems={a.pool}",
            f"rl.checkpoints.every={a.curve_every}", "rl.checkpoints.keep=1000"]
    if budget is not None:
        over.append(f"rl.time_budget={budget}")
    if a.lora:
        over += ["lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05"]
    # fp32 weights on both sides (TRL loads them so below); bf16 autocast or none, never the CUDA default's bf16
    over += ["model.dtype=float32", "model.gradient_checkpointing=false",
             f"rl.mixed_precision={'bf16' if a.autocast else 'no'}"]
    return load_config(None, over)


def training_pool(recipe) -> list:
    """The prompts thinkforge's RL draws from (rl.main's own call), refused if any is an evaluation item."""
    from thinkforge import tasks

    cfg = recipe.rl
    return tasks.for_training(recipe, "rl", cfg.n_problems, cfg.difficulties, stream="rl" if cfg.fresh_prompts else "")


def run_thinkforge(model_dir: str, work: Path, a) -> dict:
    from thinkforge.train import rl

    out = work / "thinkforge"
    shutil.rmtree(out, ignore_errors=True)
    rl.main(make_recipe(model_dir, a, a.minutes), "rl", out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_seconds" in r and "step" in r]
    elapsed = {r["step"]: r["elapsed_seconds"] for r in rows}
    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in out.glob("step-*") if p.is_dir())
    return {"final": str(out / "final"), "steps": max(elapsed), "seconds": max(elapsed.values()),
            "curve": [(s, elapsed[s], str(p / "model")) for s, p in checkpoints if s in elapsed and s < max(elapsed)],
            "train_accuracy": [r.get("accuracy") for r in rows]}


def run_trl(model_dir: str, work: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkforge import models
    from thinkforge.formats import prompt_renderer
    from thinkforge.train.sampling import score

    recipe = make_recipe(model_dir, a)
    cfg = recipe.rl
    pool = training_pool(recipe)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    render = prompt_renderer(recipe.model, tok)
    ds = Dataset.from_list([{"prompt": render(p.question), "index": i} for i, p in enumerate(pool)])
    first = ds[0]["prompt"]  # TRL encodes a text prompt with the special tokens a tokenizer adds, thinkforge without
    if tok(first)["input_ids"] != tok(first, add_special_tokens=False)["input_ids"]:
        raise SystemExit(f"{model_dir}: its tokenizer adds special tokens (a BOS) to a text prompt, which TRL would "
                         f"add and thinkforge not; this benchmark compares models whose tokenizer adds none")

    def reward(completions, index, **_):  # thinkforge's RL score, on the same problem objects
        return [score(c, "stop", pool[i], cfg, None)[0] for c, i in zip(completions, index, strict=True)]

    budget = a.minutes * 60

    class Budget(TrainerCallback):
        def __init__(self):
            self.start, self.elapsed = None, {}

        def on_step_begin(self, args, state, control, **kw):
            if self.start is None:
                self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.elapsed[state.global_step] = time.time() - self.start
            if self.elapsed[state.global_step] >= budget:
                control.should_training_stop = True
                control.should_save = False  # the final model is saved below

    timer = Budget()
    out = work / "trl"
    shutil.rmtree(out, ignore_errors=True)
    n = a.prompts * a.group
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=n, num_generations=a.group,
                      gradient_accumulation_steps=1, max_completion_length=a.max_new_tokens, num_iterations=1,
                      beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2, learning_rate=a.lr,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                      max_grad_norm=1.0, temperature=a.temperature, top_p=1.0, top_k=0, max_steps=a.max_steps,
                      logging_steps=1, report_to="none", save_strategy="steps" if a.curve_every else "no",
                      save_steps=a.curve_every or 1, save_only_model=True, use_cpu=not torch.cuda.is_available(),
                      bf16=a.autocast, disable_tqdm=True, seed=a.seed, data_seed=a.seed,
                      disable_dropout=True,  # as thinkforge's RL: the loss's pass is the sampler's
                      gradient_checkpointing=False)  # TRL's default is True: recomputing activations costs time
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        from thinkforge.models import default_lora_targets

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=default_lora_targets(model),
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer], peft_config=peft_config)
    models.disable_dropout(trainer.model)  # config dropout floats too (TRL zeroes nn.Dropout modules only)
    # TRL autocasts its loss pass only (accelerate wraps the PeftModel's forward, and its generate bypasses it):
    # it samples in fp32 where thinkforge samples in bf16. --trl-sampling bf16 autocasts its sampling too.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=a.autocast and a.trl_sampling == "bf16"):
        trainer.train()
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.is_dir())
    for _, p in checkpoints:
        tok.save_pretrained(str(p))
    accuracy = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    return {"final": str(out / "final"), "steps": trainer.state.global_step, "seconds": max(timer.elapsed.values()),
            "curve": [(s, timer.elapsed[s], str(p)) for s, p in checkpoints
                      if s in timer.elapsed and s < trainer.state.global_step],
            "train_accuracy": [None if r is None else (r + 1) / 2 for r in accuracy]}  # reward +-1 -> share right


def evaluate_models(model_dir: str, paths: dict[str, str], problems: dict[str, list], a, work: Path) -> dict:
    """name -> the rows of one greedy evaluation of that model on its problem list (same prompts, same decoding)."""
    import contextlib
    import dataclasses

    from thinkforge import evaluate, rollout
    from thinkforge.formats import prompt_renderer

    recipe = make_recipe(model_dir, a)
    m = recipe.model.model_copy(update={"dtype": "bfloat16" if a.autocast else "float32"})
    out = {}
    for name, path in paths.items():
        generator, tok = rollout.load_generator(m, path, a.eval_batch, None, str(work), a.max_new_tokens)
        params = dataclasses.replace(evaluate.sampling_params(recipe), max_new_tokens=a.max_new_tokens, temperature=0.0)
        with contextlib.closing(generator):
            out[name], _ = evaluate.evaluate(generator, problems[name], prompt_renderer(recipe.model, tok), params,
                                             chunk=a.eval_batch, progress=False, benchmark=MIX)
    return out


def moved(final: str, base: str) -> float:
    """The largest weight change a training made: max |lora_B| of an adapter (zero at initialisation), else max
    |final - base| over the weights. Zero means the model evaluated is the base, whatever the accuracies say."""
    from safetensors.torch import load_file

    final_dir, base_dir = Path(final), Path(base)
    if (final_dir / "adapter_config.json").is_file():
        state = load_file(str(final_dir / "adapter_model.safetensors"))
        return max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k)
    theirs = {k: v for f in sorted(base_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    ours = {k: v for f in sorted(final_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours.keys() & theirs.keys())


def accuracy(rows: list[dict], task: str | None = None) -> float:
    picked = [r for r in rows if task is None or r["task"] == task]
    return sum(r["correct"] for r in picked) / max(1, len(picked))


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([m for m, _ in points], [100 * y for _, y in points], marker="o", label=name)
    ax.set_xlabel("minutes of training (wall clock, this CPU)")
    ax.set_ylabel("held-out accuracy, %")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="A model folder (e.g. models/smollm2-135m-instruct)")
    ap.add_argument("--task", dest="tasks", action="append", default=None, help="A task name (repeatable; equal weights)")
    ap.add_argument("--level", dest="levels", action="append", type=int, default=None, help="Difficulty level(s)")
    ap.add_argument("--eval-level", dest="eval_levels", action="append", type=int, default=None,
                    help="Level(s) of the held-out items (default: the training levels)")
    ap.add_argument("--minutes", type=float, default=20.0, help="Training wall-clock budget of each trainer")
    ap.add_argument("--max-steps", type=int, default=100000, help="A step cap besides the budget")
    ap.add_argument("--eval-items", type=int, default=200, help="Held-out items per task")
    ap.add_argument("--curve-every", type=int, default=0, help="Checkpoint every N steps for the curve (0: finals only)")
    ap.add_argument("--curve-items", type=int, default=50, help="Items per task a checkpoint is evaluated on")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--pool", type=int, default=2000, help="Training problems in the pool")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--system", default=SYSTEM)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--autocast", action="store_true", help="fp32 weights, bf16 autocast (both trainers)")
    ap.add_argument("--trl-sampling", choices=["fp32", "bf16"], default="fp32",
                    help="With --autocast: TRL's sampling precision (fp32: TRL's own, its loss pass alone autocast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["thinkforge", "trl"], default=None)
    ap.add_argument("--out", default=None, help="A folder for results.json and the curve's PNG (default: none kept)")
    a = ap.parse_args()
    a.tasks = a.tasks or ["reasoning_gym:chain_sum"]
    a.levels = a.levels or [1]
    import torch
    import transformers

    from thinkforge import evaluate, tasks

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = str(Path(a.model).resolve())
        recipe = make_recipe(model_dir, a)
        mix = tasks.from_recipe(recipe, MIX)
        held_out = mix.problems("test", a.eval_items * len(a.tasks), a.seed,
                                mix.level_list(a.eval_levels or a.levels, "--eval-level"))
        tasks.assert_disjoint(training_pool(recipe), held_out, "the training pool and the held-out items")
        by_task = {t: [p for p in held_out if p.task_name == t] for t in a.tasks}
        curve_items = [p for t in a.tasks for p in by_task[t][: a.curve_items]]
        order = [("thinkforge", run_thinkforge), ("trl", run_trl)]  # which runs first alternates with the seed
        runs = {}
        for name, train in order[:: -1 if a.seed % 2 else 1]:
            if a.only in (None, name):
                runs[name] = train(model_dir, work, a)
        runs = {name: runs[name] for name, _ in order if name in runs}
        paths, problems = {"base": model_dir}, {"base": held_out}
        for name, r in runs.items():
            r["moved"] = moved(r["final"], model_dir)
            paths[name], problems[name] = r["final"], held_out
            for step, _, path in r["curve"]:
                paths[f"{name}@{step}"], problems[f"{name}@{step}"] = path, curve_items
        rows = evaluate_models(model_dir, paths, problems, a, work)

    curve_ids = {p.id for p in curve_items}  # the final models' points: their rows on the checkpoints' items
    base_curve = [r for r in rows["base"] if r["problem_id"] in curve_ids]
    curves = {}
    for name, r in runs.items():
        points = [(0.0, accuracy(base_curve))]
        points += [(s / 60, accuracy(rows[f"{name}@{step}"])) for step, s, _ in r["curve"]]
        points.append((r["seconds"] / 60, accuracy([x for x in rows[name] if x["problem_id"] in curve_ids])))
        curves[name] = points
    gains = {name: evaluate.paired_change(rows["base"], rows[name]) for name in runs}
    diff = evaluate.paired_change(rows["trl"], rows["thinkforge"]) if len(runs) == 2 else None
    device = f"CPU, {torch.get_num_threads()} threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, {a.model}, tasks {a.tasks} "
          f"at levels {a.levels} (held-out: {a.eval_levels or a.levels}), {a.minutes} min each, {a.prompts} prompts x {a.group} samples, {a.max_new_tokens} new "
          f"tokens, T {a.temperature}, lr {a.lr}, lora {a.lora}, autocast {a.autocast}, seed {a.seed}; "
          f"{len(held_out)} held-out items, greedy")
    cols = " | ".join(a.tasks)
    print(f"| model | steps | minutes | max weight change | accuracy | {cols} | gain over base (95% CI, paired) |")
    print("|---" * (6 + len(a.tasks)) + "|")
    print(f"| base | - | - | - | {100 * accuracy(rows['base']):.1f} | "
          + " | ".join(f"{100 * accuracy(rows['base'], t):.1f}" for t in a.tasks) + " | - |")
    for name, r in runs.items():
        g = gains[name]
        print(f"| {name} | {r['steps']} | {r['seconds'] / 60:.1f} | {r['moved']:.2e} | {100 * accuracy(rows[name]):.1f} | "
              + " | ".join(f"{100 * accuracy(rows[name], t):.1f}" for t in a.tasks)
              + f" | {100 * g['change']:+.1f} ({100 * g['ci95'][0]:+.1f} to {100 * g['ci95'][1]:+.1f}) |")
    for t in a.tasks:  # what ignoring the question earns, and whether a gain is one answer given to everything
        base = tasks.constant_baseline(by_task[t])
        spread = "; ".join(f"{name} {answers(rows[name], t)}" for name in ["base", *runs])
        print(f"{t}: constant answer {base['answer']!r} scores {100 * base['accuracy']:.1f}%; most common answer: {spread}")
    if diff:
        print(f"thinkforge - TRL: {100 * diff['change']:+.1f} points (95% CI {100 * diff['ci95'][0]:+.1f} to "
              f"{100 * diff['ci95'][1]:+.1f}, paired over {diff['n']} items)")
    for name, points in curves.items():
        print(f"curve {name}: " + ", ".join(f"{m:.1f} min {100 * y:.1f}%" for m, y in points))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"settings": {k: v for k, v in vars(a).items()}, "device": device,
                  "runs": {n: {k: v for k, v in r.items() if k not in ("final", "curve")} for n, r in runs.items()},
                  "gains": gains, "difference": diff, "curves": curves,
                  "accuracy": {n: {"all": accuracy(rows[n]), **{t: accuracy(rows[n], t) for t in a.tasks}}
                               for n in ["base", *runs]},
                  "constant_baseline": {t: tasks.constant_baseline(by_task[t]) for t in a.tasks},
                  "most_common_answer": {n: {t: answers(rows[n], t) for t in a.tasks} for n in ["base", *runs]},
                  "items": {n: [{k: r[k] for k in ("problem_id", "task", "question", "reference", "answer", "correct")
                                 if k in r} for r in rows[n]] for n in ["base", *runs]}}  # per item: audits, twins
        (out / "results.json.tmp").write_text(json.dumps(result, indent=1))
        os.replace(out / "results.json.tmp", out / "results.json")
        title = f"{', '.join(a.tasks)}: trained at levels {a.levels}, held-out {a.eval_levels or a.levels}, seed {a.seed}"
        if plot(curves, out / "curve.png", title):
            print(f"curve: {out / 'curve.png'}")
    tf, peer = gains.get("thinkforge"), gains.get("trl")
    ratio = round(tf["change"] / peer["change"], 3) if tf and peer and peer["change"] > 0 else None
    print(json.dumps({"metric": "heldout_accuracy_gain", "thinkforge": number(tf["change"]) if tf else None,
                      "peer": number(peer["change"]) if peer else None, "ratio": ratio,
                      "difference_ci95": [number(x) for x in diff["ci95"]] if diff else None}))


def answers(rows: list[dict], task: str) -> str:
    """The most common answer a model gave to one task's items, its share, and how many distinct answers it gave."""
    given = [str(r.get("answer")) for r in rows if r["task"] == task]
    if not given:
        return "no items"
    top = max(sorted(set(given)), key=given.count)  # ties: the first in sorted order, the same every run
    return f"{top!r} {100 * given.count(top) / len(given):.0f}% of {len(given)} ({len(set(given))} distinct)"


def number(x: float) -> float | None:
    """A JSON number, or null for an interval of too few items (NaN)."""
    return None if x != x else round(x, 4)


if __name__ == "__main__":
    main()
