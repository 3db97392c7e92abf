"""Training on N processes: who this rank is, its share of each step, one all-reduce of the loss normaliser.

    accelerate launch --multi_gpu --num_processes N -m thinkforge sft ...     (on CPU too: gloo ranks)

accelerate's launcher starts the ranks and `PartialState` joins them (NCCL on GPUs, gloo on CPU). The model
is wrapped in torch's DistributedDataParallel, which all-reduces (averages) gradients in the last backward of
a step. The data order stays a pure function of (seed, step): every rank computes the step's global batch and
takes its contiguous share of the micro-batches. The step's normaliser is summed over ranks by one
all-reduce and divided by N (DDP averages), so N ranks compute exactly one rank's gradient. A rank with fewer
micro-batches than another runs zero-weight passes, so every rank joins every gradient all-reduce. Rank 0
alone writes checkpoints, metrics and logs; a checkpoint holds full weights and loads at any N.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from thinkforge.errors import UserError
from thinkforge.losses import Normaliser


@dataclass(frozen=True)
class Dist:
    """This process's place among `world` ranks (one process: rank 0 of 1, every method a no-op)."""

    rank: int = 0
    world: int = 1
    strategy: str = "ddp"  # or "fsdp2": parameters, gradients and optimizer state sharded over the ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters sharded over several ranks: every forward is a collective, so every rank runs as many."""
        return self.strategy == "fsdp2" and self.world > 1

    def lockstep(self, going: bool) -> bool:
        """One round of in-step work: whether any rank still has a forward to run (a rank that has none runs
        a stand-in forward while this is true, so the sharded forwards' collectives pair up)."""
        return self.all_max(float(going)) > 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, end) of this rank's (or `rank`'s) contiguous share of n items (the first ranks one more where
        it does not divide)."""
        rank = self.rank if rank is None else rank
        k, extra = divmod(n, self.world)
        start = rank * k + min(rank, extra)
        return start, start + k + (rank < extra)

    def holder(self, i: int, n: int) -> int:
        """The rank whose share of n items holds item i."""
        return next(r for r in range(self.world) if self.bounds(n, r)[1] > i)

    def share(self, items: list) -> list:
        """This rank's contiguous share of a step's items."""
        start, end = self.bounds(len(items))
        return items[start:end]

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (one all-reduce, float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's list, in rank order (the lengths may differ; two all-reduces, float64: exact)."""
        if self.world == 1:
            return [list(values)]
        counts = [int(c) for c in self.all_sum([len(values) if r == self.rank else 0 for r in range(self.world)])]
        start = sum(counts[: self.rank])
        flat = self.all_sum([0.0] * start + list(values) + [0.0] * (sum(counts) - start - len(values)))
        return [flat[sum(counts[:r]) : sum(counts[: r + 1])] for r in range(self.world)]

    def exchange(self, items: dict) -> dict:
        """Every rank's items (picklable values by key), merged: one all-gather of Python objects, so it is
        for what must travel between ranks (a step's sampled groups), not for numbers."""
        if self.world == 1:
            return dict(items)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, items)
        return {k: v for part in parts for k, v in part.items()}

    def normaliser(self, local: Normaliser) -> Normaliser:
        """The step's normaliser from this rank's part: its denominator summed over ranks (the one
        all-reduce), divided by N because DDP averages the ranks' gradients."""
        if self.world == 1:
            return local
        return Normaliser(local.mode, self.all_sum([local.denominator])[0] / self.world)

    def rounds(self, n_local: int) -> list[tuple[int, float]]:
        """(micro-batch index, weight) for this rank: its own micro-batches at weight 1, then zero-weight
        repeats of its last one until it has as many as the busiest rank (each backward joins the
        gradient all-reduce of DDP's last round)."""
        n = n_local if self.world == 1 else int(max(self.all_max(n_local), 1))
        return [(i, 1.0) for i in range(n_local)] + [(max(n_local - 1, 0), 0.0)] * (n - n_local)

    def average(self, params) -> None:
        """Average the gradients of parameters outside the wrapped model (PPO's value head) over the ranks, as
        DDP and FSDP2 average the model's (one all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def all_max(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    def sync(self, model, last: bool):
        """Gradients are reduced over the ranks only in the step's last backward (the others accumulate)."""
        if self.world == 1 or last:
            return nullcontext()
        return _no_gradient_sync(model) if self.strategy == "fsdp2" else model.no_sync()

    def shard_frozen(self, model):
        """A frozen model (RL's reference) sharded as the policy is under fsdp2 (no rank holds it whole); else
        as it is."""
        return self.wrap(model) if self.sharded else model

    def wrap(self, model):
        """The model the loss runs through: DDP over the ranks (attributes still reach the module), or with
        fsdp2 the model itself, each decoder layer and then the whole sharded by torch's fully_shard (one code
        path on CPU and GPU: accelerate's own FSDP plugin does nothing on CPU)."""
        if self.world == 1:
            return model
        if self.strategy == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for module in model.modules():
                if type(module).__name__.endswith("DecoderLayer"):
                    fully_shard(module)
            fully_shard(model)
            return model
        ids = [model.device.index] if model.device.type == "cuda" else None
        return _DDP(model, device_ids=ids)

    # ---------------------------------------------------------------- checkpoints: full state, by name

    def full_state(self, model) -> dict | None:
        """A sharded model's full state dict, on rank 0 (a collective: every rank calls it); else None (the
        model holds its full weights)."""
        if self.strategy != "fsdp2" or self.world == 1:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer's full state keyed by parameter name (a collective under fsdp2), so a checkpoint
        resumes under any strategy and number of ranks. Parameters outside the model (PPO's value head,
        replicated on every rank) are named extra.i, as `_param_names` names them."""
        names = _param_names(model, optimizer)
        if not self.sharded:
            state = optimizer.state_dict()
            return {"state": {names[i]: v for i, v in state["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        own, extra = _model_groups(model, optimizer)
        state = get_optimizer_state_dict(model, _view(optimizer, own), options=StateDictOptions(full_state_dict=True,
                                                                                                   cpu_offload=True))
        if not state:  # the full state is gathered on rank 0 only
            return state
        name = dict(zip(map(id, _params(optimizer)), names, strict=True))
        for g in extra:
            state["param_groups"].append({**{k: v for k, v in g.items() if k != "params"}, "params": [name[id(p)] for p in g["params"]]})
            state["state"].update({name[id(p)]: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                                 for k, v in optimizer.state[p].items()}
                                   for p in g["params"] if p in optimizer.state})
        return state

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """Load what optimizer_state saved (or an older checkpoint's index-keyed state)."""
        groups = state["param_groups"]
        if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
            optimizer.load_state_dict(state)
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            own, extra = _model_groups(model, optimizer)
            is_extra = {n for g in groups for n in g["params"] if n.startswith("extra.")}
            view = _view(optimizer, own)
            set_optimizer_state_dict(model, view, {"state": {n: v for n, v in state["state"].items() if n not in is_extra},
                                                   "param_groups": [g for g in groups if not set(g["params"]) & is_extra]},
                                     options=StateDictOptions(full_state_dict=True))
            for mine, loaded in zip(own, view.param_groups, strict=True):  # load_state_dict made new group dicts
                mine.update({k: v for k, v in loaded.items() if k != "params"})
            optimizer.state.update(view.state)
            name = dict(zip(map(id, _params(optimizer)), _param_names(model, optimizer), strict=True))
            for g, saved in zip(extra, [g for g in groups if set(g["params"]) & is_extra], strict=True):
                g.update({k: v for k, v in saved.items() if k != "params"})
                for p in g["params"]:
                    if name[id(p)] in state["state"]:
                        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v
                                              for k, v in state["state"][name[id(p)]].items()}
        else:
            index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
            optimizer.load_state_dict({"state": {index[n]: v for n, v in state["state"].items()},
                                       "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]})

    def broadcast(self, value):
        """Rank 0's value on every rank (a small object: a server's address)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class _no_gradient_sync:
    """FSDP2's no_sync: reduce-scatter no gradient until the step's last backward."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def _params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _model_groups(model, optimizer) -> tuple[list[dict], list[dict]]:
    """The optimizer's parameter groups of the model's parameters, and those of parameters outside it."""
    own = {id(p) for p in model.parameters()}
    inside = [g for g in optimizer.param_groups if all(id(p) in own for p in g["params"])]
    outside = [g for g in optimizer.param_groups if not any(id(p) in own for p in g["params"])]
    if len(inside) + len(outside) != len(optimizer.param_groups):
        raise ValueError("a parameter group mixes the model's parameters with others")
    return inside, outside


def _view(optimizer, groups: list[dict]):
    """The optimizer restricted to `groups` (their parameters' state shared): what torch's distributed state
    dict functions take, which know only the model's parameters."""
    from collections import defaultdict

    view = object.__new__(type(optimizer))
    view.__dict__.update(optimizer.__dict__)
    view.param_groups = groups
    view.state = defaultdict(dict, {p: optimizer.state[p] for g in groups for p in g["params"] if p in optimizer.state})
    return view


def _param_names(model, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (those not in the model, PPO's head: extra.i)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return [by_id.get(id(p), f"extra.{i}") for i, p in enumerate(params)]


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose attributes fall through to the wrapped model (config, device, disable_adapter, ...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _comm_device() -> str:
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def joined() -> bool:
    """Whether this process is a rank of several (a process group is up)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank()


def world() -> int:
    return torch.distributed.get_world_size()


def leave() -> bool:
    """End this rank's membership once every rank is done: the process group's threads are joined here, not
    torn down by the interpreter's exit (gloo's then abort a rank: "terminate called without an active
    exception"). True when this was a rank of several."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


FAILURE = "thinkforge/failure"  # the store key of the first rank's failure: "code<TAB>line"


def failed(code: int, line: str) -> tuple[int, str]:
    """This rank stops with (code, line): published for the other ranks, unless one failed first, whose
    (code, line) is returned so that every rank ends alike."""
    store = _store()
    if store is None:
        return code, line
    try:
        first = store.compare_set(FAILURE, "", f"{code}\t{line}").decode()
    except Exception:  # noqa: BLE001 - the launcher's store is gone: this rank's own line
        return code, line
    got, _, text = first.partition("\t")
    return (int(got), text) if text else (code, line)


ENDED = "thinkforge/ended"  # how many ranks have said their last line


def said() -> None:
    """This rank's last line is out (the first failing rank waits for every rank's)."""
    store = _store()
    try:
        if store is not None:
            store.add(ENDED, 1)
    except Exception:  # noqa: BLE001 - the launcher's store is gone: nobody waits for this rank
        pass


def release_peers(world: int, seconds: float = 10.0) -> None:
    """The first failing rank, its line said: close its connections, so that every peer's collective fails now
    (and it prints the line), and wait up to `seconds` for their lines before exiting, so that the launcher's
    ending of the remaining ranks finds them done."""
    import time

    store = _store()
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - a group already broken: the peers see this rank's exit instead
        pass
    deadline = time.time() + seconds
    while store is not None and time.time() < deadline:
        try:
            if store.add(ENDED, 0) >= world:
                return
        except Exception:  # noqa: BLE001
            return
        time.sleep(0.05)


def peer_failure() -> tuple[int, str] | None:
    """(code, line) of a rank that failed, or None: read by a rank whose collective broke (its peer left)."""
    store = _store()
    try:
        if store is None or not store.check([FAILURE]):
            return None
        code, _, line = store.get(FAILURE).decode().partition("\t")
        return int(code), line
    except Exception:  # noqa: BLE001
        return None


def timed_out(error: BaseException) -> tuple[int, str] | None:
    """(1, line) when `error` is a collective that waited out the process group's timeout, else None."""
    text = str(error)
    gloo = "Timed out waiting" in text and "gloo" in text  # gloo's own message
    backend = isinstance(error, torch.distributed.DistBackendError) and "timeout" in text.lower()
    if not (gloo or backend or "collective operation timeout" in text.lower()):  # the last: NCCL's watchdog
        return None
    return 1, (f"rank {rank()}: waited {TIMEOUT['seconds']:g} s in a collective for the other ranks: one hangs or died "
               "without a word (its output says which); raise collective_timeout if a step legitimately takes longer")


TIMEOUT = {"seconds": 1800.0}  # the process group's, set by init


def _store():
    """The process group's key-value store (the launcher's TCP store), where ranks leave each other word."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no group, or the private accessor moved: no word, each rank its own line
        return None


def init(timeout: float = 1800.0) -> Dist:
    """Join the ranks `accelerate launch` started (WORLD_SIZE > 1), else one process. Every collective waits at
    most `timeout` seconds (a rank that hangs or died without a word ends the others' wait with an error)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if os.environ.get("MASTER_ADDR") and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
            # `accelerate launch --cpu --num_processes N` starts ONE process: a silent 1-rank run is refused.
            raise UserError("accelerate launch --cpu starts a single process whatever --num_processes says; "
                            "launch with --multi_gpu --num_processes N (without GPUs the ranks train on CPU with gloo)")
        return Dist()
    from accelerate import PartialState

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp2.yaml)")
    TIMEOUT["seconds"] = timeout
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=timeout))
    if state.num_processes != world:
        raise UserError(f"the launcher asked for {world} processes but {state.num_processes} joined; "
                        "launch with accelerate launch --multi_gpu --num_processes N")
    return Dist(state.process_index, state.num_processes, "fsdp2" if fsdp else "ddp")
