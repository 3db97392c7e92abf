"""Typed configuration: one schema per section, then YAML, then `key=value` overrides.

    recipe = load_config("recipes/tiny.yaml", ["generation.temperature=0.8"])

Every field has a default and a description; an unknown key, a wrong type or an out-of-range value is a
UserError that names the key (with a did-you-mean for typos). Components take plain arguments, not this
object: the CLI and the stage mains unpack it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from thinkforge.errors import UserError

# YAML reads a bare `no` (in a recipe or `KEY=no` on the command line) as false: that is the "no" it means.
Precision = Annotated[Literal["auto", "no", "bf16", "bf16_if_native"], BeforeValidator(lambda v: "no" if v is False else v)]
PRECISION = ("auto = bf16 autocast on CUDA, fp32 on CPU; bf16_if_native = bf16 autocast on CUDA and on a CPU that "
             "computes bf16 natively (x86 AMX or AVX512-BF16, Arm bf16), fp32 on other CPUs (which convert every bf16 "
             "operand: ~8x slower than fp32, measured on an AVX2 EPYC) and on MPS; bf16 = bf16 autocast everywhere. "
             "The precision computed is in each stage's start row.")


def _no_bare_low_precision(v):
    if v in ("bfloat16", "float16"):
        raise ValueError(f"model.trainable_dtype={v} would update {v} weights in place: an AdamW step of about lr is below "
                         f"half a {v} ulp of most weights and is lost (PITFALLS 14); keep float32 master weights (bf16 "
                         f"compute: <stage>.mixed_precision=bf16) or ask for it by name: model.trainable_dtype=pure_{v}")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _on_off(value):
    """YAML reads a bare on / off as true / false: take them as the words."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ModelConfig(_Section):
    name_or_path: str = Field("runs/tiny-model", description="Hugging Face hub id or local folder of a causal LM (or a PEFT adapter folder).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the weights that do not train (evaluation, serving, a LoRA base); auto = "
        "bfloat16 on CUDA, float32 on CPU. Trained weights follow trainable_dtype.")
    trainable_dtype: Annotated[Literal["float32", "pure_bfloat16", "pure_float16"], BeforeValidator(_no_bare_low_precision)] = Field(
        "float32", description="The weights the optimizer updates: float32 master weights (bf16 compute comes from "
        "mixed_precision). pure_bfloat16 / pure_float16 update low-precision weights in place with no fp32 copy: an "
        "AdamW step (~lr) below half an ulp is lost, so at lr 5e-7 almost nothing moves (PITFALLS 14); memory experiments only.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Only when you trust it.")
    load_in_4bit: bool = Field(False, description="4-bit NF4 base weights via bitsandbytes (QLoRA), on CUDA or a CPU; training needs lora.enabled.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: str | None = Field(None, description="eager, sdpa or flash_attention_2; None lets transformers choose.")
    compile: Annotated[Literal["off", "on", "auto"], BeforeValidator(_on_off)] = Field(
        "off", description="torch.compile each decoder layer for the passes that take gradients (train/compiled.py; "
        "the no-grad passes stay eager, so step-1 KL reads ~bf16 rounding, not 0). auto: when the stage's planned "
        "tokens repay the compile time measured for its kind of pass on this device kind, SmolLM2-135M's figures (the "
        "rule and its numbers go in the stage's start row); on: always; off: never.")
    prompt_format: Literal["auto", "phi2", "phi4", "chat_template", "plain"] = Field(
        "auto", description="auto = the tokenizer's chat template if it has one, else phi2."
    )
    system_prompt: str | None = Field(None, description="System text; None = the Infused Phi-2 card's think/answer prompt.")


class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank (Infused Phi-2: 16).")
    alpha: int = Field(32, ge=1, description="LoRA alpha (Infused Phi-2: 32).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout (Infused Phi-2: 0.05), in SFT and mid-training: "
                           "DPO and RL turn every dropout off (their passes are compared; models.disable_dropout).")
    target_modules: list[str] | None = Field(None, description="Module names; None = the architecture's default (its row of arch.ARCHS).")


class GenerationConfig(_Section):
    max_new_tokens: int = Field(384, ge=1, description="Tokens generated per sample at most.")
    temperature: float = Field(0.6, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")
    batch_size: int = Field(16, ge=1, description="Sequences generated together.")


class RolloutConfig(_Section):
    """Where RL samples: in this process (hf) or on a vLLM server that holds its own copy of the weights."""

    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="hf = transformers in this process; vllm = a vLLM server (started here, or rollout.base_url) "
        "with weight sync after every step; openai = any OpenAI-compatible server at rollout.base_url serving the model "
        "by its name (evaluation, pair sampling; no weight updates, so not RL).")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the server's API key.")
    base_url: str | None = Field(None, description="A vLLM server already running (e.g. http://10.0.0.5:8000); None = "
                                 "start one here. Full-weight sync needs it to read this machine's sync folder.")
    vllm_command: str = Field(".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server",
                              description="How to start vLLM's OpenAI server (its own venv: `make vllm`; on GPUs `vllm serve`).")
    vllm_args: str = Field("--enforce-eager", description="More arguments for the server (e.g. --gpu-memory-utilization 0.3).")
    max_model_len: int | None = Field(None, ge=16, description="The server's context (prompt + new tokens at most); None = "
                                      "the stage's new tokens + 2048 for the prompt, at most the model's own context.")
    startup_timeout: float = Field(300.0, gt=0, description="Seconds to wait for the server's /health.")
    request_timeout: float = Field(600.0, gt=0, description="Seconds per generation request.")
    concurrency: int = Field(8, ge=1, description="Requests (one per prompt) in flight at once at most.")
    max_batched_tokens: int = Field(16384, ge=256, description="The server's tokens per engine step; prompts in flight are "
                                    "kept under half of it (vLLM's CPU engine fails on seeded prefills it splits).")
    sync_atol: float = Field(1e-3, gt=0, description="After each weight sync the server's log-probs of a fixed sample must "
                             "match the trainer's within this (fp32 on CPU: ~1e-6; bf16 on GPU needs ~5e-2).")


class EvalConfig(_Section):
    benchmarks: list[str] = Field(["synthetic"], description="Tasks to evaluate on, by name (thinkforge/tasks: synthetic, "
                                  "gsm8k, math500, aime24, gpqa_diamond, local, reasoning_gym:<task>, a tasks.mixes name).")
    samples: int = Field(1, ge=1, description="Samples per problem; pass@1 is averaged over them.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N problems.")
    data_path: str | None = Field(None, description="Local JSONL/Parquet file or folder to read instead of the hub.")
    columns: dict[str, str] = Field({}, description="Column mapping for local files: question=..., answer=..., id=...")


class TasksConfig(_Section):
    """Where tasks are configured: each task's own options, and weighted mixes usable as one task's name."""

    options: dict[str, dict[str, Any]] = Field({}, description="Task name -> its options: a reasoning-gym task's config "
                                               "(e.g. reasoning_gym:chain_sum: {min_terms: 2, level: 2}; level: the "
                                               "curriculum level it is evaluated at); local: {kind: math|gsm8k|mcq}.")
    mixes: dict[str, dict[str, float]] = Field({}, description="Mix name -> {task name: weight}: problems drawn in "
                                               "shares by weight, each checked by its own task (reasoning-gym's composite, "
                                               "for any tasks).")
    n_test: int = Field(200, ge=1, description="Evaluation problems drawn from a procedural task other than synthetic "
                        "(synthetic.n_test for that one).")


class SyntheticConfig(_Section):
    difficulty: int = Field(2, ge=1, le=4, description="1-4: operations per problem and size of the numbers (test problems "
                            "are distinct arithmetic: difficulty 1 has only 28, so tests use 2 and up).")
    n_test: int = Field(200, ge=1, description="Held-out test problems generated (disjoint by construction).")


class OptimConfig(_Section):
    """AdamW and its learning-rate schedule (`loop.lr_at`): linear warmup to lr, then cosine down to a floor.
    A stage's own defaults (its `optim` field) stay in force for every key a recipe does not set."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps with linear warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a share of the peak; 1.0 = constant lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices (not on biases and norms).")
    clip: float = Field(1.0, gt=0, description="Gradient norm clipping.")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0 = only at the end).")
    keep: int = Field(2, ge=1, description="Newest checkpoints kept.")


class _Stage(_Section):
    """A training stage's section: its nested `optim` and `checkpoints` start from the stage's own defaults, and
    the keys a recipe (or an assignment) gives are laid over them (pydantic alone would reset every key left
    out to OptimConfig's class default: sft.optim.lr=1e-4 would silently drop SFT's 10% warmup)."""

    head_chunk: int | None = Field(None, ge=1, description="Tokens the output layer runs on at a time in this stage's "
                                   "passes (training, reference, old log-probs): never the whole (T, V) logits. None = as "
                                   "many as 2^26 fp32 logits hold (256 MB; 335 tokens at a 200,064 vocabulary).")

    @field_validator("optim", "checkpoints", mode="before", check_fields=False)
    @classmethod
    def _given_keys_over_the_stage_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        """Runs on construction and on assignment; an instance contributes only the keys it was given."""
        if isinstance(value, BaseModel):
            value = value.model_dump(include=value.model_fields_set)
        if isinstance(value, dict):
            return {**cls.model_fields[info.field_name].default.model_dump(), **value}
        return value


class SFTConfig(_Stage):
    """Stage 2 (SPEC 2): next-token loss on a harder subset, no packing so the model learns to stop."""

    data: str | None = Field(None, description="JSONL of accepted rollouts: `question` and `completion` columns.")
    packing: bool = Field(False, description="Pack several documents per row (no attention across them).")
    max_len: int = Field(20480, ge=8, description="Tokens per row (packed) or per document at most.")
    epochs: int = Field(5, ge=1, description="Passes over the data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None = all epochs).")
    optim: OptimConfig = Field(OptimConfig(lr=1e-5, warmup_ratio=0.1), description="AdamW and its schedule (recipe: "
                               "lr 1e-5, 10% warmup, cosine to 0).")
    batch_size: int = Field(4, ge=1, description="Rows per micro-batch.")
    grad_accum: int = Field(32, ge=1, description="Micro-batches per optimizer step (recipe batch 128 = 4 x 32).")
    checkpoints: CheckpointConfig = Field(CheckpointConfig(), description="When checkpoints are written and how many are kept.")
    mixed_precision: Precision = Field("auto", description=PRECISION)


class MidtrainConfig(SFTConfig):
    """Stage 1 (SPEC 2): distillation mid-training on verified chain-of-thought, with sequence packing."""

    packing: bool = Field(True, description="Pack several documents per row (no attention across them).")
    max_len: int = Field(16384, ge=8, description="Tokens per packed row (recipe: 16K).")


class DPOConfig(_Stage):
    """Stage 3 (SPEC 2): DPO on correct (chosen) vs incorrect (rejected) rollouts, stage-2 model as reference."""

    data: str | None = Field(None, description="JSONL of pairs: question, chosen, rejected (see `thinkforge data pairs`).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO (Rafailov et al.); ipo = IPO (Azar et al.).")
    beta: float = Field(0.1, gt=0, description="Strength of the reference tie. Not published for Phi-4-mini-reasoning; 0.1 is DPO's usual value.")
    max_len: int = Field(16384, ge=8, description="Tokens per prompt + completion at most (recipe: 16K).")
    epochs: int = Field(1, ge=1, description="Passes over the pairs (recipe: 1).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    optim: OptimConfig = Field(OptimConfig(lr=5e-7, warmup_ratio=0.1), description="AdamW and its schedule (recipe: "
                               "lr 5e-7; warmup not published, 10%).")
    batch_size: int = Field(4, ge=1, description="Pairs per micro-batch.")
    grad_accum: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    checkpoints: CheckpointConfig = Field(CheckpointConfig(), description="When checkpoints are written and how many are kept.")
    mixed_precision: Precision = Field("auto", description=PRECISION)


class PairsConfig(_Section):
    """Building DPO pairs from graded rollouts."""

    per_problem: int = Field(1, ge=1, description="Pairs per problem at most (each rollout used once).")
    similar_length: bool = Field(True, description="Prefer pairs of similar length, so DPO learns correctness, not length.")
    policy_samples: int = Field(4, ge=1, description="With --model: samples per problem from that checkpoint.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy's own rollouts (1.0 = its full "
                               "distribution: more problems with both a correct and a wrong rollout).")


class RLConfig(_Stage):
    """Stage 4 (SPEC 2-4): RL with verifiable reward, GRPO or PPO, with the Phi-4 stability recipe.

    Values not published for Phi-4-mini-reasoning say where they come from: DeepSeekMath GRPO (KL 0.04,
    lr 1e-6), DAPO (clip 0.2/0.28, token aggregation, dynamic sampling), Dr. GRPO (no std, constant).
    """

    algo: Literal["grpo", "ppo"] = Field("grpo", description="grpo (group-relative, no critic) or ppo (value head + GAE).")
    source: str = Field("synthetic", description="The task of the prompts, by name (its training split; a hub benchmark "
                        "other than gsm8k needs data_path): synthetic, reasoning_gym:<task>, a tasks.mixes name, local, ...")
    data_path: str | None = Field(None, description="Local JSONL/Parquet of prompts with references.")
    columns: dict[str, str] = Field({}, description="Column mapping for source=local.")
    n_problems: int = Field(2000, ge=1, description="Prompt pool size (Infused Phi-2: 2,000 GSM8K problems).")
    difficulties: list[int] | None = Field(None, min_length=1, description="The task's difficulty levels in the prompt "
                                           "pool, equal shares (synthetic 1-4, a reasoning-gym task's curriculum levels "
                                           "from 1). Unset: the task's own (synthetic 1 and 2; a reasoning-gym task its "
                                           "configuration, the one it is evaluated at). A task without levels refuses them.")
    curriculum: bool = Field(False, description="Move the difficulty level with the rolling pass rate: start at the lowest "
                             "of rl.difficulties, draw prompts from the current level only, go up when the pass rate over "
                             "the last curriculum_window groups crosses curriculum_up, down below curriculum_down.")
    curriculum_window: int = Field(16, ge=1, description="Groups of the current level whose pass rate moves the curriculum.")
    curriculum_up: float = Field(0.7, gt=0, lt=1, description="Pass rate above which the curriculum moves one level up.")
    curriculum_down: float = Field(0.1, ge=0, lt=1, description="Pass rate below which it moves one level down.")
    fresh_prompts: bool = Field(True, description="Synthetic prompts from their own draw, not the distillation's problems "
                                "(whose answers stages 1-2 memorized: no reward variance, nothing to learn).")
    steps: int = Field(200, ge=1, description="Optimizer steps (one rollout batch each).")
    time_budget: float | None = Field(None, gt=0, description="Minutes of wall time from the first step (loading and the "
                                      "preflight not counted): no step starts past them; the stage then finishes, its "
                                      "final model the policy of the last step (a resumed run counts the minutes its "
                                      "logged steps took). The learning-rate schedule still spans rl.steps. None: "
                                      "rl.steps alone.")
    prompts_per_step: int = Field(8, ge=1, description="B: prompts (groups) per step after filtering.")
    group_size: int = Field(8, ge=2, description="G: samples per prompt (Infused Phi-2: 3; DAPO: 16; DeepSeekMath: 64).")
    mu: int = Field(1, ge=1, description="Policy updates per rollout batch; 1 = on-policy (old log-probs need no extra pass).")
    micro_batch: int = Field(16, ge=1, description="Sequences per forward/backward.")
    optim: OptimConfig = Field(OptimConfig(lr=5e-7, min_lr_ratio=1.0), description="AdamW and its schedule (Phi-4-mini-"
                               "reasoning RLVR: lr 5e-7, constant; Infused Phi-2: 1e-5, 3% warmup, cosine).")
    beta: float = Field(0.04, ge=0, description="KL coefficient, k3 estimator (DeepSeekMath: 0.04; DAPO: 0). 0 = no reference pass.")
    clip_low: float = Field(0.2, ge=0, lt=1, description="Ratio clip below 1 (PPO/GRPO: 0.2).")
    clip_high: float = Field(0.28, ge=0, description="Ratio clip above 1 (DAPO clip-higher: 0.28).")
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="GRPO family's advantage estimator (losses.ADVANTAGES): grpo = (r - group mean) / group std; "
        "dr_grpo = r - group mean (Dr. GRPO, Infused Phi-2); rloo = leave-one-out mean; reinforce_pp = REINFORCE++-baseline.")
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = Field(
        "ppo_clip", description="Per-token objective (losses.POLICY_LOSSES): ppo_clip (GRPO/DAPO/PPO), gspo (sequence-level "
        "ratio; the paper clips at 3e-4/4e-4), cispo (clipped, detached importance weight times log-prob).")
    loss_agg: Literal["sequence", "token", "constant"] = Field(
        default_factory=lambda given: OWN_AGGREGATION[given.get("policy_loss", "ppo_clip")],
        description="sequence = GRPO, token = DAPO, constant = Dr. GRPO (G x max new tokens). Unset = the policy "
        "loss's own (OWN_AGGREGATION): token for ppo_clip and cispo, sequence for gspo (which allows no other).")
    reward: Literal["verifiable", "weighted"] = Field(
        "verifiable", description="verifiable = +1/-1 (Phi-4 recipe); weighted = rewards.weights (Infused Phi-2).")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups with zero reward variance and sample more prompts.")
    max_refills: int = Field(3, ge=0, description="Extra sampling rounds per step to refill dropped groups.")
    oversample: float = Field(1.0, ge=1.0, description="Prompts sampled per step as a multiple of prompts_per_step (re-balancing).")
    drop_easy: bool = Field(False, description="Easy-prompt filtering: drop groups whose samples are all correct.")
    drop_all_wrong: bool = Field(False, description="Also drop groups whose samples are all wrong.")
    balance: bool = Field(False, description="Reward re-balancing: keep every positive-advantage sample and as many negative ones.")
    uniform_length: float | None = Field(None, gt=0, description="Keep prompts whose response lengths vary at most this much (coefficient of variation).")
    truncation: Literal["mask", "penalize", "none"] = Field(
        "penalize", description="Responses cut at max_new_tokens: mask (no loss), penalize (at most the reward of "
        "an empty response: -1 verifiable, 0 with the card's weighted rewards), none.")
    overlong_cache: int = Field(0, ge=0, description="DAPO overlong shaping: penalty ramps to -1 over the last N tokens (0 = off).")
    max_new_tokens: int = Field(384, ge=1, description="Tokens per response (Infused Phi-2: 384).")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature after annealing (Phi-4 recipe: 0.6).")
    temperature_start: float | None = Field(1.0, gt=0, description="Annealing start (Phi-4 recipe: 1.0); None = no annealing.")
    anneal_steps: int = Field(0, ge=0, description="Steps of linear annealing start -> temperature (recipe: first half of training).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus mass for rollouts (1.0 keeps log-probs exact).")
    gen_batch: int = Field(64, ge=1, description="Sequences generated together; halved on out-of-memory.")
    tis_cap: float | None = Field(None, gt=0, description="Truncated importance sampling against the rollout server's "
                                  "log-probs: each token's advantage times min(exp(train - server log-prob), cap); None = off.")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO GAE lambda.")
    value_clip: float = Field(0.2, gt=0, description="PPO value clipping.")
    vf_coef: float = Field(0.5, ge=0, description="PPO value-loss weight.")
    value_lr_scale: float = Field(10.0, gt=0, description="PPO: the value head's lr as a multiple of lr (it starts at zero and "
                                  "must fit the returns within the run; at 1x it did not in 18 steps, dev/LOG.md).")
    value_trunk: bool = Field(False, description="PPO: the value loss also trains the shared model (true), or only the "
                              "value head on detached features (false: like a separate critic, it never pulls the "
                              "policy's weights, and the head's gradient is clipped on its own).")
    checkpoints: CheckpointConfig = Field(CheckpointConfig(every=50), description="When checkpoints are written (Infused "
                                          "Phi-2: every 50 steps) and how many are kept.")
    aha_window: int = Field(10, ge=2, description="Steps of history for aha-moment detection.")
    entropy_every: int = Field(1, ge=1, description="Log the policy's entropy (over a step's first micro-batch: one more "
                               "pass of the output layer, ~10-20% of that micro-batch) every this many steps, from step 1; "
                               "the other steps' rows have no `entropy`.")
    aha_rise: float = Field(0.3, ge=0, description="Relative rise over the window mean that flags an aha moment.")
    preflight: bool = Field(True, description="Before the first step, sample rl.preflight_groups groups from the starting "
                            "policy and stop with what to do when RL could not learn from it (no group with reward variance, "
                            "most samples truncated, the format rewarded but never used); the report is in metrics.jsonl.")
    preflight_groups: int = Field(8, ge=1, description="Groups (of rl.group_size samples) the preflight samples.")
    truncation_warn: float = Field(0.5, ge=0, le=1, description="Warn when this share of responses is truncated (PITFALLS 2).")
    mixed_precision: Precision = Field("auto", description=PRECISION)

    @model_validator(mode="after")
    def _no_setting_the_algorithm_ignores(self) -> RLConfig:
        """PPO aggregates per token with its own advantages; GRPO has no critic. A setting the chosen algorithm
        would silently ignore is an error (only values that differ from what it does)."""
        ignored = PPO_IGNORES if self.algo == "ppo" else GRPO_IGNORES
        for key, does in ignored.items():
            if getattr(self, key) != does:
                other = "GRPO" if self.algo == "ppo" else "PPO"
                raise ValueError(f"rl.{key}={getattr(self, key)!r} is a {other} setting that rl.algo={self.algo} ignores; "
                                 f"remove it or set rl.algo={other.lower()}")
        return self

    @model_validator(mode="after")
    def _gspo_averages_over_sequences(self) -> RLConfig:
        """GSPO's objective is a mean over sequences (losses.gspo); token or constant aggregation would weight each
        sequence by its length: another objective than the paper's."""
        if self.policy_loss == "gspo" and self.loss_agg != "sequence":
            raise ValueError(f"rl.loss_agg={self.loss_agg!r} weights each rl.policy_loss=gspo sequence by its length; GSPO "
                             f"(Zheng et al. 2025) averages over sequences: remove rl.loss_agg or set it to sequence")
        return self


# Each policy loss's aggregation in its paper, rl.loss_agg's default: DAPO's token mean for ppo_clip (GRPO's
# sequence mean is a setting away), MiniMax-M1's token mean for CISPO, GSPO's mean over sequences.
OWN_AGGREGATION = {"ppo_clip": "token", "gspo": "sequence", "cispo": "token"}

# What each algorithm does where the other has a knob (RLConfig's check above); policy_loss first, as the
# aggregation follows it.
PPO_IGNORES = {"policy_loss": "ppo_clip", "loss_agg": "token", "advantage": "grpo", "balance": False}
GRPO_IGNORES = {name: RLConfig.model_fields[name].default for name in
                ("gamma", "lam", "value_clip", "vf_coef", "value_lr_scale", "value_trunk")}


class DistillConfig(_Section):
    """Stage-1 data: N teacher rollouts per problem, graded (SPEC 2: about 8 per problem)."""

    teacher: Literal["synthetic", "solution", "hf", "openai"] = Field("synthetic", description="Who writes the chains of "
                                                                      "thought: synthetic (the synthetic task's, with slips), "
                                                                      "solution (the task's worked solutions), hf or openai.")
    teacher_model: str | None = Field(None, description="hf: model folder or hub id; openai: the served model name.")
    base_url: str | None = Field(None, description="openai: endpoint base, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key.")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight at most.")
    max_retries: int = Field(5, ge=0, description="openai: retries on errors and rate limits (exponential backoff).")
    timeout: float = Field(600.0, gt=0, description="openai: seconds per request.")
    source: str = Field("synthetic", description="The task of the problems, by name: synthetic, reasoning_gym:<task>, a "
                        "tasks.mixes name, local, gsm8k, ... (hub sets other than gsm8k need data_path).")
    data_path: str | None = Field(None, description="Local JSONL/Parquet of problems (for source=local or a local hub copy).")
    columns: dict[str, str] = Field({}, description="Column mapping for source=local.")
    n_problems: int = Field(2000, ge=1, description="Problems to distill (synthetic: generated).")
    difficulties: list[int] | None = Field(None, min_length=1, description="The task's difficulty levels, equal shares. "
                                           "Unset: the task's own (as rl.difficulties). A task without levels refuses them.")
    samples: int = Field(8, ge=1, description="Rollouts per problem.")
    slip_rate: float = Field(0.3, ge=0, le=1, description="Synthetic teacher: share of rollouts with a mistake.")
    max_new_tokens: int = Field(32768, ge=1, description="Teacher tokens per rollout at most.")
    temperature: float = Field(0.6, ge=0, description="Teacher sampling temperature (R1 protocol: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Teacher nucleus mass (R1 protocol: 0.95).")
    teacher_system_prompt: str | None = Field(None, description="hf / openai: the system text the teacher is asked "
                                              "with; unset: model.system_prompt (the student's).")
    rewrite: Literal["none", "think_answer"] = Field("none", description="think_answer: each rollout is written as "
                                                     "<think>its text</think><answer>its extracted answer</answer>, for a "
                                                     "student that answers in tags taught by a teacher that does not (a "
                                                     "cold start on the model's own verified samples).")


class SelectConfig(_Section):
    """Rejection sampling and the stage-2 harder subset."""

    max_pass_rate: float = Field(1.0, ge=0, le=1, description="Hard subset: problems the teacher solved at most this often.")
    min_difficulty: int | None = Field(None, description="Hard subset: problems at this difficulty level or above.")
    min_words: int = Field(0, ge=0, description="Hard subset: rollouts at least this long.")


class RewardsConfig(_Section):
    weights: dict[str, float] = Field(
        {"correctness": 1.0, "reasoning": 0.7, "format": 0.3},
        description="Reward name -> weight; names from rewards.REWARDS or `module:function` import paths.",
    )


class InitConfig(_Section):
    """Make the starting model with `init-model` when model.name_or_path does not exist yet (the tiny recipe)."""

    # arch.ARCHS' keys, written out for pydantic and type checkers (tests/test_layout.py checks they agree)
    arch: Literal["phi", "phi3", "llama", "mistral", "qwen2", "qwen3"] = Field(
        "phi3", description="Architecture to initialise at random (a row of arch.ARCHS).")
    hidden: int = Field(64, ge=8, description="Hidden size (a multiple of heads).")
    layers: int = Field(2, ge=1, description="Transformer layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> InitConfig:
        if self.hidden % self.heads:
            raise ValueError(f"init.hidden={self.hidden} is not divisible by init.heads={self.heads}")
        return self


class PipelineConfig(_Section):
    """`thinkforge run`: which stages, in order, each feeding the next."""

    stages: list[Literal["distill", "midtrain", "sft", "dpo", "rl"]] = Field(
        ["distill", "midtrain", "sft", "dpo", "rl"], description="Stages to run, in recipe order.")
    policy_problems: int = Field(500, ge=1, description="DPO pairs: problems on which the SFT model samples its own rollouts.")
    policy_fresh: bool = Field(True, description="Synthetic task: the SFT model samples on its own draw of training problems, "
                               "not on the distilled ones it memorized. Other sources: the first distilled problems.")
    policy_difficulties: list[int] | None = Field(None, description="Synthetic difficulty levels of those problems (default: distill's).")
    pair_sources: list[Literal["policy", "teacher"]] = Field(
        ["policy", "teacher"], min_length=1, description="Rollouts DPO pairs are built from: the SFT model's own and/or the teacher's.")
    eval_after_each: bool = Field(True, description="Evaluate on eval.benchmarks after every stage (the stage table).")


class Recipe(_Section):
    seed: int = Field(0, description="Seed for data order, sampling and init.")
    collective_timeout: float = Field(1800.0, gt=0, description="Seconds a rank of several waits in one collective "
                                      "(all-reduce, all-gather, barrier) before it stops with an error: a rank that "
                                      "hangs or died without a word cannot hang the others. Longer than any legitimate "
                                      "wait (rank 0 alone saving or pushing a large model).")
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    generation: GenerationConfig = GenerationConfig()
    eval: EvalConfig = EvalConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    tasks: TasksConfig = TasksConfig()
    rewards: RewardsConfig = RewardsConfig()
    rollout: RolloutConfig = RolloutConfig()
    distill: DistillConfig = DistillConfig()
    select: SelectConfig = SelectConfig()
    midtrain: MidtrainConfig = MidtrainConfig()
    sft: SFTConfig = SFTConfig()
    pairs: PairsConfig = PairsConfig()
    dpo: DPOConfig = DPOConfig()
    rl: RLConfig = RLConfig()
    init: InitConfig | None = None
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _curriculum_thresholds_in_order(self) -> Recipe:
        if self.rl.curriculum and self.rl.curriculum_down >= self.rl.curriculum_up:
            raise ValueError(f"rl.curriculum_down={self.rl.curriculum_down} must be below rl.curriculum_up="
                             f"{self.rl.curriculum_up} (else the level moves both ways at once)")
        return self

    @model_validator(mode="after")
    def _four_bit_weights_live_in_this_process(self) -> Recipe:
        """4-bit loading is transformers' (bitsandbytes): a vLLM or OpenAI-compatible server loads its own weights,
        and a vLLM sampler of the unquantized base would not be the NF4 policy the trainer updates (its proofs fail)."""
        if self.model.load_in_4bit and self.rollout.backend != "hf":
            raise ValueError(f"model.load_in_4bit loads the base in this process (transformers + bitsandbytes); "
                             f"rollout.backend={self.rollout.backend} samples from a server's own weights, so the "
                             f"policy it samples would not be the 4-bit one that trains: set rollout.backend=hf, "
                             f"or model.load_in_4bit=false")
        return self

    @model_validator(mode="after")
    def _compile_makes_a_graph(self) -> Recipe:
        """torch.compile makes no graph of transformers' checkpointed layers (torch 2.13): on would do nothing."""
        if self.model.compile == "on" and self.model.gradient_checkpointing:
            raise ValueError("model.compile=on with model.gradient_checkpointing=true: torch.compile makes no graph of "
                             "transformers' checkpointed layers, so nothing would be compiled; set one of them off")
        return self

    @model_validator(mode="after")
    def _every_task_setting_names_a_task_in_use(self) -> Recipe:
        """tasks.options and tasks.mixes act only through a name the recipe uses (rl.source, distill.source,
        eval.benchmarks, a used mix's parts): one for a name nothing uses is an error, not a silent no-op."""
        used = {self.rl.source, self.distill.source, *self.eval.benchmarks}
        used |= {part for name in used & set(self.tasks.mixes) for part in self.tasks.mixes[name]}
        for key, what in [*[(k, "options") for k in self.tasks.options], *[(k, "mixes") for k in self.tasks.mixes]]:
            if key not in used and not (key == "synthetic" and what == "options"):
                raise ValueError(f"tasks.{what}[{key!r}] does nothing: no stage or evaluation names task {key!r} "
                                 f"(rl.source, distill.source, eval.benchmarks or a mix of them)")
        return self

    @model_validator(mode="after")
    def _no_setting_is_silently_ignored(self) -> Recipe:
        """A value set where the chosen backend, algorithm or switch never reads it is an error (PITFALLS 19): only
        values that differ from the default are checked, so a recipe that leaves them alone is fine."""
        for section, key, reader, used in IGNORED_UNLESS:
            value, default = getattr(getattr(self, section), key), type(getattr(self, section)).model_fields[key].default
            if value != default and not used(self) and (section, key, value) not in LEGACY_DEFAULTS:  # (a list: values may be dicts)
                raise ValueError(f"{section}.{key}={value!r} does nothing here: only {reader} reads it; remove it or set that")
        return self


# Defaults of earlier releases, written into the config.yaml of every run they made: not a user's setting.
LEGACY_DEFAULTS = [("rollout", "max_model_len", 4096)]

# (section, key, what reads it, when it is read): settings that another setting switches off.
_VLLM = "rollout.backend=vllm"
IGNORED_UNLESS = [
    ("rl", "data_path", "rl.source other than synthetic", lambda r: r.rl.source != "synthetic"),
    ("rl", "tis_cap", "rollout.backend=vllm (the hf backend returns no sampler log-probs)", lambda r: r.rollout.backend == "vllm"),
    *[("rollout", k, _VLLM, lambda r: r.rollout.backend == "vllm") for k in (
        "vllm_command", "vllm_args", "max_model_len", "startup_timeout", "max_batched_tokens", "sync_atol")],
    *[("rollout", k, "rollout.backend=vllm or openai", lambda r: r.rollout.backend != "hf") for k in (
        "base_url", "request_timeout", "concurrency")],
    ("rollout", "api_key_env", "rollout.backend=openai", lambda r: r.rollout.backend == "openai"),
    ("rewards", "weights", "rl.reward=weighted", lambda r: r.rl.reward == "weighted"),
    *[("rl", k, "rl.curriculum=true", lambda r: r.rl.curriculum) for k in (
        "curriculum_window", "curriculum_up", "curriculum_down")],
    *[("distill", k, "distill.teacher=hf or openai", lambda r: r.distill.teacher in ("hf", "openai")) for k in (
        "teacher_system_prompt", "rewrite")],
    ("rl", "temperature_start", "rl.anneal_steps > 0", lambda r: r.rl.anneal_steps > 0 or r.rl.temperature_start is None),
]


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` entries (values parsed as YAML scalars/lists) in a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value; write e.g. generation.temperature=0.8")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise UserError(f"override {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return data


def _section_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for name in loc:
        field = schema.model_fields.get(str(name))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        schema = ann
    return schema


RENAMED = {"rl.scale_advantages": "rl.advantage (grpo = divided by the group std, dr_grpo = not)",
           "synthetic.n_train": "distill.n_problems and rl.n_problems (the synthetic training problems each stage "
                                "draws; synthetic.n_train was read by nothing)"}
# Removed keys at the value every earlier run's config.yaml holds (the dump writes every key): dropped on
# reading, as no user's setting; any other value is one, and RENAMED names what does that job now.
REMOVED_DEFAULTS = {("synthetic", "n_train"): 2000}
# Keys every training stage had at its top level before the shared optimizer/checkpoint schemas (2026-11-29):
# the config.yaml of every earlier run holds them, so they are read as their new names, with a warning.
MOVED = {**{k: ("optim", k) for k in ("lr", "warmup_ratio", "min_lr_ratio", "weight_decay", "clip")},
         "save_every": ("checkpoints", "every"), "keep_checkpoints": ("checkpoints", "keep")}


def _move_flat_stage_keys(data: dict, schema: type[BaseModel], source: str) -> dict:
    """A stage section's pre-2026-11-29 flat keys (sft.lr) moved under its nested schemas (sft.optim.lr)."""
    import warnings

    data = dict(data)
    for name, field in schema.model_fields.items():
        section = data.get(name)
        if not (isinstance(section, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, _Stage)):
            continue
        section = dict(section)
        for old, (group, new) in MOVED.items():
            if old not in section:
                continue
            nested = dict(section.get(group) or {}) if isinstance(section.get(group, {}), dict) else None
            if nested is None or new in nested:
                raise UserError(f"{source}: config keys '{name}.{old}' and '{name}.{group}.{new}' are both set; keep the second")
            nested[new] = section.pop(old)
            section[group] = nested
            warnings.warn(f"{source}: config key '{name}.{old}' is now '{name}.{group}.{new}' (read as such)", FutureWarning,
                          stacklevel=1)
        data[name] = section
    return data


def _explain(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    e = err.errors()[0]
    loc = tuple(str(x) for x in e["loc"])
    key = ".".join(loc)
    if e["type"] == "value_error":  # a check across keys: its message names them
        return f"{source}: {e['msg'].removeprefix('Value error, ')}"
    if e["type"] == "extra_forbidden" and key in RENAMED:
        return f"{source}: config key {key!r} was replaced by {RENAMED[key]}"
    if e["type"] == "extra_forbidden":
        parent = _section_at(schema, loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + (close[0],))!r}?" if close else f"known keys: {', '.join(known)}"
        return f"{source}: unknown config key {key!r}; {hint}"
    return f"{source}: config key {key!r}: {e['msg']} (got {e.get('input')!r})"


def _drop_removed_defaults(data: dict) -> dict:
    data = dict(data)
    for (section, key), old in REMOVED_DEFAULTS.items():
        if isinstance(data.get(section), dict) and key in data[section] and data[section][key] == old:
            data[section] = {k: v for k, v in data[section].items() if k != key}
    return data


def validate(data: dict, schema: type[BaseModel] = Recipe, source: str = "config") -> BaseModel:
    try:
        return schema.model_validate(_move_flat_stage_keys(_drop_removed_defaults(data), schema, source))
    except ValidationError as err:
        raise UserError(_explain(err, schema, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema: type[BaseModel] = Recipe):
    """YAML recipe (optional) + dotted overrides -> validated schema instance."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe {path} not found; pass an existing YAML file (see recipes/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a recipe is a YAML mapping of sections, got {type(data).__name__}")
        source = str(path)
    data = apply_overrides(data, list(overrides))
    return validate(data, schema, source)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
