import json

import pytest
import torch

from thinkforge import models, tiny
from thinkforge.arch import ARCHS
from thinkforge.config import InitConfig, validate
from thinkforge.errors import UserError

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {"phi": ["q_proj", "k_proj", "v_proj", "dense"],  # the Infused Phi-2 card's, written out: not read from the table
           "phi3": ["qkv_proj", "o_proj"], "llama": QKVO, "mistral": QKVO, "qwen2": QKVO, "qwen3": QKVO}


def test_every_row_has_its_lora_targets_written_out_here():
    assert set(TARGETS) == set(ARCHS)  # a new row needs its expected targets below


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_inits_loads_and_takes_lora(tmp_path, arch):
    """Every row of arch.ARCHS makes a tiny model of its class, whose default LoRA targets are the expected ones,
    exist and are adapted."""
    path = tiny.init_model(tmp_path / arch, InitConfig(arch=arch, hidden=32, layers=1, heads=2))
    model, tok = models.load(str(path))
    assert model.config.model_type == arch and type(model).__name__ == ARCHS[arch].model_class
    targets = models.default_lora_targets(model)
    assert targets == TARGETS[arch]
    peft_model = models.add_lora(model, r=4, alpha=8)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(targets) <= {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_without_dropout_the_training_pass_is_the_eval_pass(tmp_path, arch, gradient_checkpointing):
    """Every dropout of the config (residual, embedding, attention) at 0.3 and LoRA's at 0.3: after
    disable_dropout a training-mode forward, loss and gradients included, equals the eval-mode one (RL and DPO
    compare the two: PITFALLS 22); before it, it does not. The saved config keeps its dropout."""
    from conftest import random_lora, with_dropout

    path = with_dropout(tiny.init_model(tmp_path / arch, InitConfig(arch=arch, hidden=32, layers=2, heads=2)), 0.3)
    model, tok = models.load(path, gradient_checkpointing=gradient_checkpointing)
    model = random_lora(model, 4, 8, 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3  # LoRA's (random_lora takes add_lora's default, the recipes' 0.05)
    ids = tok("Mia has 3 apples and buys 4 more.", return_tensors="pt").input_ids

    def forward(training: bool):
        model.train(training)
        torch.manual_seed(0)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        return [out.logits, *grads]

    assert not torch.allclose(forward(True)[0], forward(False)[0], atol=1e-3)
    models.disable_dropout(model)
    assert all(torch.equal(a, b) for a, b in zip(forward(True), forward(False), strict=True))
    saved = json.loads((models.save(model, tok, tmp_path / "out", merged=True) / "config.json").read_text())
    assert [v for k, v in saved.items() if "pdrop" in k or "dropout" in k] == [0.3] * (3 if arch.startswith("phi") else 1)


def test_a_random_layer_disable_dropout_does_not_know_stops_the_stage(tiny_model):
    model, _ = models.load(tiny_model)
    noise = model.model.layers[0].mlp.register_forward_hook(lambda m, _, out: out + 0.1 * torch.randn_like(out) if m.training else out)
    with pytest.raises(RuntimeError, match="training-mode forward still differs from the eval-mode one"):
        models.disable_dropout(model)
    noise.remove()
    models.disable_dropout(model)


def test_tokenizer_has_template_and_visible_reasoning_tags(tiny_loaded):
    _, tok = tiny_loaded
    assert tok.chat_template
    ids = tok("<think>1 + 2 = 3</think><answer>3</answer>", add_special_tokens=False).input_ids
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tok.convert_tokens_to_ids(tag) in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>1 + 2 = 3</think><answer>3</answer>"
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False).input_ids) == ["1", "2", "3"]


def _card_snippet_load(base, adapter):
    """The Infused Phi-2 card's loading code, pointed at our folders."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(base_model, adapter)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def test_adapter_folder_loads_with_the_card_snippet_and_merges(tiny_model, tmp_path, monkeypatch):
    model, tok = models.load(tiny_model)
    lora = models.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # make the adapter change the output
    lora.eval()  # LoRA dropout off
    ids = tok("Mia has 3 apples.", return_tensors="pt").input_ids
    want = lora(ids).logits
    adapter_dir = models.save(lora, tok, tmp_path / "adapter")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].startswith("/")  # loadable from any directory
    assert not list(adapter_dir.glob("*.bin")) and list(adapter_dir.glob("*.safetensors"))
    card = (adapter_dir / "README.md").read_text()  # our card with the Hub's metadata, not PEFT's empty template
    assert card.startswith(f"---\nbase_model: {json.dumps(cfg['base_model_name_or_path'])}\nlibrary_name: peft\n")
    assert "More Information Needed" not in card and "PeftModel.from_pretrained" in card

    monkeypatch.chdir(tmp_path)
    loaded, _ = _card_snippet_load(cfg["base_model_name_or_path"], str(adapter_dir))
    assert torch.allclose(loaded(ids).logits, want, atol=1e-5)
    via_ours, _ = models.load(str(adapter_dir))
    assert torch.allclose(via_ours(ids).logits, want, atol=1e-5)

    merged_dir = models.save(lora, tok, tmp_path / "merged", merged=True)
    assert not (merged_dir / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert torch.allclose(plain(ids).logits, want, atol=1e-4)


def test_gradient_checkpointing_is_switched_on(tiny_model):
    model, _ = models.load(tiny_model, gradient_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_missing_and_bad_folders(tmp_path):
    with pytest.raises(UserError, match="not found"):
        models.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        models.load(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="init-model: config key 'arch'"):
        tiny.init_model(tmp_path / "x", validate({"arch": "gpt5"}, InitConfig, "init-model"))
    with pytest.raises(UserError, match="not divisible"):
        validate({"hidden": 30, "heads": 4}, InitConfig, "init-model")


def test_unknown_architecture_needs_explicit_lora_targets(tiny_loaded):
    model, _ = tiny_loaded
    with pytest.raises(UserError, match="not in this model"):
        models.add_lora(model, target_modules=["c_attn"])


def test_eval_mode_turns_dropout_off_inside_and_restores_the_mode_after_an_error_too():
    import torch

    from thinkforge.models import eval_mode

    layer = torch.nn.Dropout(0.5).train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(layer):
            assert not layer.training
            raise RuntimeError("inside")
    assert layer.training  # restored after the error (the hand-written toggles it replaces did not)
    with eval_mode(layer.eval()):
        pass
    assert not layer.training
