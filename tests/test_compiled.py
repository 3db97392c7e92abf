"""model.compile: the auto rule, which passes run compiled, and a compiled stage against the eager one."""

import json

import pytest
import torch

from tests.test_sft import _data, _recipe


def test_auto_compiles_where_the_planned_tokens_repay_the_measured_compile_time():
    from thinkforge.train.compiled import MEASURED, decide

    sft = MEASURED["cpu", "sft"]
    need = sft.compile_seconds / (1 / sft.eager_rate - 1 / sft.compiled_rate)
    assert 50_000 < need < 1_000_000  # SFT on this CPU: 1.17x after 38 s
    assert decide("auto", "cpu", "sft", need * 1.01)[0] and not decide("auto", "cpu", "sft", need * 0.99)[0]
    on, why = decide("auto", "cpu", "rl", 1e12)
    assert not on and "never repays" in why  # RL's passes measured no faster compiled
    on, why = decide("auto", "cuda:0", "sft", 1e12)
    assert not on and "no compile figures" in why
    assert decide("on", "cuda", "rl", 0)[0] and not decide("off", "cpu", "sft", 1e12)[0]


def test_passes_without_gradients_run_the_eager_layers(tiny_loaded):
    """Generation and the reference / old log-prob passes never compile (the decode loop's cache cannot be)."""
    from torch._dynamo.utils import counters

    from thinkforge.train.compiled import compile_layers

    model, tok = tiny_loaded
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model) == model.config.num_hidden_layers
    ids = torch.tensor([tok.encode("1 + 2 =")])
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.slow
def test_a_compiled_lora_stage_trains_as_the_eager_one_within_bf16_rounding(tiny_model, tmp_path):
    """sft.main with model.compile=on (packed rows, LoRA, bf16 autocast) logs the losses and gradient norms of
    model.compile=off within bf16 rounding, and its start row says it compiled and why."""
    from torch._dynamo.utils import counters

    from thinkforge.train import sft

    data = _data(tmp_path, 24)
    runs = {}
    for setting in ("off", "on"):
        torch._dynamo.reset()
        counters.clear()
        recipe = _recipe(tiny_model, data, "midtrain", **{"model.compile": setting, "lora.enabled": "true", "lora.r": 4,
                                                          "midtrain.mixed_precision": "bf16", "midtrain.max_steps": 3,
                                                          "midtrain.batch_size": 1, "midtrain.grad_accum": 1})
        sft.main(recipe, "midtrain", tmp_path / setting, progress=False)
        runs[setting] = [json.loads(x) for x in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        assert (counters["stats"]["unique_graphs"] > 0) == (setting == "on")
    start = runs["on"][0]
    assert start["compile"] is True and start["compile_rule"] == "model.compile=on"
    assert runs["off"][0]["compile"] is False
    eager, compiled = ([r for r in runs[s] if "loss" in r] for s in ("off", "on"))
    assert len(eager) == len(compiled) == 3
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)
    assert eager[-1]["loss"] != eager[0]["loss"]  # it trains: the comparison is over moving weights


def test_compile_with_gradient_checkpointing_is_refused_on_and_skipped_on_auto(tiny_model, tmp_path):
    from thinkforge.config import load_config
    from thinkforge.errors import UserError
    from thinkforge.train import sft

    with pytest.raises(UserError, match="gradient_checkpointing"):
        load_config(None, ["model.compile=on", "model.gradient_checkpointing=true"])
    assert load_config(None, ["model.compile=off"]).model.compile == "off"  # YAML's bare off (false) is the word
    over = {"model.gradient_checkpointing": "true", "midtrain.max_steps": 1}
    sft.main(_recipe(tiny_model, _data(tmp_path, 4), "midtrain", **over), "midtrain", tmp_path / "auto", progress=False)
    start = json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["compile"] is False and "gradient checkpointing" in start["compile_rule"]
