"""A model folder (full weights, or a LoRA adapter merged into its base) as one GGUF file for llama.cpp.

`thinkforge export MODEL --gguf OUT.gguf [--dtype f32|bf16|f16|q8_0]` writes the weights, the tokenizer
(byte-level BPE: its tokens, merges, special ids, pre-tokenizer) and the chat template, so that llama.cpp,
Ollama and LM Studio run the model with the prompt format it was trained with. Architectures: those with a
llama.cpp name in arch.ARCHS (Llama and Mistral as llama, Qwen2, Qwen3, Phi-2 as phi2, Phi-3 as phi3: Phi-4-mini,
whose tokenizer is byte-level BPE, not Phi-3-mini, whose is SentencePiece); the tensors keep transformers' layout
(Phi-3's fused q/k/v and gate/up included), named by the gguf package's map (its TensorNameMap), the metadata keys
by its writer.

What llama.cpp computes differently from transformers, and the file accounts for:
- Llama-family rotary embedding: transformers rotates the two halves of each head (`rotate_half`); llama.cpp's
  `llama` graph rotates adjacent pairs. The q and k projections' output rows are reordered per head (each
  half interleaved with the other) so that both compute the same attention. Qwen2, Qwen3, Phi-2 and Phi-3 use the
  halves in llama.cpp too (NeoX rotation): their rows stay as they are (arch.py's `pairwise_rope`). A partial
  rotation (Phi-2's half, Phi-4-mini's three quarters of each head) is the rotated dimension count.
- LongRoPE (Phi-4-mini): its short and long factors are two tensors, its factor on cos and sin (transformers')
  a key. llama.cpp takes the long factors when its context is longer than the pretraining one, for every
  position; transformers when the sequence is: past that length (4,096 for Phi-4-mini) a short prompt in a long
  llama.cpp context is rotated with the long factors there, with the short ones here.
- llama.cpp keys Phi-3's SentencePiece quirks on the model's name (see _name): "phi3" is written "phi 3" in it.
- Norms and biases stay float32 in every dtype (as llama.cpp's own converter does); q8_0 needs rows whose
  length is a multiple of 32 and keeps float32 where it is not (a tiny model's odd sizes).

What llama.cpp 0.3.36 computes differently and no file can change: its CPU GELU (Phi-2's MLP) looks values up in
a table of f16 numbers (ggml/src/ggml-cpu/vec.h:46 and 1001-1014), ~1.5e-3 of the logits' spread in f32 (the
tests' tolerance for it); its GPT-4o split tells capitals from small letters in ASCII only
(src/llama-vocab.cpp:438-443), so a small letter before a non-ASCII capital ("aÉcole") stays in one piece there
and is two words in transformers: tokens can differ on such text (seen on a tokenizer trained for it).

Architectures without a llama.cpp name, rope scalings other than the default rotation and Phi-3's LongRoPE,
attention that slides, and tokenizers other than byte-level BPE (Phi-3-mini's SentencePiece) are refused with one
line naming what is not supported.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from thinkforge.arch import ARCHS, row_of
from thinkforge.errors import UserError

DTYPES = ("f32", "bf16", "f16", "q8_0")
# The MLP activation llama.cpp's graph computes, by its architecture name (transformers' names for it); SiLU elsewhere.
LLAMA_CPP_ACTIVATION = {"phi2": ("gelu_new", "gelu_pytorch_tanh")}

# The byte-level pre-tokenizer's split, as llama.cpp names it (tokenizer.ggml.pre): told apart by the structure
# of tokenizer.json's pre_tokenizer. GPT-2's regex alone; digits one by one then GPT-2's regex (SmolLM,
# StarCoder, thinkforge's tiny models); Llama-3's and Qwen2's own split patterns.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# GPT-4o's (tiktoken's o200k_base, Phi-4-mini's): a word is its capitals then its small letters, contractions kept on
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def export_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f16") -> dict:
    """Write `model_dir` (a model folder, or a LoRA adapter folder: merged into its base first) to `out` as GGUF.
    Returns what was written: architecture, dtype, tensors, bytes. The file appears whole or not at all."""
    import torch

    from thinkforge import models

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF files needs the gguf package: pip install 'thinkforge[gguf]'") from None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json or adapter_config.json); pass a folder "
                        f"that `thinkforge run` or `init-model` wrote (a run's final/ or merged model)")
    model, tok = models.load(str(model_dir), dtype="float32", device="cpu")
    if models.is_adapter(model):
        model = model.merge_and_unload()
    row = row_of(model)
    if row is None or row.gguf is None:
        supported = ", ".join(r.model_class for r in ARCHS.values() if r.gguf)
        raise UserError(f"{model_dir}: {type(model).__name__} cannot be exported to GGUF yet (supported: {supported})")
    arch, pairwise = row.gguf, row.pairwise_rope
    config = model.config
    rope = _rope(config, arch, model_dir)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings and arch != "phi2":  # llama.cpp's phi2 wants the output matrix even when tied
        state.pop("lm_head.weight", None)
    settings = config.to_dict()
    if settings.get("sliding_window") and settings.get("use_sliding_window", True) \
            and settings["sliding_window"] < config.max_position_embeddings:
        raise UserError(f"{model_dir}: its attention slides over {settings['sliding_window']} positions, which this "
                        f"exporter does not write for llama.cpp yet; it would run as full attention")
    computes = LLAMA_CPP_ACTIVATION.get(arch, ("silu",))
    if settings.get("hidden_act") not in computes or settings.get("qk_layernorm"):
        what = "q/k LayerNorms" if settings.get("qk_layernorm") else f"activation {settings.get('hidden_act')}"
        raise UserError(f"{model_dir}: its {what} is not what llama.cpp's {arch} graph computes "
                        f"({', '.join(computes)}, no q/k LayerNorms): the file would run another model")
    vocab = _vocabulary(tok, model_dir, config.vocab_size)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _metadata(writer, gguf, arch, config, rope=rope, dtype=dtype, model_dir=model_dir)
        _tokenizer(writer, tok, vocab, model.generation_config, config)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        written = 0
        for name, tensor in state.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"{model_dir}: tensor {name} has no GGUF name for llama.cpp's {arch}; it cannot be exported")
            if pairwise and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _pairwise_rows(tensor, heads)
            elif pairwise and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _pairwise_rows(tensor, kv_heads)
            data, qtype = _encode(tensor.numpy(), dtype, gguf)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            written += 1
        for which, kind in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, "long"), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, "short")):
            if kind in rope:  # LongRoPE's factors, one per rotated pair of dimensions
                writer.add_tensor(gguf.TENSOR_NAMES[which] + ".weight", torch.tensor(rope[kind]).numpy())
                written += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "architecture": arch, "dtype": dtype, "tensors": written, "bytes": out.stat().st_size,
            "vocabulary": len(vocab)}


def _pairwise_rows(weight, heads: int):
    """Rows of a q or k projection (heads x head_dim, ...) reordered so that llama.cpp's pairwise rotation of
    (2i, 2i+1) sees what transformers' rotation of (i, i + head_dim/2) sees: per head, rows [0..d/2) and
    [d/2..d) interleaved."""
    shape = weight.shape
    half = shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *shape[1:]).transpose(1, 2).reshape(shape)


def _encode(array, dtype: str, gguf):
    """(data, GGML type): norms, biases and vectors in float32; matrices in `dtype` (q8_0 where rows allow)."""
    import numpy as np

    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), types.F32
    if dtype == "f16":
        return array.astype(np.float16), types.F16
    qtype = types.BF16 if dtype == "bf16" else types.Q8_0
    if qtype == types.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return np.ascontiguousarray(array, dtype=np.float32), types.F32
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def _rope(config, arch: str, model_dir: Path) -> dict:
    """The rotary embedding as llama.cpp's keys: base and rotated dimensions; for LongRoPE (Phi-4-mini, llama.cpp's
    phi3 only) also its long and short factors, the context it was pretrained at and the factor on cos and sin."""
    settings = config.to_dict()
    params = dict(settings.get("rope_parameters") or {})
    kind = params.get("rope_type", "default")
    head_dim = settings.get("head_dim") or config.hidden_size // config.num_attention_heads
    # transformers 5 keeps the share of rotated dimensions in rope_parameters (Phi-2) or beside it (Phi-3)
    share = params.get("partial_rotary_factor") or settings.get("partial_rotary_factor") or 1.0
    rotated = int(head_dim * share)
    out = {"base": float(params.get("rope_theta", settings.get("rope_theta", 10000.0))), "dims": rotated,
           "head_dim": head_dim}
    if kind == "default":
        return out
    if kind == "longrope" and arch == "phi3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")  # transformers' own factor on cos and sin
        return {**out, "long": list(params["long_factor"]), "short": list(params["short_factor"]),
                "original": int(params["original_max_position_embeddings"]), "attention": float(attention)}
    raise UserError(f"{model_dir}: rope type {kind!r} of {config.model_type} cannot be exported to GGUF yet "
                    f"(supported: the default rotation, and LongRoPE for Phi-3)")


def _metadata(writer, gguf, arch: str, config, *, rope: dict, dtype: str, model_dir: Path) -> None:
    types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(_name(model_dir))
    writer.add_type("model")
    writer.add_file_type(types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    if arch == "phi2":  # LayerNorms with biases; the others RMS norms
        writer.add_layer_norm_eps(config.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(rope["base"])
    writer.add_rope_dimension_count(rope["dims"])
    if "long" in rope:  # llama.cpp takes the long factors when its context is longer than the original one
        writer.add_rope_scaling_orig_ctx_len(rope["original"])
        writer.add_rope_scaling_attn_factors(rope["attention"])
    if rope["head_dim"] * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(rope["head_dim"])
        writer.add_value_length(rope["head_dim"])


def _name(model_dir: Path) -> str:
    """general.name: the folder's name, with "phi3" and "phi-3" written "phi 3". llama.cpp gives any vocabulary whose
    model name contains either the token attributes of Phi-3's SentencePiece one (llama.cpp 0.3.36,
    src/llama-vocab.cpp:3118-3127): whitespace stripped after every special token (transformers keeps it), and
    "</s>", "<unk>", "<s>", "<|endoftext|>" looked up with .at(), so that a vocabulary without one of them does not
    load ("error loading model vocabulary: unordered_map::at"), whatever the file's architecture."""
    return re.sub(r"(?i)(phi)-?(3)", r"\1 \2", Path(model_dir).resolve().name)


def _vocabulary(tok, model_dir: Path, vocab_size: int) -> list[str]:
    """The token strings by id, padded to the embedding's rows with unused placeholders (llama.cpp wants one
    per row)."""
    vocab = tok.get_vocab()
    tokens = [None] * max(vocab_size, max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    if len(tokens) > vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {len(tokens)} tokens but the model's embedding {vocab_size} "
                        f"rows; the folder's tokenizer does not belong to its weights")
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]


def _pre_tokenizer(spec: dict | None, where: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE tokenizer's pre-tokenizer spec."""
    def kinds(s):
        if not s:
            return []
        if s["type"] == "Sequence":
            return [k for p in s["pretokenizers"] for k in kinds(p)]
        return [s]

    parts = kinds(spec)
    names = [p["type"] for p in parts]
    if names and names[-1] == "ByteLevel" and parts[-1].get("add_prefix_space"):
        names = [*names[:-1], "ByteLevel with a prefix space"]  # llama.cpp's BPE never adds one: not mapped
    if names == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if names == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    # a Split whose pieces are its pattern's matches, as llama.cpp's: matches isolated, or non-matches removed
    split = parts[0] if parts else {}
    matches = (split.get("behavior"), split.get("invert", False)) in (("Isolated", False), ("Removed", True))
    if names == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) and matches:
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
        if pattern == _GPT4O_SPLIT:
            return "gpt-4o"
    raise UserError(f"{where}: its tokenizer splits text with {' + '.join(names) or 'no pre-tokenizer'}, which "
                    f"this exporter does not map to a llama.cpp pre-tokenizer (byte-level BPE of GPT-2, SmolLM, "
                    f"Llama-3, Qwen2 and GPT-4o are supported)")


def _tokenizer(writer, tok, tokens: list[str], generation_config, config) -> None:
    spec = json.loads(tok.backend_tokenizer.to_str())
    where = tok.name_or_path
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{where}: only byte-level BPE tokenizers export to GGUF yet (this one is "
                        f"{spec['model']['type']} with a {(spec.get('decoder') or {}).get('type')} decoder)")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    # llama.cpp's token types: 1 normal, 3 control (special: never produced by splitting text), 4 user-defined
    # (an added token matched whole in text, like transformers' non-special added tokens), 5 unused
    known = set(tok.get_vocab().values())
    types = [(3 if added[i]["special"] else 4) if i in added else 1 if i in known else 5 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), where))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tok.eos_token_id if tok.eos_token_id is not None else generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    # llama.cpp falls back to token 11 for a gpt2 vocabulary without a bos id: the model's own, else the eos
    bos = next((i for i in (tok.bos_token_id, config.bos_token_id, eos) if isinstance(i, int)), None)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if tok.unk_token_id is not None:
        writer.add_unk_token_id(tok.unk_token_id)
    if tok.pad_token_id is not None:
        writer.add_pad_token_id(tok.pad_token_id)
    bos_added = bool(tok("a").input_ids[:1] == [tok.bos_token_id]) if tok.bos_token_id is not None else False
    writer.add_add_bos_token(bos_added)
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
