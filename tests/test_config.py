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


def test_bad_recipe_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="YAML mapping"):
        load_config(bad)
    with pytest.raises(UserError, match="not key=value"):
        load_config(None, ["generation.temperature"])
