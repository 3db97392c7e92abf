"""Rollout backends behind one interface (`types.Generator`), and the one place that builds them.

Every stage asks here: RL rollouts, evaluation, the policy's own samples for DPO pairs, and a local teacher
use `make_generator` (or `load_generator` for a checkpoint on disk); a remote teacher uses `server_client`.
"""

from __future__ import annotations


def make_generator(model, tokenizer, batch_size: int):
    """The backend that samples from an in-memory model: transformers' forward in our decode loop."""
    from thinkforge.rollout.hf import HFGenerator

    return HFGenerator(model, tokenizer, batch_size)


def load_generator(model_cfg, path: str, batch_size: int):
    """(generator, tokenizer) for the checkpoint at `path`, loaded as model_cfg says (dtype, device, ...)."""
    from thinkforge import models

    m = model_cfg
    model, tok = models.load(path, m.dtype, m.device, m.trust_remote_code, m.load_in_4bit,
                             attn_implementation=m.attn_implementation)
    return make_generator(model, tok, batch_size), tok


def server_client(base_url: str, served_model: str, api_key: str | None, timeout: float, retries: int, concurrency: int):
    """A client of any OpenAI-compatible server (vLLM, SGLang, DeepSeek's API, `thinkforge serve`)."""
    from thinkforge.rollout.openai import OpenAIClient

    return OpenAIClient(base_url, served_model, api_key, timeout, retries, concurrency=concurrency)
