"""The run's report: report.md with the stage table and PNG plots, and a model card in the final model folder
(structured like the Infused Phi-2 card: details, training, data, results, how to load it)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from thinkforge.cards import FOUR_BIT_SNIPPET, four_bit_words, metadata
from thinkforge.formats import SYSTEM_PROMPT, prompt_snippet
from thinkforge.io import atomic_write
from thinkforge.stages import STAGES


def _change(c: dict | None) -> str:
    return f"{100 * c['change']:+.1f} ({100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f})" if c else ""


def stage_table(summary: dict) -> str:
    """Accuracy and the card's metrics per stage on the first benchmark; `change` is the gain over the stage above,
    paired by problem, with its 95% interval (an interval that excludes 0 is a change the evaluation resolves).
    With several benchmarks, a second table: each one's accuracy and change per stage."""
    lines = ["| stage | accuracy | change (95% interval) | format | reasoning | think words | n |",
             "|---|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['label']} | {100 * s['accuracy']:.1f} | {_change(s.get('change'))} | "
                     f"{100 * s['format_rate']:.1f} | {100 * s['reasoning_rate']:.1f} | {s['avg_think_words']:.1f} | {s['n']} |")
    names = list(summary["stages"][0].get("benchmarks", {})) if summary["stages"] else []
    if len(names) > 1:
        lines += ["", "Every benchmark: accuracy %, change over the stage above (95% interval, paired by problem).", "",
                  "| stage | " + " | ".join(f"{b} (n {summary['stages'][0]['benchmarks'][b]['n']})" for b in names) + " |",
                  "|---|" + "---|" * len(names)]
        for s in summary["stages"]:
            cells = [s.get("benchmarks", {}).get(b) for b in names]
            lines.append(f"| {s['label']} | " + " | ".join(
                "" if c is None else f"{100 * c['accuracy']:.1f} {_change(c.get('change'))}".rstrip() for c in cells) + " |")
    return "\n".join(lines)


def _rl_rows(out: Path) -> tuple[list[dict], list[dict]]:
    path = out / "rl" / "metrics.jsonl"
    if not path.exists():
        return [], []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if "reward" in r and "event" not in r], [r for r in rows if r.get("event") == "aha"]


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plots(out: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if summary["stages"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [s["label"] for s in summary["stages"]]
        acc = [100 * s["accuracy"] for s in summary["stages"]]
        # each stage's 95% interval over problems (a summary written before intervals were kept has none)
        low = [v - 100 * s["ci95"][0] if s.get("ci95") else 0.0 for v, s in zip(acc, summary["stages"], strict=True)]
        high = [100 * s["ci95"][1] - v if s.get("ci95") else 0.0 for v, s in zip(acc, summary["stages"], strict=True)]
        ax.bar(labels, acc, color="#4a7bb7", yerr=[low, high], capsize=4, ecolor="#333333")
        for i, v in enumerate(acc):
            ax.text(i + 0.08, v + high[i] + 1, f"{v:.1f}", ha="left", fontsize=9)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 110)
        ax.set_title("accuracy after each stage, with its 95% interval (held-out)")
        fig.tight_layout()
        fig.savefig(out / "staircase.png", dpi=110)
        plt.close(fig)
        made.append("staircase.png")
    rows, aha = _rl_rows(out)
    if rows:
        steps = [r["step"] for r in rows]
        panels = (("reward", "reward"), ("accuracy", "training accuracy"), ("think_words", "thinking words"), ("kl", "KL to the reference"))
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
        for ax, (key, title) in zip(axes, panels, strict=True):
            values = [r.get(key, 0.0) for r in rows]
            ax.plot(steps, values, color="#4a7bb7", alpha=0.45, linewidth=1, label="per step")
            ax.plot(steps, running_mean(values, 5), color="#1f3f73", linewidth=2, label="mean of 5 steps")
            ax.set_title(title + (" (not computed: no reference)" if key == "kl" and not any(key in r for r in rows) else ""))
            ax.set_xlabel("RL step")
            for e in aha:
                ax.axvline(e["step"], color="#d95f02", alpha=0.6, linestyle="--")
        if any("temperature" in r for r in rows):  # the annealed sampling temperature explains part of the accuracy
            twin = axes[1].twinx()
            twin.plot(steps, [r.get("temperature", 0.0) for r in rows], color="#888888", linestyle=":", label="temperature")
            twin.set_ylabel("sampling temperature", color="#888888")
        if any("curriculum_level" in r for r in rows):  # the level the prompts came from (rl.curriculum)
            twin = axes[0].twinx()
            twin.step(steps, [r.get("curriculum_level", 0) for r in rows], where="post", color="#1b9e77", label="curriculum level")
            twin.set_ylabel("curriculum level", color="#1b9e77")
        axes[0].legend(fontsize=8)
        if aha:
            axes[2].plot([], [], color="#d95f02", linestyle="--", label="aha moment")
            axes[2].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rl_curves.png", dpi=110)
        plt.close(fig)
        made.append("rl_curves.png")
    return made


def _ran(out: Path | None, stage: str) -> str:
    """What a stage actually ran, from its metrics (steps; RL: the temperatures met), or "" when unknown."""
    path = out / stage / "metrics.jsonl" if out is not None else None
    if path is None or not path.is_file():
        return ""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    if not steps:
        return ""
    text = f"; ran {max(r['step'] for r in steps)} optimizer steps"
    temps = [r["temperature"] for r in steps if "temperature" in r]
    if temps:
        text += f", sampling temperature {temps[0]:g} -> {temps[-1]:g}"
    return text


def _compute_dtype(recipe) -> str:
    """The dtype a 4-bit base computed in (models.four_bit_config: the model's dtype on the device it ran on)."""
    from thinkforge import models

    return str(models.resolve_dtype(recipe.model.dtype, models.resolve_device(recipe.model.device))).removeprefix("torch.")


def model_card(recipe, summary: dict, base: str, out: Path | None = None) -> str:
    final = Path(summary["final_model"])
    adapter = (final / "adapter_config.json").is_file()
    base_ref = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter else base
    stages = [s for s in recipe.pipeline.stages]
    hp = [f"- {STAGES[s].title[0].upper()}{STAGES[s].title[1:]} (stage {STAGE_NUMBER[s]}): {STAGES[s].describe(recipe)}"
          f"{_ran(out, s)}" for s in stages if s in STAGES]
    if recipe.lora.enabled:
        with_dropout = [s for s in stages if s in STAGES and STAGES[s].module == "sft"]  # DPO and RL run without
        dropout = f"dropout {recipe.lora.dropout} in {', '.join(with_dropout)}" if with_dropout else "no dropout"
        hp.append(f"- LoRA: r {recipe.lora.r}, alpha {recipe.lora.alpha}, {dropout}, "
                  f"targets {recipe.lora.target_modules or 'architecture default'}")
    system = recipe.model.system_prompt if recipe.model.system_prompt is not None else SYSTEM_PROMPT
    prompt_line = _prompt_line(recipe.model.prompt_format, final)
    four_bit = adapter and recipe.model.load_in_4bit  # QLoRA: the base loaded as it trained
    quant = (",\n    " + FOUR_BIT_SNIPPET.format(dtype=_compute_dtype(recipe))) if four_bit else ""
    load = f'''from transformers import AutoModelForCausalLM, AutoTokenizer{", BitsAndBytesConfig" if four_bit else ""}
{"from peft import PeftModel" + chr(10) if adapter else ""}import torch

base_model = AutoModelForCausalLM.from_pretrained("{base_ref if adapter else final}", torch_dtype=torch.float32{quant})
tokenizer = AutoTokenizer.from_pretrained("{final}")
{f'model = PeftModel.from_pretrained(base_model, "{final}")' if adapter else "model = base_model"}
model.eval()
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

system_prompt = {json.dumps(system)}
question = {json.dumps(summary.get("example_question") or "What is 2 + 3?")}
{prompt_line}
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
outputs = model.generate(**inputs, max_new_tokens={recipe.generation.max_new_tokens}, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(outputs[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))'''
    p = summary["protocol"]
    tags = ["reasoning", *[STAGES[s].tag(recipe) for s in stages if s in STAGES], *(["lora"] if adapter else [])]
    return metadata(base, adapter, tags) + f"""# Model card: {final.name} (thinkforge)

A reasoning model trained with thinkforge: {_recipe_line(recipe)}. It answers in the form
`<think> reasoning </think> <answer> final answer </answer>`.

## Model details
- Base model: {str(Path(base).resolve()) if Path(base).exists() else base}
- Training method: {", ".join(LABEL.get(s, s) for s in stages)}
- Output: {"a PEFT LoRA adapter" if adapter else "full weights (safetensors)"}{(". " + four_bit_words(_compute_dtype(recipe))) if four_bit else ""}
- Prompt format: {recipe.model.prompt_format}; system prompt: {json.dumps(recipe.model.system_prompt)}

## Training details
### Data
- Teacher: {recipe.distill.teacher}{f" ({recipe.distill.teacher_model})" if recipe.distill.teacher_model else ""}, {recipe.distill.samples} rollouts per problem, source {recipe.distill.source}, graded and rejection-sampled (only verified-correct rollouts in stages 1-2; incorrect ones as DPO rejected side).
- RL prompts: task {recipe.rl.source}{_levels_line(recipe)}.
### Hyperparameters
{chr(10).join(hp)}

## Results
Held-out benchmarks {", ".join(p["benchmarks"])}; temperature {p["temperature"]}, top-p {p["top_p"]}, max new tokens
{p["max_new_tokens"]}, {p["samples"]} sample(s) per problem; accuracy is pass@1.

{stage_table(summary)}

Metrics as in the Infused Phi-2 card: accuracy (correctness rate), format compliance rate, reasoning
presence rate (thinking of at least 5 words), average thinking length in words.

## How to get started
```python
{load}
```

### llama.cpp, Ollama, LM Studio
{_gguf_section(final, base_ref if adapter else final, adapter, system)}"""


def _gguf_section(final: Path, weights: str | Path, adapter: bool, system: str | None) -> str:
    """How to run the model in llama.cpp, or why it cannot be exported yet: by its architecture's row."""
    from thinkforge.arch import ARCHS

    config = Path(weights) / "config.json"
    kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None  # None: a Hub base
    supported = ", ".join(f"{name} (as llama.cpp's {row.gguf})" for name, row in ARCHS.items() if row.gguf)
    if kind is not None and (kind not in ARCHS or ARCHS[kind].gguf is None):
        return (f"`thinkforge export` writes GGUF files for {supported}; this model's architecture ({kind}) is not "
                f"among them yet.\n")
    spec = final / "tokenizer.json"  # the exporter writes byte-level BPE only (Phi-3-mini's SentencePiece: not yet)
    if spec.is_file():
        tok = json.loads(spec.read_text())
        model_type, decoder = (tok.get("model") or {}).get("type"), json.dumps(tok.get("decoder"))
        if model_type != "BPE" or "ByteLevel" not in decoder:
            return (f"`thinkforge export` writes byte-level BPE tokenizers; this model's ({model_type}, decoded by "
                    f"{(tok.get('decoder') or {}).get('type')}) is not one yet, so it has no GGUF file.\n")
    return f"""One GGUF file holds the weights{" (the adapter merged into its base)" if adapter else ""}, the tokenizer and the chat
template; `--dtype` is f32, bf16, f16 (the default) or q8_0. {f"This model is a {kind} model, written as llama.cpp's {ARCHS[kind].gguf}" if kind else "`thinkforge export` refuses an architecture it does not write"} (`thinkforge export` writes {supported}):
```bash
thinkforge export {final} --gguf {final.name}.gguf --dtype f16
llama-cli -m {final.name}.gguf -cnv{f" -sys {shlex.quote(system)}" if system else ""}
```
"""


def _levels_line(recipe) -> str:
    """", difficulty levels [1, 2] (curriculum)" where the RL task has levels; "" where it has none."""
    from thinkforge import tasks

    task = tasks.load(recipe.rl.source, recipe.tasks.options, recipe.tasks.mixes)
    if task.levels is None:
        return ""
    levels = recipe.rl.difficulties or (list(task.default_levels) if task.default_levels else None)
    return (f", difficulty levels {levels}" if levels else ", the task's own difficulty configuration") + \
        (" (curriculum)" if recipe.rl.curriculum else "")


def _prompt_line(fmt: str, model_dir: Path) -> str:
    """The card snippet's prompt: rendered as the recipe rendered it in training and evaluation."""
    if fmt == "auto":
        from thinkforge.models import load_tokenizer

        fmt = "chat_template" if getattr(load_tokenizer(str(model_dir)), "chat_template", None) else "phi2"
    return prompt_snippet(fmt)


def _recipe_line(recipe) -> str:
    """Which recipe the stages make: the four-stage Phi-4-mini-reasoning one, or the Infused Phi-2 GRPO-LoRA one."""
    stages = [LABEL.get(s, s) for s in recipe.pipeline.stages]
    if recipe.rl.reward == "weighted" and "rl" in recipe.pipeline.stages:
        weights = ", ".join(f"{k} {v:g}" for k, v in recipe.rewards.weights.items())
        return f"the Infused Phi-2 recipe (GRPO with weighted rewards: {weights}), stages {', '.join(stages)}"
    return f"the Phi-4-mini-reasoning recipe, stages {', '.join(stages)}"


LABEL = {"distill": "teacher distillation", **{s.name: s.title for s in STAGES.values()}}
STAGE_NUMBER = {s: i + 1 for i, s in enumerate(STAGES)}  # the recipe's numbering (Phi-4-mini-reasoning: 1-4)


def write(recipe, out: Path, summary: dict, base: str) -> None:
    made = plots(out, summary)
    rows, aha = _rl_rows(out)
    aha_lines = [f"- step {e['step']}: {e['statistic']} {e['value']:.2f} (previous mean {e['previous_mean']:.2f})" for e in aha]
    p = summary["protocol"]
    text = f"""# thinkforge run report

Wall time {summary['wall_seconds']:.0f} s. Final model: `{summary['final_model']}`.
Evaluation: {", ".join(p['benchmarks'])}, held out; temperature {p['temperature']}, top-p {p['top_p']},
max new tokens {p['max_new_tokens']}, {p['samples']} sample(s) per problem (pass@1).

## Accuracy per stage

{stage_table(summary)}

{"![accuracy per stage](staircase.png)" if "staircase.png" in made else ""}

## RL
{"![reward, training accuracy (with the sampling temperature), thinking length and KL over RL steps; dashed lines mark aha moments](rl_curves.png)" if "rl_curves.png" in made else "No RL stage in this run."}

{"Aha moments:" + chr(10) + chr(10).join(aha_lines) if aha_lines else ("No aha moment was flagged." if rows else "")}
"""
    with atomic_write(out / "report.md") as f:
        f.write(text)
    final = Path(summary["final_model"])
    if final.is_dir():
        with atomic_write(final / "README.md") as f:
            f.write(model_card(recipe, summary, base, out))
