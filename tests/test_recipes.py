from pathlib import Path

import pytest

from thinkforge.config import load_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_the_three_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"tiny", "phi4-mini-reasoning", "infused-phi2"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_every_key_it_sets_reaches_the_config(path):
    """Each value the YAML writes is the value the run uses (none dropped, renamed or shadowed by a default)."""
    import yaml

    recipe = load_config(path).model_dump()
    written = yaml.safe_load(path.read_text())

    def leaves(node, prefix=()):
        for k, v in node.items():
            if isinstance(v, dict) and k not in ("weights", "columns"):
                yield from leaves(v, (*prefix, k))
            else:
                yield (*prefix, k), v

    found = list(leaves(written))
    assert len(found) >= 10
    for keys, value in found:
        got = recipe
        for k in keys:
            got = got[k]
        assert got == value, ".".join(keys)


def test_infused_phi2_recipe_has_the_cards_numbers():
    r = load_config(Path(__file__).resolve().parent.parent / "recipes" / "infused-phi2.yaml")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 32, 0.05)
    assert r.lora.target_modules == ["q_proj", "k_proj", "v_proj", "dense"]
    assert (r.rl.group_size, r.rl.optim.lr, r.rl.max_new_tokens, r.rl.temperature, r.rl.checkpoints.every) == (3, 1e-5, 384, 0.8, 50)
    assert r.model.load_in_4bit and r.rewards.weights == {"correctness": 1.0, "reasoning": 0.7, "format": 0.3}


def test_phi4_recipe_has_the_papers_numbers():
    r = load_config(Path(__file__).resolve().parent.parent / "recipes" / "phi4-mini-reasoning.yaml")
    assert (r.midtrain.max_len, r.midtrain.optim.lr, r.midtrain.epochs, r.midtrain.optim.warmup_ratio, r.midtrain.packing) == (16384, 1e-5, 5, 0.1, True)
    assert (r.sft.max_len, r.sft.packing, r.dpo.optim.lr, r.dpo.epochs, r.rl.optim.lr) == (20480, False, 5e-7, 1, 5e-7)
    assert (r.rl.temperature_start, r.rl.temperature) == (1.0, 0.6)


def test_the_model_card_names_the_stages_the_lora_dropout_ran_in():
    """DPO and RL run without dropout: the card of a GRPO-only run states none (it once wrote the recipe's
    0.05, a regularisation that never ran), a pipeline with SFT names where it ran."""
    from thinkforge.report import model_card

    summary = {"final_model": "/nowhere", "stages": [], "protocol": {"benchmarks": ["synthetic"], "temperature": 0.6,
                                                                        "top_p": 0.95, "max_new_tokens": 8, "samples": 1}}
    folder = Path(__file__).resolve().parent.parent / "recipes"

    def card(name):
        return model_card(load_config(folder / f"{name}.yaml"), summary, "base")

    assert "- LoRA: r 16, alpha 32, no dropout, targets" in card("infused-phi2")  # rl only
    assert "- LoRA: r 16, alpha 32, dropout 0.05 in sft, targets" in card("smollm2-infused")  # distill, sft, rl
