"""Rollout backends behind three small interfaces (`types.py`): `Sampler` (generate; every backend: hf, vllm,
openai), `Streamer` (stream, interrupt; hf, for serve and chat) and `PolicySync` (push, prove; vllm, for RL).

Evaluation, the policy's own samples for DPO pairs and a local teacher sample a checkpoint on disk
(`load_generator`); a remote teacher uses `server_client`. The RL trainer builds its own backend, rank by rank,
from the same parts (`train/backend.py`).
"""

from __future__ import annotations


def load_generator(model_cfg, path: str, batch_size: int, cfg=None, workdir=None, max_new_tokens=None):
    """(sampler, tokenizer) that samples the checkpoint at `path` (evaluation, the policy's own samples for
    DPO pairs, a local teacher) with the backend rollout.backend (cfg; None: hf) names in LOADERS. Close it
    after use."""
    return LOADERS["hf" if cfg is None else cfg.backend](model_cfg, path, batch_size, cfg, workdir, max_new_tokens)


def _hf(m, path, batch_size, cfg, workdir, max_new_tokens):
    """Loaded here as the model settings `m` say (dtype, device, ...)."""
    from thinkforge import models
    from thinkforge.rollout.hf import HFGenerator

    model, tok = models.load(path, m.dtype, m.device, m.trust_remote_code, m.load_in_4bit,
                             attn_implementation=m.attn_implementation)
    return HFGenerator(model, tok, batch_size), tok


def _vllm(m, path, batch_size, cfg, workdir, max_new_tokens):
    """A vLLM server started on the folder itself (a LoRA folder: its base, the adapter hot-loaded), no copy in
    this process."""
    from pathlib import Path

    from transformers import GenerationConfig

    from thinkforge import models
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
    gen = VLLMGenerator(server.url, tok, batch_size, cfg, stop_ids=stops, server=server)
    if base:
        gen.load_adapter(str(Path(path).resolve()))
    return gen, tok


def _openai(m, path, batch_size, cfg, workdir, max_new_tokens):
    """The server at rollout.base_url serves `path` by name; only its tokenizer is here."""
    import os

    from thinkforge import models
    from thinkforge.errors import UserError

    if not cfg.base_url:
        raise UserError("rollout.backend=openai needs rollout.base_url (e.g. http://127.0.0.1:8000/v1)")
    tok = models.load_tokenizer(path, m.trust_remote_code)
    return server_client(cfg.base_url, path, os.environ.get(cfg.api_key_env), cfg.request_timeout, retries=3,
                         concurrency=cfg.concurrency, batch_size=batch_size), tok


# rollout.backend -> how a checkpoint is sampled with it (the config's choices equal these keys: tests/test_layout.py)
LOADERS = {"hf": _hf, "vllm": _vllm, "openai": _openai}


def server_client(base_url: str, served_model: str, api_key: str | None, timeout: float, *, retries: int,
                  concurrency: int, batch_size: int = 16):
    """A client of any OpenAI-compatible server (vLLM, SGLang, DeepSeek's API, `thinkforge serve`)."""
    from thinkforge.rollout.openai import OpenAIClient

    return OpenAIClient(base_url, served_model, api_key, timeout, max_retries=retries, concurrency=concurrency,
                        batch_size=batch_size)
