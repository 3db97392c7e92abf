import re

import pytest

from thinkforge.config import Recipe, load_config
from thinkforge.errors import UserError


def test_defaults_follow_the_infused_phi2_card():
    r = Recipe()
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 32, 0.05)
    assert r.rewards.weights == {"correctness": 1.0, "reasoning": 0.7, "format": 0.3}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("seed: 3\ngeneration:\n  temperature: 0.8\n  max_new_tokens: 64\n")
    r = load_config(path, ["generation.temperature=0.2", "eval.benchmarks=[gsm8k, math500]", "lora.enabled=true"])
    assert r.seed == 3 and r.generation.max_new_tokens == 64
    assert r.generation.temperature == 0.2
    assert r.eval.benchmarks == ["gsm8k", "math500"] and r.lora.enabled is True


def test_typo_names_the_key_and_suggests(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'generation.temprature'.*did you mean 'generation.temperature'"):
        load_config(None, ["generation.temprature=0.5"])
    path = tmp_path / "r.yaml"
    path.write_text("modle:\n  dtype: auto\n")
    with pytest.raises(UserError, match=r"r.yaml: unknown config key 'modle'; did you mean 'model'"):
        load_config(path)


def test_wrong_type_and_out_of_range_name_the_key():
    with pytest.raises(UserError, match=r"'generation.max_new_tokens'.*integer"):
        load_config(None, ["generation.max_new_tokens=many"])
    with pytest.raises(UserError, match=r"'generation.top_p'.*less than or equal to 1"):
        load_config(None, ["generation.top_p=1.5"])
    with pytest.raises(UserError, match=r"'lora.r'.*greater than or equal to 1"):
        load_config(None, ["lora.r=0"])


def test_bf16_if_native_follows_the_device(monkeypatch):
    """bf16_if_native: bf16 autocast on CUDA and on a CPU with AMX or AVX512-BF16, fp32 on other CPUs (where bf16
    products are several times slower); explicit bf16 on such a CPU is kept and said."""
    import torch

    from thinkforge.train import loop

    for amx, avx512_bf16, want in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(loop, "_cpu_features", set)  # not an Arm CPU with bf16 either
        assert loop.uses_bf16("cpu", "bf16_if_native") is want
        assert loop.compute_dtype("cpu", "bf16_if_native", torch.nn.Linear(2, 2)) == ("bfloat16" if want else "float32")
        assert loop.uses_bf16("cuda:0", "bf16_if_native") and not loop.uses_bf16("cpu", "auto")
        assert not loop.uses_bf16("mps", "bf16_if_native")
    monkeypatch.setattr(loop.platform, "machine", lambda: "aarch64")  # an Arm CPU: its feature list decides
    monkeypatch.setattr(loop, "_cpu_features", lambda: frozenset({"fp", "asimd", "bf16"}))
    assert loop.uses_bf16("cpu", "bf16_if_native")
    monkeypatch.setattr(loop, "_cpu_features", lambda: frozenset({"fp", "asimd"}))
    assert not loop.uses_bf16("cpu", "bf16_if_native")
    monkeypatch.setattr(loop, "_SAID_BF16", set())
    with pytest.warns(UserWarning, match="without native bf16") as said:
        assert loop.uses_bf16("cpu", "bf16") and loop.uses_bf16("cpu", "bf16")
    assert len([w for w in said if "native bf16" in str(w.message)]) == 1  # once a process, not every call
    assert load_config(None, ["rl.mixed_precision=bf16_if_native"]).rl.mixed_precision == "bf16_if_native"


def test_mixed_precision_no_survives_yaml(tmp_path):
    # YAML 1.1 reads a bare `no` as false; on the command line and in a recipe it means "no"
    assert load_config(None, ["sft.mixed_precision=no"]).sft.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text("dpo: {mixed_precision: no}\nrl: {mixed_precision: bf16}\n")
    recipe = load_config(path)
    assert (recipe.dpo.mixed_precision, recipe.rl.mixed_precision) == ("no", "bf16")
    with pytest.raises(UserError, match=r"'rl.mixed_precision'"):
        load_config(None, ["rl.mixed_precision=yes"])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="YAML mapping"):
        load_config(bad)
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["generation.temperature"])


@pytest.mark.parametrize("overrides,message", [
    (["rl.algo=ppo", "rl.loss_agg=sequence"], "rl.loss_agg='sequence' is a GRPO setting that rl.algo=ppo ignores"),
    (["rl.algo=ppo", "rl.balance=true"], "rl.balance=True is a GRPO setting that rl.algo=ppo ignores"),
    (["rl.algo=ppo", "rl.advantage=rloo"], "rl.advantage='rloo' is a GRPO setting"),
    (["rl.lam=0.9"], "rl.lam=0.9 is a PPO setting that rl.algo=grpo ignores; remove it or set rl.algo=ppo"),
    (["rl.value_trunk=true"], "rl.value_trunk=True is a PPO setting"),
])
def test_a_setting_the_algorithm_would_ignore_is_an_error(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_what_the_algorithm_does_anyway_is_accepted_and_old_keys_say_their_new_name():
    assert load_config(None, ["rl.algo=ppo", "rl.loss_agg=token", "rl.lam=0.9"]).rl.lam == 0.9
    assert load_config(None, ["rl.advantage=reinforce_pp", "rl.policy_loss=cispo"]).rl.policy_loss == "cispo"
    with pytest.raises(UserError, match="'rl.scale_advantages' was replaced by rl.advantage"):
        load_config(None, ["rl.scale_advantages=false"])


def test_a_stage_keeps_its_own_optimizer_defaults_for_every_key_a_recipe_leaves_out(tmp_path):
    """pydantic alone would build a nested section from OptimConfig's class defaults: `sft: {optim: {lr: ...}}`
    would silently drop SFT's 10% warmup and RL's constant schedule."""
    path = tmp_path / "r.yaml"
    path.write_text("sft: {optim: {lr: 1.0e-4}}\nrl: {optim: {lr: 1.0e-6}, checkpoints: {keep: 3}}\n")
    r = load_config(path)
    assert (r.sft.optim.lr, r.sft.optim.warmup_ratio) == (1e-4, 0.1)
    assert (r.rl.optim.lr, r.rl.optim.min_lr_ratio, r.rl.checkpoints.every, r.rl.checkpoints.keep) == (1e-6, 1.0, 50, 3)
    assert (r.midtrain.optim.warmup_ratio, r.dpo.optim.lr) == (0.1, 5e-7)
    r = load_config(None, ["rl.optim.warmup_ratio=0.05"])  # an override alone, without a recipe
    assert (r.rl.optim.lr, r.rl.optim.min_lr_ratio, r.rl.optim.warmup_ratio) == (5e-7, 1.0, 0.05)


@pytest.mark.parametrize("old,new", [("sft.lr=1e-4", "sft.optim.lr"), ("midtrain.warmup_ratio=0", "midtrain.optim.warmup_ratio"),
                                     ("dpo.clip=2", "dpo.optim.clip"), ("rl.save_every=5", "rl.checkpoints.every"),
                                     ("rl.keep_checkpoints=1", "rl.checkpoints.keep")])
def test_a_key_from_before_the_shared_optimizer_schema_is_read_as_its_new_name_with_a_warning(old, new):
    key, value = old.split("=")
    with pytest.warns(FutureWarning, match=f"'{key}' is now '{new}'"):
        r = load_config(None, [old])
    section, group, name = new.split(".")
    assert getattr(getattr(getattr(r, section), group), name) == float(value)
    with pytest.raises(UserError, match=f"'{key}' and '{new}' are both set"):
        load_config(None, [old, f"{new}={value}"])


def test_an_assigned_or_constructed_nested_section_keeps_the_stage_defaults_it_does_not_give():
    from thinkforge.config import OptimConfig, SFTConfig

    r = load_config(None, [])
    r.rl.optim = {"lr": 2e-6}
    r.rl.checkpoints = {"keep": 3}
    assert (r.rl.optim.lr, r.rl.optim.min_lr_ratio, r.rl.checkpoints.every) == (2e-6, 1.0, 50)
    assert SFTConfig(optim=OptimConfig(lr=1e-4)).optim.warmup_ratio == 0.1


def test_no_function_in_the_package_takes_more_than_six_positional_parameters():
    """Components take a few plain arguments (STYLE 6); a long positional list is a record waiting to exist
    (keyword-only options are named at every call). A stage's `main` takes the signature every stage shares
    (tests/test_layout.py) and what it needs beyond it; a CLI command (in cli.py: decorated, or a stage's
    `command`) takes its options."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parent.parent / "thinkforge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name == "main":
                continue
            if path.name == "cli.py" and (node.decorator_list or node.name == "command"):
                continue
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + bool(a.vararg) + bool(a.kwarg)
            assert n <= 6, f"{path.name}:{node.lineno} {node.name} takes {n} parameters"


@pytest.mark.parametrize("overrides,words,reader", [
    (["rl.tis_cap=2.0"], "rl.tis_cap=2.0 does nothing here: only rollout.backend=vllm", "rollout.backend=vllm"),
    (["rollout.max_model_len=1024"], "rollout.max_model_len=1024 does nothing here: only rollout.backend=vllm reads it",
     "rollout.backend=vllm"),
    (["rollout.sync_atol=0.01", "rollout.backend=openai"], "rollout.sync_atol=0.01 does nothing here",
     "rollout.backend=vllm"),
    (["rewards.weights={verifiable: 1.0}"], "rewards.weights={'verifiable': 1.0} does nothing here: only rl.reward=weighted",
     "rl.reward=weighted"),
    (["rl.temperature_start=0.9"], "rl.temperature_start=0.9 does nothing here: only rl.anneal_steps > 0",
     "rl.anneal_steps=5"),
    (["rl.data_path=p.jsonl"], "rl.data_path='p.jsonl' does nothing here: only rl.source other than synthetic",
     "rl.source=local"),
])
def test_a_setting_the_chosen_backend_or_switch_never_reads_is_a_config_error(overrides, words, reader):
    """PITFALLS 19: rl.tis_cap with the hf backend (no sampler log-probs) was silently ignored, and so were the
    others; each is one line naming what reads it, and with that set it is accepted."""
    with pytest.raises(UserError, match=re.escape(words)):
        load_config(None, overrides)
    load_config(None, [*overrides, reader])


def test_the_config_of_a_run_made_before_the_context_default_changed_still_loads(tmp_path):
    """Every config.yaml written before 2026-11-29 holds rollout.max_model_len: 4096 (the old default)."""
    path = tmp_path / "config.yaml"
    path.write_text("rollout: {backend: hf, max_model_len: 4096}\n")
    assert load_config(path).rollout.max_model_len == 4096


def test_gspo_gets_its_own_aggregation_and_a_length_weighting_one_is_refused():
    """rl.loss_agg left unset follows the policy loss (GSPO's paper averages over sequences, DAPO and CISPO over
    tokens); token or constant with GSPO would weight its sequences by length and is one line naming the fix."""
    import typing

    from thinkforge.config import OWN_AGGREGATION, RLConfig
    from thinkforge.losses import POLICY_LOSSES

    assert load_config(None, ["rl.policy_loss=gspo"]).rl.loss_agg == "sequence"
    assert load_config(None, []).rl.loss_agg == load_config(None, ["rl.policy_loss=cispo"]).rl.loss_agg == "token"
    assert load_config(None, ["rl.policy_loss=cispo", "rl.loss_agg=sequence"]).rl.loss_agg == "sequence"
    for agg in ("token", "constant"):
        with pytest.raises(UserError, match=f"rl.loss_agg='{agg}' weights each rl.policy_loss=gspo sequence by its "
                                            "length; .* remove rl.loss_agg or set it to sequence"):
            load_config(None, ["rl.policy_loss=gspo", f"rl.loss_agg={agg}"])
    with pytest.raises(UserError, match="rl.policy_loss='gspo' is a GRPO setting that rl.algo=ppo ignores"):
        load_config(None, ["rl.algo=ppo", "rl.policy_loss=gspo"])
    assert set(OWN_AGGREGATION) == set(POLICY_LOSSES) == set(typing.get_args(RLConfig.model_fields["policy_loss"].annotation))
