"""Rollout backends behind one interface (`types.Generator`), and the one place that builds them.

Every stage asks here: RL rollouts, evaluation, the policy's own samples for DPO pairs, and a local teacher
use `make_generator` (or `load_generator` for a checkpoint on disk); a remote teacher uses `server_client`.
"""

from __future__ import annotations


def make_generator(model, tokenizer, batch_size: int, cfg=None, workdir=None, dist=None, *, max_new_tokens=None,
                   dtype: str | None = None):
    """The backend that samples the policy `model`: rollout.backend (cfg) hf = transformers' forward in our
    decode loop (default); vllm = a vLLM server with its own copy of the weights, started here (its log and
    sync folders in workdir) or at cfg.base_url, synced by `load_weights` after every optimizer step. On N
    ranks (dist) one server serves them all: rank 0 starts it and pushes the weights, every rank samples; a
    sharded (FSDP2) policy is gathered by every rank a weight at a time for rank 0 to write."""
    from thinkforge.rollout.hf import HFGenerator

    if cfg is None or cfg.backend == "hf":
        return HFGenerator(model, tokenizer, batch_size, peers=dist)
    if cfg.backend == "openai":
        from thinkforge.errors import UserError

        raise UserError("rollout.backend=openai serves a fixed model (no weight updates): RL needs rollout.backend=hf or vllm")
    from pathlib import Path

    from thinkforge import models
    from thinkforge.rollout.types import stop_ids
    from thinkforge.rollout.vllm import VLLMGenerator, VLLMServer, write_weights

    workdir, lora = Path(workdir or "."), models.is_adapter(model)
    stops = stop_ids(tokenizer, model.generation_config)
    peers = dist if dist is not None and dist.sharded else None  # a sharded policy: every rank joins its gathers
    start_dir = workdir / "vllm-start"
    if dist is not None and not dist.main:
        if peers is not None and not lora and cfg.base_url is None:
            write_weights(model, None, start_dir, peers)  # rank 0 writes the server's starting weights
        gen = VLLMGenerator(dist.broadcast(None), tokenizer, batch_size, cfg, sync_dir=workdir / "vllm-sync", stop_ids=stops,
                            push=False, peers=peers)
        if lora or cfg.base_url:
            gen.load_weights(model)
        dist.barrier()  # rank 0's starting weights are on the server
        return gen
    server = None
    if cfg.base_url is None:
        if lora:  # the server serves the base; the adapter arrives by hot-loading
            peft = model.peft_config["default"]
            start, rank, owned = peft.base_model_name_or_path, peft.r, None
        else:  # the current weights (a resumed run's too), a copy the server owns, a bucket at a time
            start = str(write_weights(model, tokenizer, start_dir, peers).resolve())
            rank, owned = None, Path(start)
        dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")  # the trainer's compute dtype
        server = VLLMServer(start, cfg, workdir / "vllm.log", lora_rank=rank, dtype=dtype, max_new_tokens=max_new_tokens,
                            owned_dir=owned).start()
    gen = VLLMGenerator(cfg.base_url or server.url, tokenizer, batch_size, cfg, sync_dir=workdir / "vllm-sync",
                        stop_ids=stops, server=server, peers=peers)
    gen._tell_version()  # version 0: the starting weights
    if dist is not None:
        dist.broadcast(gen.url)  # before the first push: under FSDP2 every rank gathers it with rank 0
    if lora or cfg.base_url:
        gen.load_weights(model)  # the starting adapter (or weights) onto the server
    if dist is not None:
        dist.barrier()
    return gen


def load_generator(model_cfg, path: str, batch_size: int, cfg=None, workdir=None, max_new_tokens=None):
    """(generator, tokenizer) that samples the checkpoint at `path` (evaluation, the policy's own samples for
    DPO pairs, a local teacher). hf: loaded here as model_cfg says (dtype, device, ...); vllm (cfg): a vLLM
    server started on the folder itself (a LoRA folder: its base, the adapter hot-loaded), no copy in this
    process. Close it after use."""
    from pathlib import Path

    from thinkforge import models

    m = model_cfg
    if cfg is not None and cfg.backend == "openai":  # the server serves `path` by name; only its tokenizer is here
        import os

        from thinkforge.errors import UserError

        if not cfg.base_url:
            raise UserError("rollout.backend=openai needs rollout.base_url (e.g. http://127.0.0.1:8000/v1)")
        tok = models.load_tokenizer(path, m.trust_remote_code)
        return server_client(cfg.base_url, path, os.environ.get(cfg.api_key_env), cfg.request_timeout, retries=3,
                             concurrency=cfg.concurrency, batch_size=batch_size), tok
    if cfg is None or cfg.backend == "hf":
        model, tok = models.load(path, m.dtype, m.device, m.trust_remote_code, m.load_in_4bit,
                                 attn_implementation=m.attn_implementation)
        return make_generator(model, tok, batch_size), tok
    from transformers import GenerationConfig

    from thinkforge.rollout.types import stop_ids
    from thinkforge.rollout.vllm import VLLMGenerator, VLLMServer

    workdir = Path(workdir or ".")
    base, rank = models.adapter_base(path)
    tok = models.load_tokenizer(path if (Path(path) / "tokenizer_config.json").is_file() else base or path, m.trust_remote_code)
    dtype = str(models.resolve_dtype(m.dtype, models.resolve_device(m.device))).removeprefix("torch.")
    try:
        stops = stop_ids(tok, GenerationConfig.from_pretrained(base or path))
    except OSError:  # no generation_config.json: the tokenizer's eos
        stops = stop_ids(tok, None)
    server = VLLMServer(base or path, cfg, workdir / "vllm.log", lora_rank=rank, dtype=dtype,
                        max_new_tokens=max_new_tokens).start()
    gen = VLLMGenerator(server.url, tok, batch_size, cfg, sync_dir=workdir / "vllm-sync", stop_ids=stops, server=server)
    if base:
        gen.load_adapter(str(Path(path).resolve()))
    return gen, tok


def server_client(base_url: str, served_model: str, api_key: str | None, timeout: float, *, retries: int,
                  concurrency: int, batch_size: int = 16):
    """A client of any OpenAI-compatible server (vLLM, SGLang, DeepSeek's API, `thinkforge serve`)."""
    from thinkforge.rollout.openai import OpenAIClient

    return OpenAIClient(base_url, served_model, api_key, timeout, max_retries=retries, concurrency=concurrency,
                        batch_size=batch_size)
