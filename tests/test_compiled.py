"""model.compile: the auto rule, which passes run compiled, and a compiled stage against the eager one."""

import json
import warnings

import pytest
import torch

from tests.test_sft import _data, _recipe


def test_auto_compiles_where_the_planned_tokens_repay_the_measured_compile_time():
    from thinkforge.train.compiled import MEASURED, decide

    sft = MEASURED["cpu", "bf16", "sft"]
    need = sft.compile_seconds / (1 / sft.eager_rate - 1 / sft.compiled_rate)
    assert 10_000 < need < 1_000_000  # SFT on this CPU: 1.19x after 15 s
    assert decide("auto", "cpu", "sft", need * 1.01, "bf16")[0] and not decide("auto", "cpu", "sft", need * 0.99, "bf16")[0]
    assert decide("auto", "cpu", "rl", 1e12, "bf16")[0] and not decide("auto", "cpu", "rl", 1e3, "bf16")[0]
    on, why = decide("auto", "cuda:0", "sft", 1e12, "bf16")
    assert not on and "no compile figures" in why
    assert decide("on", "cuda", "rl", 0, "bf16")[0] and not decide("off", "cpu", "sft", 1e12, "bf16")[0]
    on, why = decide("auto", "cpu", "sft", 1e12, "fp32")  # the figures are bf16 autocast's: an fp32 pass has none
    assert not on and "no compile figures measured for fp32 sft passes" in why


@pytest.fixture
def restored_attention():
    """compile_layers registers the attention un-traced and raises dynamo's graph limit: put both back after."""
    from transformers import AttentionInterface

    from thinkforge.train import attention

    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = limit
    AttentionInterface.register(attention.NAME, attention.document_attention)


def test_passes_without_gradients_or_over_a_cache_run_the_eager_layers(tiny_model, restored_attention):
    """Generation, the reference / old log-prob passes and a prompt pass over a KV cache never compile (the decode
    loop's cache cannot be; a cached pass would be one graph per layer); a pass that takes gradients does."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    from thinkforge import models
    from thinkforge.train.compiled import compile_layers

    model, tok = models.load(tiny_model)  # its own copy: the session's model stays eager
    torch._dynamo.reset()
    counters.clear()
    assert compile_layers(model, backend="eager") == model.config.num_hidden_layers
    ids = torch.tensor([tok.encode("1 + 2 =")])
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    models.forward_cached(model, DynamicCache(config=model.config), input_ids=ids)
    assert counters["stats"]["unique_graphs"] == 0
    model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_a_compiled_lora_stage_trains_as_the_eager_one_within_bf16_rounding(tiny_model, tmp_path, restored_attention):
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
    assert start["compile"] is True and start["compile_rule"].startswith("model.compile=on; the no-grad passes")
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
    assert load_config(None, ["model.compile=on"]).model.compile == "on"  # YAML's bare on (true) is the word
    assert load_config(None, []).model.compile == "off"
    over = {"model.gradient_checkpointing": "true", "midtrain.max_steps": 1, "model.compile": "auto"}
    sft.main(_recipe(tiny_model, _data(tmp_path, 4), "midtrain", **over), "midtrain", tmp_path / "auto", progress=False)
    start = json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["compile"] is False and "gradient checkpointing" in start["compile_rule"]


def test_what_cannot_compile_is_refused_on_and_declined_with_its_reason_on_auto(tiny_loaded, monkeypatch):
    import shutil

    from thinkforge.errors import UserError
    from thinkforge.train import compiled

    model, _ = tiny_loaded
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="no C\\+\\+ compiler"):
        compiled.setup(model, "on", "cpu", "sft", 1e12, "bf16")
    assert compiled.setup(model, "auto", "cpu", "sft", 1e12, "bf16") == {
        "compile": False, "compile_rule": "auto: no C++ compiler on PATH (torch.compile's inductor builds C++ on a CPU); install g++"}
    assert compiled.setup(torch.nn.Linear(2, 2), "auto", "cuda", "sft", 1e12, "bf16")["compile_rule"].startswith("auto: Linear has no")


def test_the_start_row_names_the_precision_and_a_resume_under_another_is_told(tiny_loaded, tmp_path, monkeypatch):
    """bf16_if_native is decided on each host: the start row records what was computed, and a run resumed where
    the decision differs says so (its loss curve shifts there), against the last start row; a fresh start over an
    old metrics file (a run cut before its first checkpoint) is not a resume."""
    from thinkforge.config import load_config
    from thinkforge.train import loop

    model, _ = tiny_loaded
    recipe = load_config(None, [])
    got = loop.start_entries(recipe, model, "sft", 1e3, "no", tmp_path, resumed=False)
    assert got == {"precision": "fp32", "compile": False, "compile_rule": "model.compile=off"}
    rows = [{"step": 0, "event": "start", "precision": "fp32"}, {"step": 0, "event": "start", "precision": "bf16"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # cut
    with pytest.warns(UserWarning, match="started under bf16, resumed under fp32"):
        loop.start_entries(recipe, model, "sft", 1e3, "no", tmp_path, resumed=True)
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)  # an AMX host: bf16_if_native computes bf16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loop.start_entries(recipe, model, "sft", 1e3, "bf16_if_native", tmp_path, resumed=True)["precision"] == "bf16"
        assert loop.start_entries(recipe, model, "sft", 1e3, "no", tmp_path, resumed=False)["precision"] == "fp32"
    # auto's compile figures were measured under native bf16: emulated bf16 finds none
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    monkeypatch.setattr(loop, "_SAID_BF16", {"cpu"})
    recipe = load_config(None, ["model.compile=auto"])
    rule = loop.start_entries(recipe, model, "sft", 1e12, "bf16", tmp_path, resumed=False)["compile_rule"]
    assert rule == "auto: no compile figures measured for emulated bf16 sft passes on cpu"
