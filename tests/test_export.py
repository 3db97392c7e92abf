"""`thinkforge export MODEL --gguf OUT.gguf`: llama.cpp (its own venv, `make llama-cpp`) loads the file,
tokenizes like transformers and computes the same logits, within a tolerance per dtype."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import engine_python, run_cli
from thinkforge.arch import ARCHS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = engine_python(".venv-llamacpp", "llama-cpp", "llama.cpp")

# Largest |llama.cpp - transformers| logit, as a share of the logits' standard deviation, per dtype. f32 runs
# with a float32 KV cache (so only summation order differs); the others with llama.cpp's default f16 cache.
# Measured on the tiny models below: f32 ~1e-6, f16 ~5e-3, bf16 ~3e-2, q8_0 ~5e-2 (SmolLM2-135M: 0.2%, 0.7%,
# 4.5%, 20% of the logits' spread with the f16 cache).
TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "bf16": 0.1, "q8_0": 0.2}
# llama.cpp's CPU GELU (Phi-2's MLP) looks its value up in a table of f16 numbers (ggml-cpu/vec.h: GGML_GELU_FP16),
# so Phi-2 in f32 differs by ~1.5e-3 of the logits' spread (its MLP zeroed: 1.3e-6); the other dtypes as above
F32_TOLERANCE = {"phi": 3e-3}
EXPORTED = [name for name, row in ARCHS.items() if row.gguf]  # a row with a llama.cpp name is tested as it is added
TEXT = "<|im_start|>user\nTom has 12 apples and buys 345 more.\n<|im_end|>\n<think>3+4=7</think> <answer>7</answer> é"


def llama_cpp(request: dict) -> dict:
    done = subprocess.run([str(LLAMA_PYTHON), str(ROOT / "thinkforge" / "_llamacpp_worker.py")], input=json.dumps(request),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def hf_logits(folder, ids):
    import torch

    from thinkforge import models

    model, _ = models.load(str(folder), dtype="float32", device="cpu")
    if models.is_adapter(model):
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def gap(folder, gguf: Path, ids, tmp_path, f32_cache: bool) -> float:
    llama_cpp({"do": "logits", "model": str(gguf), "ids": ids, "out": str(tmp_path / "l.npy"), "f32_cache": f32_cache})
    theirs, ours = np.load(tmp_path / "l.npy"), hf_logits(folder, ids)
    assert theirs.shape == ours.shape
    return float(np.abs(theirs - ours).max() / ours.std())


@pytest.fixture(scope="module")
def models_by_arch(tmp_path_factory):
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    root = tmp_path_factory.mktemp("export")
    return {arch: randomized(tiny.init_model(root / arch, InitConfig(arch=arch, hidden=64, layers=2, heads=4), seed=1))
            for arch in EXPORTED}


def randomized(folder, zero_mlp: bool = False):
    """The model folder with every bias and norm drawn at random (a random-init model has zero biases and unit
    norms: an exporter that dropped or misplaced them, or wrote a wrong norm eps, would pass); zero_mlp: the MLP's
    output layer zeroed (Phi-2: llama.cpp's GELU reads an f16 table, the one f32 difference left)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
            if zero_mlp and (".mlp.fc2." in name or ".mlp.down_proj." in name):
                p.zero_()
    model.save_pretrained(folder)
    return folder


def token_ids(folder) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(TEXT, add_special_tokens=False).input_ids


def tolerance(arch: str, dtype: str) -> float:
    return F32_TOLERANCE.get(arch, TOLERANCE["f32"]) if dtype == "f32" else TOLERANCE[dtype]


def test_phi2_without_its_mlp_matches_to_the_last_digits(tmp_path, capsys):
    """Phi-2's f32 gap (F32_TOLERANCE) is llama.cpp's tabled GELU: with the MLP's output zeroed the file's
    LayerNorms (weights, biases, eps), biases and partial rotation are held to the tolerance of every other model."""
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    folder = randomized(tiny.init_model(tmp_path / "phi", InitConfig(arch="phi", hidden=64, layers=2, heads=4), seed=1),
                        zero_mlp=True)
    out = tmp_path / "m.gguf"
    code, _, _ = run_cli(["export", str(folder), "--gguf", str(out), "--dtype", "f32"], capsys)
    assert code in (0, None)
    assert gap(folder, out, token_ids(folder), tmp_path, f32_cache=True) < TOLERANCE["f32"]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "phi", "phi3"])  # pairwise rotation; LayerNorms and biases; fused q/k/v
def test_logits_match_per_dtype(models_by_arch, tmp_path, capsys, arch, dtype):
    folder, out = models_by_arch[arch], tmp_path / f"m-{dtype}.gguf"
    code, said, _ = run_cli(["export", str(folder), "--gguf", str(out), "--dtype", dtype], capsys)
    assert code in (0, None) and out.is_file() and "llama.cpp" in said
    ids = token_ids(folder)
    assert llama_cpp({"do": "tokenize", "model": str(out), "text": TEXT})["ids"] == ids
    assert gap(folder, out, ids, tmp_path, f32_cache=dtype == "f32") <= tolerance(arch, dtype)


@pytest.mark.parametrize("arch", EXPORTED)
def test_every_exported_architecture_matches_in_f32(models_by_arch, tmp_path, arch):
    """Its tokenization (digits, role markers, reasoning tags, UTF-8), chat template and logits. The phi3 model's
    folder is named "phi3": llama.cpp keys Phi-3's SentencePiece quirks on that name (export._name)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from thinkforge.export import export_gguf

    folder, out = models_by_arch[arch], tmp_path / "m.gguf"
    done = export_gguf(folder, out, "f32")
    assert done["architecture"] == ARCHS[arch].gguf
    ids = token_ids(folder)
    assert llama_cpp({"do": "tokenize", "model": str(out), "text": TEXT})["ids"] == ids
    assert GGUFReader(out).fields["tokenizer.chat_template"].contents() == AutoTokenizer.from_pretrained(folder).chat_template
    assert gap(folder, out, ids, tmp_path, f32_cache=True) <= tolerance(arch, "f32")


def test_a_lora_folder_exports_merged(models_by_arch, tmp_path):
    import torch

    from tests.conftest import random_lora
    from thinkforge import models
    from thinkforge.export import export_gguf

    base = models_by_arch["llama"]
    model, tok = models.load(str(base), dtype="float32", device="cpu")
    model = random_lora(model, r=4, alpha=8, std=0.5)
    adapter = models.save(model, tok, tmp_path / "adapter")
    ids = token_ids(base)
    with torch.no_grad():
        assert not np.allclose(hf_logits(adapter, ids), hf_logits(base, ids), atol=1e-3)  # the adapter matters
    export_gguf(adapter, tmp_path / "m.gguf", "f32")
    assert gap(adapter, tmp_path / "m.gguf", ids, tmp_path, f32_cache=True) <= TOLERANCE["f32"]


def test_the_chat_template_and_special_ids_travel(models_by_arch, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from thinkforge.export import export_gguf

    folder = models_by_arch["llama"]
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    tok = AutoTokenizer.from_pretrained(str(folder))
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # digits one by one, then GPT-2's split


def test_bad_input_is_one_line_and_writes_nothing(models_by_arch, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from thinkforge import models, tiny
    from thinkforge.config import InitConfig

    tok = tiny.build_tokenizer()
    gpt2 = models.save(GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)), tok,
                       tmp_path / "gpt2")
    linear = tiny.init_model(tmp_path / "linear", InitConfig(arch="llama", hidden=64, layers=1, heads=4))
    config = json.loads((linear / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (linear / "config.json").write_text(json.dumps(config))
    for args, words in [([str(gpt2)], "GPT2LMHeadModel cannot be exported"), ([str(linear)], "rope type 'linear'"),
                        ([str(tmp_path / "missing")], "is not a model folder"),
                        ([str(models_by_arch["llama"]), "--dtype", "q4"], "q4")]:
        code, _, err = run_cli(["export", *args, "--gguf", str(tmp_path / "x.gguf")], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


# Phi-4-mini in miniature: its tokenizer is a byte-level BPE split by GPT-4o's pattern (llama.cpp's "gpt-4o"), with
# <|endoftext|> at 199,999 and the role markers from 200,019, above ids no token uses, in an embedding of 200,064
# rows; its attention rotates 3/4 of each head with LongRoPE; its embeddings are tied.
PHI4_TEXT = (TEXT + " HelloWorld DON'T don't CamelCASE 1234567 a/b//c\n\n  x  \tÉcole Grüße 日本語 "
             "<|system|>S<|end|><|user|>Hi<|end|><|assistant|>")
PHI4_ROLES = {"<|endoftext|>": 0, "<|assistant|>": 20, "<|end|>": 21, "<|user|>": 22, "<|system|>": 23}


def phi4_mini_tokenizer(top: int):
    """A byte-level BPE tokenizer of ~300 tokens split as GPT-4o's, <|endoftext|> at id `top` and the role markers
    20 ids above it (the ids between unused, as in Phi-4-mini's), the reasoning tags as added (not special) tokens
    after them. Each is in the BPE's vocabulary too: tokenizers renumbers, on loading, added tokens that are not."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from thinkforge.export import _GPT4O_SPLIT
    from thinkforge.tiny import CHAT_TEMPLATE, TAG_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_GPT4O_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([PHI4_TEXT, "Tom's 12 apples, 345 more: the answer is 357."] * 4, trainer=trainer)
    spec = json.loads(bpe.to_str())
    placed = {**{text: (top + above, True) for text, above in PHI4_ROLES.items()},
              **{text: (top + 24 + i, False) for i, text in enumerate(TAG_TOKENS)}}
    for text, (i, special) in placed.items():
        spec["model"]["vocab"][text] = i
        spec["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                     "normalized": False, "special": special})
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=None,
                                   eos_token="<|end|>", pad_token="<|endoftext|>", additional_special_tokens=list(PHI4_ROLES))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def phi4_mini(folder: Path, top: int, vocab: int, hidden: int, heads: int, layers: int, original: int) -> Path:
    """A random Phi3ForCausalLM shaped as Phi-4-mini (query heads grouped on one key/value head, 3/4 of each head
    rotated, LongRoPE whose long factors apply past `original` positions, tied embeddings) with
    phi4_mini_tokenizer(top)."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    from thinkforge.models import save

    tok = phi4_mini_tokenizer(top)
    rotated = 3 * (hidden // heads) // 4
    torch.manual_seed(0)
    factors = {"short_factor": (1 + torch.rand(rotated // 2)).tolist(), "long_factor": (2 + 6 * torch.rand(rotated // 2)).tolist()}
    config = Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=4 * original,
        original_max_position_embeddings=original,  # Phi3Config's own field: it overrides rope_parameters'
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "factor": 4.0,
                         **factors},
        bos_token_id=top, eos_token_id=tok.eos_token_id, pad_token_id=top, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    return save(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok, folder)


@pytest.mark.parametrize("original", [256, 16], ids=["short-factors", "long-factors"])
def test_phi4_mini_gpt4o_split_and_longrope_match(tmp_path, original):
    """llama.cpp's context (64 tokens, padded to 256) is within `original` (short factors in both) or past it, as
    the ~60-token text is in transformers (long factors in both): llama.cpp picks by context, transformers by length."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from thinkforge.export import export_gguf

    folder = phi4_mini(tmp_path / "my-phi3-ft", top=300, vocab=364, hidden=64, heads=4, layers=2,
                       original=original)
    export_gguf(folder, tmp_path / "m.gguf", "f32")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-4o" and fields["general.name"].contents() == "my-phi 3-ft"
    ids = AutoTokenizer.from_pretrained(str(folder))(PHI4_TEXT, add_special_tokens=False).input_ids
    assert {320, 321, 322, 323, 324, 327} <= set(ids) and len(ids) > 16 + 8  # role markers, tags; past 16 positions
    assert llama_cpp({"do": "tokenize", "model": str(tmp_path / "m.gguf"), "text": PHI4_TEXT})["ids"] == ids
    assert gap(folder, tmp_path / "m.gguf", ids, tmp_path, f32_cache=True) <= TOLERANCE["f32"]


def test_phi4_mini_vocabulary_size_loads_and_matches(tmp_path):
    """The real vocabulary size (200,064 rows, <|endoftext|> at 199,999) on a model 16 wide: the ids the tokenizer
    leaves unused are written as placeholders, one per row, and llama.cpp's logits have the 200,064 columns."""
    from transformers import AutoTokenizer

    from thinkforge.export import export_gguf

    folder = phi4_mini(tmp_path / "narrow", top=199_999, vocab=200_064, hidden=16, heads=2, layers=1,
                       original=256)
    assert export_gguf(folder, tmp_path / "m.gguf", "f32")["vocabulary"] == 200_064
    ids = AutoTokenizer.from_pretrained(str(folder))(PHI4_TEXT, add_special_tokens=False).input_ids
    assert {200_020, 200_023} <= set(ids)  # <|end|>, <think>
    assert llama_cpp({"do": "tokenize", "model": str(tmp_path / "m.gguf"), "text": PHI4_TEXT})["ids"] == ids
    assert gap(folder, tmp_path / "m.gguf", ids, tmp_path, f32_cache=True) <= TOLERANCE["f32"]
