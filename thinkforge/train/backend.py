"""The RL stage's rollout backend, set up rank by rank.

    backend = make_backend(model, tok, batch_size, recipe.rollout, run_dir, dist, max_new_tokens=..., dtype=...)
    backend.sampler.generate(...)    # every rank samples its share (rollout.types.Sampler)
    backend.finish()                 # a sharded in-process policy: this rank joins the others' forwards
    backend.sync.prove() / push()    # a vLLM server (rollout.types.PolicySync); None in-process

rollout.backend=hf samples the training model itself (no sync: its weights are always the current ones); on the
ranks of a sharded (FSDP2) model it decodes in lockstep (`Dist.lockstep`). rollout.backend=vllm: one server serves
every rank; rank 0 starts it (or uses rollout.base_url) and pushes the weights, every rank samples. Rollout gets
the policy as plain functions (`rollout.types.Policy`): what a push writes, whole (a sharded model gathered a
weight at a time by every rank), how an adapter folder is written, the log-probs of a probe (the output head by
chunks); it imports no training code.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from thinkforge import models
from thinkforge.errors import UserError
from thinkforge.rollout.types import Policy, PolicySync, Sampler, pad_id, stop_ids


@dataclass
class Backend:
    """sampler: draws the samples; sync: pushes and proves the policy after each update where the sampler holds
    its own copy of the weights (None: it samples the training model itself); finish: called on each rank of a
    sharded model when its share of a generation phase is done (None elsewhere); sync_dir: the folder of the
    pushes, removed by `close`."""

    sampler: Sampler
    sync: PolicySync | None = None
    finish: Callable[[], None] | None = None
    sync_dir: Path | None = None

    def close(self) -> None:
        """Stop what the sampler started (a server) and drop the pushes (copies of weights the run's checkpoints
        already hold)."""
        self.sampler.close()
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)


def make_backend(model, tokenizer, batch_size: int, cfg, workdir: Path, dist, *, max_new_tokens: int,
                 dtype: str | None = None) -> Backend:
    """The backend of the RL stage's policy `model` for rollout settings `cfg` (see the module docstring); the
    server's log and pushes in workdir; dtype: the server's (default: the trainer's compute dtype)."""
    from thinkforge.rollout.hf import HFGenerator

    if cfg.backend == "hf":
        if not dist.sharded:
            return Backend(HFGenerator(model, tokenizer, batch_size))
        from functools import partial

        from thinkforge.engine.decode import join

        return Backend(HFGenerator(model, tokenizer, batch_size, lockstep=dist.lockstep),
                       finish=partial(join, model, dist.lockstep, pad_id(tokenizer)))
    if cfg.backend == "openai":
        raise UserError("rollout.backend=openai serves a fixed model (no weight updates): RL needs rollout.backend=hf or vllm")
    return _vllm(model, tokenizer, batch_size, cfg, Path(workdir), dist, max_new_tokens=max_new_tokens, dtype=dtype)


def _vllm(model, tokenizer, batch_size, cfg, workdir: Path, dist, *, max_new_tokens, dtype) -> Backend:
    from thinkforge.rollout.vllm import VLLMGenerator, VLLMServer, VLLMSync, write_weights

    policy, stops, sync_dir = policy_of(model, dist), stop_ids(tokenizer, model.generation_config), workdir / "vllm-sync"
    start_dir, here = workdir / "vllm-start", cfg.base_url is not None
    if not dist.main:
        if policy.collective and not policy.lora and not here:
            write_weights(policy.tensors(), start_dir, main=False)  # rank 0 writes the server's starting weights
        sampler = VLLMGenerator(dist.broadcast(None), tokenizer, batch_size, cfg, stop_ids=stops)
        sync = VLLMSync(sampler, policy, sync_dir, atol=cfg.sync_atol)
        if policy.lora or here:
            sync.push()
        dist.barrier()  # rank 0's starting weights are on the server
        return Backend(sampler, sync)
    server = backend = None
    try:  # a failed start leaves no server and no copy of the weights behind
        if not here:
            if policy.lora:  # the server serves the base; the adapter arrives by hot-loading
                peft = model.peft_config["default"]
                start, rank, owned = peft.base_model_name_or_path, peft.r, None
            else:  # the current weights (a resumed run's too), a copy the server owns, a bucket at a time
                start = str(starting_folder(model, tokenizer, start_dir, policy).resolve())
                rank, owned = None, Path(start)
            dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")  # the trainer's compute dtype
            server = VLLMServer(start, cfg, workdir / "vllm.log", lora_rank=rank, dtype=dtype,
                                max_new_tokens=max_new_tokens, owned_dir=owned).start()
        sampler = VLLMGenerator(cfg.base_url or server.url, tokenizer, batch_size, cfg, stop_ids=stops, server=server)
        backend = Backend(sampler, VLLMSync(sampler, policy, sync_dir, atol=cfg.sync_atol, checksums=server is not None,
                                            dtype=server.dtype if server is not None else None), sync_dir=sync_dir)
        sampler.tell_version()  # version 0: the starting weights
        dist.broadcast(sampler.url)  # before the first push: under FSDP2 every rank gathers it with rank 0
        if policy.lora or here:
            backend.sync.push()  # the starting adapter (or weights) onto the server
        dist.barrier()
    except BaseException:
        if backend is not None:
            backend.close()
        elif server is not None:
            server.stop()
        shutil.rmtree(start_dir, ignore_errors=True)
        raise
    return backend


def starting_folder(model, tokenizer, out: Path, policy: Policy, bucket_bytes: int | None = None) -> Path:
    """A loadable folder of the policy's current weights for the server to start on (config, generation
    config, tokenizer around safetensors shards of at most bucket_bytes, default `vllm.BUCKET_BYTES`), written by
    rank 0 while every rank of a sharded model gathers with it."""
    from thinkforge.rollout.vllm import BUCKET_BYTES, write_weights

    write_weights(policy.tensors(), out, main=policy.main, bucket_bytes=bucket_bytes or BUCKET_BYTES)
    if policy.main:
        model.config.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def policy_of(model, dist=None) -> Policy:
    """The policy `model` as the plain functions a policy sync reads (`rollout.types.Policy`)."""
    from functools import partial

    peers = dist if dist is not None and dist.sharded else None
    lora = models.is_adapter(model)

    def tensors():
        if lora:
            yield from adapter_state(model, peers).items()
        else:
            yield from full_weights(model, peers)

    def save_adapter(folder) -> None:  # every rank gathers a sharded adapter with the main one
        state = adapter_state(model, peers) if peers is not None else None
        if peers is None or peers.main:
            models.save(model, None, folder, state_dict=state)

    sharded = {"collective": True, "share": peers.broadcast} if peers is not None else {}
    return Policy(lora=lora, tensors=tensors, save_adapter=save_adapter, logprobs=partial(probe_logprobs, model),
                  sizes={n: p.numel() for n, p in model.named_parameters()},  # no state_dict: FSDP2 reshards
                  main=dist is None or dist.main, **sharded)


def full_weights(model, peers=None):
    """(name, tensor) of every weight of `model`, whole: a sharded (FSDP2) weight gathered from the ranks one
    at a time (a collective: every rank iterates alike), so no rank holds the whole model at once."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if peers is not None and isinstance(t, DTensor) else t)


def adapter_state(model, peers=None) -> dict:
    """The LoRA adapter's weights by PEFT's names, whole (gathered from the ranks under FSDP2)."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_peft_model_state_dict(model)
    if peers is None:
        return state
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in state.items()}


def probe_logprobs(model, seq: list[int]):
    """(T-1,) log-probs at temperature 1 of tokens 1.. of `seq` under `model` (eval mode, no gradient; the output
    layer by chunks, never the (T, V) logits), on the CPU."""
    import torch

    from thinkforge.train.head import final, hidden_states

    ids = torch.tensor([seq], device=model.device)
    with models.eval_mode(model), torch.no_grad():
        with hidden_states(model) as head:
            hidden = final(model(input_ids=ids))[:, :-1]  # (1, T-1, D)
        return head.logprobs(hidden, ids[:, 1:])[0][0].cpu()
