"""The training stages, one row each: what `thinkforge run`, the CLI and the report know about a stage.

Every stage is a module under `thinkforge/train/` whose `main` has one signature:

    main(recipe, stage, run_dir, data=None, progress=True, stop_after=None) -> final model folder | None

`stage` is the name of its recipe section (and of its run folder and checkpoints); `data` is its input file
(None: the section's own); `stop_after` checkpoints and returns None after that many steps, as an interruption
would. A new stage is its module, its section in `config.py` (its schema with nested `optim` and
`checkpoints`), and one row below: the pipeline runs it in recipe order, the CLI gets a command of its name,
and the report a row and a hyper-parameter line.

This module stays light (no torch): a stage's module is imported when the stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thinkforge.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str  # the recipe section, the CLI command, the run folder
    module: str  # the module under thinkforge/train/ with its `main`
    label: str  # its row in the stage table ("+fine-tuning")
    title: str  # what the model card calls it
    tag: Callable  # recipe -> its hub tag
    summary: str  # the CLI command's help line
    data: str | None  # the pipeline's input for it, under the run's data folder (None: it needs no file)
    describe: Callable  # recipe -> the model card's hyper-parameter line (without what it ran)
    data_option: tuple[dict, str]  # the CLI's --data FILE: the keys it sets ({key: None} -> FILE), its help
    out_help: str  # what the CLI's --out run folder holds
    inputs: tuple[str, ...] = ()  # recipe keys it is made from besides its own section (pipeline fingerprints)
    options: dict[str, tuple[str, type | tuple, str]] = field(default_factory=dict)  # CLI --flag -> (key, type, help)

    def main(self) -> Callable:
        return importlib.import_module(f"thinkforge.train.{self.module}").main

    def run(self, recipe, run_dir: str | Path, data: str | None = None, progress: bool = True,
            stop_after: int | None = None) -> Path | None:
        """The stage's main; out of memory is one line naming the stage, its rows and batch, and what
        `thinkforge plan` says to change (a traceback of a 13 GB allocation in lm_head helps nobody)."""
        try:
            return self.main()(recipe, self.name, run_dir, data=data, progress=progress, stop_after=stop_after)
        except (RuntimeError, MemoryError) as e:
            from thinkforge.rollout.types import is_out_of_memory

            if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
                raise
            raise UserError(_out_of_memory(recipe, self.name, e)) from e  # the chain stays for a debugger


def _out_of_memory(recipe, stage: str, error: BaseException) -> str:
    import os

    from thinkforge import plan
    from thinkforge.models import resolve_device

    cuda = resolve_device(recipe.model.device).startswith("cuda")
    s = plan.settings_for(recipe, stage, "cuda" if cuda else "cpu")
    what = f"rows of {s.row_tokens} tokens x {s.batch} per micro-batch" + (" (pairs: 2 rows each)" if s.rows_per_item == 2 else "")
    try:
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory if cuda else plan.machine_memory()
        ranks = int(os.environ.get("WORLD_SIZE", "1"))  # the run's ranks, as accelerate launched them
        advice = plan.plan(recipe, ranks if cuda else 0, memory, "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP") else "ddp")
        advice = next((r["advice"] for r in advice if r["stage"] == stage), "")
        advice = advice.removeprefix("does not fit: ") if advice != "fits" else (
            f"the plan predicts it fits ({stage}.batch_size or a shorter row may still be needed)")
    except Exception as e:  # the plan needs the model's config; the error line must not fail with it
        tip = "" if recipe.model.gradient_checkpointing else ", or set model.gradient_checkpointing=true"
        advice = f"lower the micro-batch or the row length{tip} (the plan itself failed: {type(e).__name__}: {e})"
    import re

    size = re.search(r"allocate (\d+) bytes", str(error))
    first = (f"an allocation of {int(size.group(1)) / 2**30:.1f} GB failed" if size else
             str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__)
    return f"{stage}: out of memory with {what} ({first}); `thinkforge plan` says: {advice}"


def _sft_line(recipe, name: str, what: str) -> str:
    c = getattr(recipe, name)
    return (f"{what}, packing {c.packing}, sequence length {c.max_len}, lr {c.optim.lr}, epochs {c.epochs}, max steps "
            f"{c.max_steps}, warmup {c.optim.warmup_ratio:.0%}, batch {c.batch_size} x {c.grad_accum}")


def _dpo_line(recipe) -> str:
    c = recipe.dpo
    return f"loss {c.loss}, beta {c.beta}, lr {c.optim.lr}, epochs {c.epochs}, reference = the stage-2 model"


def _rl_line(recipe) -> str:
    c = recipe.rl
    return (f"{c.algo}, reward {c.reward}, {c.steps} steps, {c.prompts_per_step} prompts x {c.group_size} samples, "
            f"lr {c.optim.lr}, beta {c.beta}, clip {c.clip_low}/{c.clip_high}, aggregation {c.loss_agg}, temperature "
            f"{c.temperature_start} -> {c.temperature} over {c.anneal_steps} steps, max new tokens {c.max_new_tokens}")


_FOLDER = "checkpoints, metrics.jsonl, tensorboard/, final/; a rerun resumes from it"
_SFT_DATA = "JSONL of graded rollouts: question and completion columns"

STAGES = {s.name: s for s in [
    Stage(name="midtrain", module="sft", label="+mid-training", title="mid-training", tag=lambda r: "distillation",
          summary="Distillation mid-training (stage 1): next-token loss on verified chains of thought, packed rows.",
          data="sel/accepted.jsonl",
          describe=lambda r: _sft_line(r, "midtrain", "next-token loss on verified chains of thought"),
          data_option=({"midtrain.data": None}, _SFT_DATA), out_help=f"Run folder: {_FOLDER}."),
    Stage(name="sft", module="sft", label="+fine-tuning", title="fine-tuning", tag=lambda r: "sft",
          summary="Supervised fine-tuning (stage 2) on the harder subset, unpacked, completion tokens only.",
          data="sel/hard.jsonl", describe=lambda r: _sft_line(r, "sft", "harder subset"),
          data_option=({"sft.data": None}, _SFT_DATA), out_help=f"Run folder: {_FOLDER}."),
    Stage(name="dpo", module="dpo", label="+rollout DPO", title="rollout DPO", tag=lambda r: "dpo",
          summary="Rollout preference learning (stage 3): DPO or IPO with the starting model as the reference.",
          data="pairs.jsonl", describe=_dpo_line,
          data_option=({"dpo.data": None}, "Pairs JSONL: question, chosen, rejected (`thinkforge data pairs`)"),
          out_help=f"Run folder: reference log-probs, {_FOLDER}.",
          options={"--loss": ("dpo.loss", ("sigmoid", "ipo"), "sigmoid = DPO, ipo = IPO"),
                   "--beta": ("dpo.beta", float, "DPO beta")}),
    Stage(name="rl", module="rl", label="+RLVR", title="RLVR", tag=lambda r: r.rl.algo,
          summary="RL with verifiable reward (stage 4): GRPO or PPO with the stability recipe and progress monitoring.",
          data=None, describe=_rl_line,
          data_option=({"rl.data_path": None, "rl.source": "local"}, "Prompts JSONL/Parquet with references (question, "
                       "answer; rl.columns maps others); default: the recipe's rl.source"),
          out_help=f"Run folder: {_FOLDER} (metrics with aha events).", inputs=("rewards", "rollout.backend", "tasks"),
          options={"--algo": ("rl.algo", ("grpo", "ppo"), "grpo or ppo"), "--steps": ("rl.steps", int, "optimizer steps"),
                   "--task": ("rl.source", str, "the task of the prompts, by name (synthetic, reasoning_gym:<task>, a mix)")}),
]}
