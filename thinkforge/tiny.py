"""Tiny random-initialised models of real architectures, with a tokenizer built here (no hub).

    init_model(out, InitConfig(arch="phi3", hidden=64, layers=2, heads=4), seed=0)

The tokenizer is a byte-level BPE trained on synthetic-task text (digits one per token: arithmetic is learned
digit by digit), with the role markers as special tokens, the reasoning tags as ordinary added tokens (the
Infused Phi-2 snippet decodes with skip_special_tokens=True and must still see them), and a chat template in
the Phi-4 layout. The sizes' one default is config.InitConfig's; each architecture's own settings are its row of
arch.ARCHS.
"""

from __future__ import annotations

from pathlib import Path

from thinkforge.arch import ARCHS
from thinkforge.config import InitConfig
from thinkforge.models import save

# Tokens of the tiny tokenizer. Role markers are special (never decoded into answers); the reasoning tags are
# ordinary added tokens so that `skip_special_tokens=True` (the Infused Phi-2 snippet) still shows them.
ROLE_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer trained on synthetic-task text; digits split one per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from thinkforge.formats import SYSTEM_PROMPT
    from thinkforge.tasks.synthetic import generate

    corpus = [SYSTEM_PROMPT, "The final answer is", "Let me check. Wait, so the answer is"]
    for level in (1, 2, 3, 4):
        corpus += [r["question"] + "\n" + r["answer"] for r in generate(300, "train", level, seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=ROLE_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=ROLE_TOKENS[1:4],
    )
    fast.add_tokens(TAG_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(size: InitConfig, vocab_size: int, max_len: int = 1024, **ids):
    """The transformers config of a tiny model of `size` (arch, hidden, layers, heads): the sizes every
    architecture shares, then the settings of its row in arch.ARCHS."""
    import transformers

    row = ARCHS[size.arch]
    common = dict(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, max_position_embeddings=max_len, **ids,
    )
    return getattr(transformers, row.config_class)(**common, **row.tiny(size))


def init_model(out: str | Path, size: InitConfig | None = None, seed: int = 0) -> Path:
    """Write a random-initialised model of a real architecture (size: InitConfig, validated) with the local tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    size = size or InitConfig()
    tok = build_tokenizer(seed=seed)
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tiny_config(size, len(tok), **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**ids)
    return save(model, tok, out)
