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
    return {arch: tiny.init_model(root / arch, InitConfig(arch=arch, hidden=64, layers=2, heads=4), seed=1)
            for arch in EXPORTED}


def token_ids(folder) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(TEXT, add_special_tokens=False).input_ids


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_logits_match_per_dtype(models_by_arch, tmp_path, capsys, dtype):
    folder, out = models_by_arch["llama"], tmp_path / f"m-{dtype}.gguf"
    code, said, _ = run_cli(["export", str(folder), "--gguf", str(out), "--dtype", dtype], capsys)
    assert code in (0, None) and out.is_file() and "llama.cpp" in said
    ids = token_ids(folder)
    assert llama_cpp({"do": "tokenize", "model": str(out), "text": TEXT})["ids"] == ids
    assert gap(folder, out, ids, tmp_path, f32_cache=dtype == "f32") <= TOLERANCE[dtype]


@pytest.mark.parametrize("arch", EXPORTED)
def test_every_exported_architecture_matches_in_f32(models_by_arch, tmp_path, arch):
    from thinkforge.export import export_gguf

    folder = models_by_arch[arch]
    done = export_gguf(folder, tmp_path / "m.gguf", "f32")
    assert done["architecture"] == ARCHS[arch].gguf
    assert gap(folder, tmp_path / "m.gguf", token_ids(folder), tmp_path, f32_cache=True) <= TOLERANCE["f32"]


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
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    phi = tiny.init_model(tmp_path / "phi", InitConfig(arch="phi", hidden=64, layers=1, heads=4))
    phi3 = tiny.init_model(tmp_path / "phi3", InitConfig(arch="phi3", hidden=64, layers=1, heads=4))
    for args, words in [([str(phi)], "PhiForCausalLM cannot be exported"), ([str(phi3)], "Phi3ForCausalLM cannot be exported"),
                        ([str(tmp_path / "missing")], "is not a model folder"),
                        ([str(models_by_arch["llama"]), "--dtype", "q4"], "q4")]:
        code, _, err = run_cli(["export", *args, "--gguf", str(tmp_path / "x.gguf")], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))
