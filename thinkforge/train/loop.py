"""Mechanics every training stage shares: optimizer, schedule, data order, checkpoints, resume, metrics.

Stages call these functions; they do not inherit from them. Resume is exact: a checkpoint holds the model
(a standard HF or PEFT folder), the optimizer state (safetensors + JSON, no pickle), the RNG states and the
step; the learning rate and the data order are pure functions of (seed, step), so a resumed run replays
nothing and skips nothing (PITFALLS 7).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.errors import UserError
from thinkforge.io import respect_umask, write_json
from thinkforge.train.attention import use_document_attention
from thinkforge.train.dist import Dist

CHECKPOINT_PREFIX = "step-"


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to min_ratio * peak at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer, lr: float) -> None:
    """Every group at lr, times its `lr_scale` where it has one (the PPO value head)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def apply_update(params, optimizer, clip: float, lr: float) -> float:
    """Clip the gradient norm, set the learning rate, step, zero the gradients; returns the norm before clipping."""
    grad_norm = clip_gradients(list(params), clip)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def clip_gradients(params: list, clip: float) -> float:
    """Clip the gradients' joint norm to `clip`; returns the norm before. Sharded (FSDP2: DTensor) and plain
    gradients together (PPO's value head beside a sharded policy) are clipped as one vector, as on one process."""
    from torch.distributed.tensor import DTensor

    def full(norm) -> float:
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # a sharded norm is a DTensor

    grads = [p.grad for p in params if p.grad is not None]
    kinds = [[g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]]
    if not all(kinds):
        return full(torch.nn.utils.clip_grad_norm_(params, clip))
    total = sum(full(torch.nn.utils.get_total_norm(k)) ** 2 for k in kinds) ** 0.5
    scale = clip / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of n items used in `epoch`: a pure function, so resume needs no saved sampler."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n_rows: int, per_step: int, seed: int, step: int) -> list[int]:
    """Rows of optimizer step `step`: consecutive slices of each epoch's permutation (the last may be short)."""
    steps_per_epoch = math.ceil(n_rows / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    return epoch_order(n_rows, seed, epoch)[k * per_step : (k + 1) * per_step]


def total_steps(n_rows: int, per_step: int, epochs: int, max_steps: int | None = None) -> int:
    steps = epochs * math.ceil(n_rows / per_step)
    return min(steps, max_steps) if max_steps else steps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matrix products natively: CUDA from compute capability 8 (Ampere; assumed
    where this host has no CUDA, as `thinkforge plan` for a GPU run); an x86 CPU with AMX or AVX512-BF16; an Arm
    CPU whose Linux feature list names bf16. Other CPUs convert every bf16 operand: a bf16 product ran 8x slower
    than fp32 on an AVX2 EPYC (19 vs 160 GFLOP/s). MPS: no (fp32), not measured."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return False
    if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        return True
    return platform.machine() in ("aarch64", "arm64") and "bf16" in _cpu_features()


@functools.cache
def _cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith(("flags", "Features"))
                     for flag in line.split(":", 1)[1].split())


_SAID_BF16: set[str] = set()  # devices told that explicit bf16 runs slow there


def uses_bf16(device: str, mixed_precision: str) -> bool:
    """Whether a stage with this `mixed_precision` computes under bf16 autocast on `device` (config.PRECISION);
    explicit bf16 on a CPU without native bf16 is kept, and said once a process."""
    if mixed_precision == "bf16" and device.startswith("cpu") and not native_bf16(device) and device not in _SAID_BF16:
        _SAID_BF16.add(device)
        warnings.warn("mixed_precision=bf16 on a CPU without native bf16 (no AMX, no AVX512-BF16): its matrix products "
                      "run several times slower than fp32 here; <stage>.mixed_precision=bf16_if_native computes fp32 "
                      "on such a CPU and bf16 where it pays", stacklevel=2)
    return (mixed_precision == "bf16" or (mixed_precision == "auto" and device.startswith("cuda"))
            or (mixed_precision == "bf16_if_native" and native_bf16(device)))


def autocast(device: str, mixed_precision: str):
    """bf16 autocast where `mixed_precision` asks for it on `device` (`uses_bf16`; fp32 master weights)."""
    if uses_bf16(device, mixed_precision):
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def compute_dtype(device: str, mixed_precision: str, model) -> str:
    """The dtype the loss pass computes in (bf16 under autocast, else the weights'): what a rollout server
    should run in, rather than the fp32 of master weights."""
    if uses_bf16(device, mixed_precision):
        return "bfloat16"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


# ---------------------------------------------------------------- model


def start_model(recipe, run_dir: str | Path) -> str:
    """The folder a stage starts from and refers to (KL and DPO reference): recipe.model, or, when that is a
    LoRA adapter folder (the output of an earlier LoRA stage), that adapter merged into its base, written once
    to run_dir/start-model. A new adapter is then trained on the merged policy: training on the old adapter
    would make "adapter disabled" (the LoRA reference) the original base instead of the previous stage."""
    import torch.distributed as torch_dist

    from thinkforge import models

    source = recipe.model.name_or_path
    if models.adapter_base(source)[0] is None:
        return source
    merged = Path(run_dir) / "start-model"
    first = not torch_dist.is_initialized() or torch_dist.get_rank() == 0
    if first and not (merged / "config.json").is_file():
        models.merge(source, merged)
    if torch_dist.is_initialized():
        torch_dist.barrier()
    return str(merged)


TRAINABLE_DTYPES = {"float32": torch.float32, "pure_bfloat16": torch.bfloat16, "pure_float16": torch.float16}


def weights_dtype(recipe, device: str) -> str:
    """The dtype a stage on `device` loads its weights in. When only an adapter trains: the frozen base's,
    model.dtype (auto = bfloat16 on CUDA, float32 on a CPU), as PEFT and TRL load a LoRA base: frozen weights
    take no optimizer step, so no update is lost below half an ulp (PITFALLS 14), bf16 autocast feeds their
    products bf16 either way (the residual stream, the embedding's output, is then bf16 too, as in vLLM), and
    the base takes half the memory of float32; the adapter trains in
    model.trainable_dtype (`load_for_training`). Else the trained weights' own (model.trainable_dtype), so a
    checkpoint of fp32 master weights resumes exactly and a full reference model computes what the policy
    computes (step-1 KL 0). `thinkforge plan` counts the weights in this dtype."""
    from thinkforge import models

    m = recipe.model
    if recipe.lora.enabled or m.load_in_4bit:
        return str(models.resolve_dtype(m.dtype, device)).removeprefix("torch.")
    return {"float32": "float32", "pure_bfloat16": "bfloat16", "pure_float16": "float16"}[m.trainable_dtype]


def check_trainable(recipe) -> None:
    """One line where the recipe's training stages would have nothing to train (`thinkforge plan` asks too)."""
    if recipe.model.load_in_4bit and not recipe.lora.enabled:
        raise UserError("model.load_in_4bit trains nothing without an adapter (4-bit weights take no optimizer "
                        "step): set lora.enabled=true (QLoRA), or model.load_in_4bit=false")


def load_for_training(recipe, run_dir: str | Path):
    """(model, tokenizer, checkpoint): the newest checkpoint of run_dir if any, else the stage's start model
    (`start_model`), wrapped in a new LoRA adapter when recipe.lora.enabled, its attention without (T, T) masks. Every trainable weight is in
    model.trainable_dtype (fp32 master weights unless a pure low-precision optimizer is asked for by name):
    AdamW updating bf16 weights in place loses every step below half an ulp (PITFALLS 14)."""
    from thinkforge import models

    m = recipe.model
    check_trainable(recipe)
    ckpt = latest_checkpoint(run_dir)
    source = str(ckpt / "model") if ckpt else start_model(recipe, run_dir)
    device = models.resolve_device(m.device)
    model, tok = models.load(source, weights_dtype(recipe, device), device, m.trust_remote_code, m.load_in_4bit,
                             gradient_checkpointing=m.gradient_checkpointing, attn_implementation=m.attn_implementation,
                             trainable_adapter=True)
    if recipe.lora.enabled and not models.is_adapter(model):
        model = models.add_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules)
    want = TRAINABLE_DTYPES[m.trainable_dtype]
    for p in model.parameters():
        if p.requires_grad and p.dtype != want:
            p.data = p.data.to(want)
    use_document_attention(model)  # long packed or padded rows without a (T, T) mask (train/attention.py)
    return model, tok, ckpt


def start_entries(recipe, model, kind: str, planned_tokens: float, mixed_precision: str, run_dir: str | Path, *,
                  resumed: bool) -> dict:
    """The start row's entries of a stage whose passes are of `kind` ("sft", "dpo", "rl"): the precision it computes
    in (`uses_bf16`, decided on this host: a run `resumed` on a host that decides otherwise is told, against the
    last start row) and what model.compile decided, and why, for `planned_tokens` tokens in all
    (train/compiled.py; the whole stage's, so a resumed run decides as the first did)."""
    from thinkforge.train import compiled

    device = str(model.device)
    precision = "bf16" if uses_bf16(device, mixed_precision) else "fp32"
    started = [r for r in metrics_rows(Path(run_dir) / "metrics.jsonl") if r.get("event") == "start"] if resumed else []
    if started and started[-1].get("precision", precision) != precision:
        warnings.warn(f"{run_dir}: started under {started[-1]['precision']}, resumed under {precision} "
                      f"(mixed_precision={mixed_precision} on this host): the loss curve shifts here", stacklevel=2)
    # the compile figures were measured under native bf16: emulated bf16 has none
    measured_as = precision if precision == "fp32" or native_bf16(device) else "emulated bf16"
    return {"precision": precision,
            **compiled.setup(model, recipe.model.compile, device, kind, planned_tokens, measured_as)}


def metrics_rows(path: Path) -> list[dict]:
    """A metrics.jsonl's parsable rows ([] where there is none yet; another rank may be rewriting it, and a cut
    run may have left half a line)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# ---------------------------------------------------------------- checkpoints


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}/{key}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.rsplit("/", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass(frozen=True)
class Checkpoints:
    """When and where a stage checkpoints: every `save_every` steps (0 = only at the end), at the end, and at
    a planned stop (`stop_after`: the run is interrupted as a kill would be, and a rerun continues)."""

    run_dir: Path
    stage: str
    total: int
    save_every: int = 0
    keep: int = 2
    stop_after: int | None = None
    dist: Dist = Dist()  # every rank gathers (sharded models), rank 0 alone writes

    def end_of_step(self, done: int, model, tokenizer, optimizer, extras: dict[str, torch.Tensor] | None = None) -> bool:
        """Checkpoint when due; True means stop now (stop_after reached before the end)."""
        stop = self.stop_after is not None and self.stop_after <= done < self.total
        if (self.save_every and done % self.save_every == 0) or done == self.total or stop:
            self.save(done, (model, tokenizer), optimizer, extras)
        return stop

    def save(self, step: int, model_and_tokenizer, optimizer, extras: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Write run_dir/step-N atomically (temporary folder, then rename); keep the newest `keep`.

        extras: more tensors to keep with the checkpoint (PPO's value head), read back by `load_extras`.
        Every rank calls it (a sharded model's state is gathered); rank 0 writes.
        """
        model, tokenizer = model_and_tokenizer
        full, opt_state = self.dist.full_state(model), self.dist.optimizer_state(model, optimizer)
        if not self.dist.main:
            return None
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
        tmp = self.run_dir / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._write(tmp, step, (model, tokenizer, full), (opt_state, extras))
        except BaseException:  # a full disk or an interrupt leaves no half-written checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        respect_umask(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(self.run_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write(self, tmp: Path, step: int, model_and_state, optimizer_and_extras) -> None:
        """The checkpoint's files into the temporary folder `tmp`."""
        from safetensors.torch import save_file

        from thinkforge import models

        model, tokenizer, full = model_and_state
        opt_state, extras = optimizer_and_extras
        models.save(model, tokenizer, tmp / "model", state_dict=full)
        opt_tensors, opt_meta = _flatten_optimizer(opt_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        if extras:
            save_file({k: v.detach().cpu().contiguous() for k, v in extras.items()}, str(tmp / "extras.safetensors"))
        write_json(tmp / "trainer_state.json", {"step": step, "stage": self.stage, "steps": self.total,
                                                "optimizer": opt_meta, "rng": rng_meta})


def finish(bar, metrics, model=None, tokenizer=None, final: Path | None = None, dist: Dist = Dist()) -> Path | None:
    """Close the progress bar and the metrics; save the final model when given one (a planned stop gives none;
    every rank gathers a sharded model, rank 0 writes)."""
    bar.close()
    metrics.close()
    if final is None:
        return None
    full = dist.full_state(model)
    if dist.main:
        from thinkforge import models

        models.save(model, tokenizer, final, state_dict=full)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_extras(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = checkpoint / "extras.safetensors"
    return load_file(str(path)) if path.is_file() else {}


def restore(checkpoint: Path, optimizer, model, dist: Dist = Dist()) -> dict:
    """Load optimizer and RNG state from a checkpoint (the model was loaded from checkpoint/model)."""
    from safetensors.torch import load_file

    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    state = _unflatten_optimizer(load_file(str(checkpoint / "optimizer.safetensors")), meta["optimizer"])
    dist.load_optimizer_state(model, optimizer, state)
    _set_rng_state(load_file(str(checkpoint / "rng.safetensors")), meta["rng"])
    return meta


# ---------------------------------------------------------------- metrics


class Metrics:
    """Metrics to metrics.jsonl (appended, so a resumed run continues the file) and TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0, write: bool = True):
        self.write = write
        self._file = self._tb = None
        if not write:  # another rank writes
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume_step >= 0:
            # Drop rows past the checkpoint we resume from: they will be produced again.
            kept = [line for line in self.path.read_text().splitlines() if _row_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: readers drop the earlier invocation's points past the checkpoint (one point a step)
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)
            except ImportError:  # tensorboard is a dependency; only a broken install lands here
                self._tb = None
        self.start = time.time()

    def log(self, step: int, values: dict) -> None:
        if not self.write:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.write:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, ValueError, TypeError):
        return 1 << 62  # a torn last line: drop it
