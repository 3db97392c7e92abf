"""The chunked output head (train/head.py) computes what the full (T, V) logits computed, without them."""

import pytest
import torch

from thinkforge.config import InitConfig
from thinkforge.losses import IGNORE, shift_labels, token_logprobs
from thinkforge.tiny import tiny_config
from thinkforge.train.head import hidden_states

VOCAB = 211


def _model(arch: str, lora: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(tiny_config(InitConfig(arch=arch, hidden=32, layers=2, heads=4), VOCAB, **ids))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                                 init_lora_weights=False))
    return model.eval()  # no dropout: both paths must see one function


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 17), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 12:] = 0  # right padding
    labels = ids.masked_fill(attn == 0, IGNORE)
    labels[:, :5] = IGNORE  # a prompt without loss
    labels[2, 9] = IGNORE
    return ids, attn, labels


def _record_masks(monkeypatch) -> list:
    """Every call of train/attention.py's attention from here on, as (query length, the mask's dims or None);
    patched before `use_document_attention` registers it."""
    from thinkforge.train import attention

    calls: list = []
    real = attention.document_attention

    def spy(module, q, k, v, attention_mask, **kw):
        calls.append((q.shape[2], None if attention_mask is None else attention_mask.dim()))
        return real(module, q, k, v, attention_mask, **kw)

    monkeypatch.setattr(attention, "document_attention", spy)
    return calls


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch,lora", [("phi3", False), ("qwen2", False), ("phi3", True)])  # untied, tied, LoRA on it
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_probs_and_gradients_equal_the_full_logits(arch, lora, temperature):
    model = _model(arch, lora)
    if arch == "qwen2":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ids, attn, labels = _batch()
    targets = shift_labels(labels)
    weights = torch.linspace(0.5, 1.5, ids.numel()).view(ids.shape)  # a loss that weighs every position apart

    full, mask = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, targets, temperature)
    g_full = _grads(model, (full * weights).sum())
    for chunk in (1, 4, 1000):
        with hidden_states(model, chunk) as head:
            hidden = model(input_ids=ids, attention_mask=attn).logits
        assert hidden.shape == (*ids.shape, model.config.hidden_size)  # the forward made no logits
        logp, m = head.logprobs(hidden, targets, temperature)
        assert torch.equal(m, mask)
        assert torch.allclose(logp, full.detach(), atol=1e-5)
        assert torch.allclose(_grads(model, (logp * weights).sum()), g_full, atol=1e-5, rtol=1e-4)
    assert model.get_output_embeddings() is not None and not isinstance(model.get_output_embeddings(), torch.nn.Identity)


def test_under_bf16_autocast_the_head_rounds_as_the_full_logits_do():
    model = _model("phi3")
    ids, attn, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, shift_labels(labels))
        with hidden_states(model, 5) as head:
            hidden = model(input_ids=ids, attention_mask=attn).logits
        logp, _ = head.logprobs(hidden, shift_labels(labels))
    assert torch.allclose(logp, full, atol=1e-6)


def test_no_call_of_the_output_layer_sees_more_than_a_chunk_of_labelled_tokens():
    """The point of the head: the (T, V) logits never exist. Every call of the output layer, forward and the
    backward's recomputation, gets at most `chunk` rows, and unlabelled positions never reach it."""
    model = _model("phi3")
    ids, attn, labels = _batch()
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    with hidden_states(model, 4) as head:
        hidden = model(input_ids=ids, attention_mask=attn).logits
    logp, mask = head.logprobs(hidden, shift_labels(labels), with_entropy=False)
    logp.sum().backward()
    hook.remove()
    labelled = int(mask.sum())
    assert max(rows) <= 4 and sum(rows) == 2 * labelled  # once forward, once recomputed in backward


def test_the_entropy_is_the_full_softmax_entropy_on_labelled_positions():
    from thinkforge.losses import masked_mean

    model = _model("qwen2")
    ids, attn, labels = _batch()
    targets = shift_labels(labels)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        with hidden_states(model, 3) as head:
            hidden = model(input_ids=ids, attention_mask=attn).logits
        _, mask, ent = head.logprobs(hidden, targets, 0.5, with_entropy=True)  # the entropy is untempered
    assert torch.allclose(ent, want * mask, atol=1e-5)
    assert masked_mean(ent, mask).item() == pytest.approx(masked_mean(want, mask).item(), abs=1e-6)


def test_a_model_that_transforms_its_logits_after_the_output_layer_is_refused():
    model = _model("phi3")
    model.config.final_logit_softcapping = 30.0
    from thinkforge.errors import UserError

    with pytest.raises(UserError, match="final_logit_softcapping=30.0"):
        with hidden_states(model):
            pass


@pytest.mark.parametrize("stage", ["midtrain", "sft", "dpo", "rl"])
def test_every_stage_steps_alike_with_gradient_checkpointing(tiny_model, tmp_path, stage):
    """Long rows need activation checkpointing: each stage's first step (its loss and gradient norm) is the same
    with it on, through the chunked head and (RL, DPO) the whole-row layout checkpointing takes. (Weights after
    an AdamW step are no test: Adam turns a 1e-9 gradient into a full lr step either way.)"""
    import json

    from test_dpo import _pairs_file
    from test_sft import _data

    from thinkforge.config import load_config
    from thinkforge.stages import STAGES

    data = {"midtrain": _data, "sft": _data, "dpo": _pairs_file, "rl": lambda p: None}[stage](tmp_path)
    common = [f"model.name_or_path={tiny_model}", "model.system_prompt=Think.", f"{stage}.optim.lr=1e-3",
              f"{stage}.head_chunk=7"]
    extra = {"rl": ["rl.steps=1", "rl.preflight=false", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=12",
                    "rl.truncation=none", "rl.beta=0.04", "rl.reward=weighted", "rl.micro_batch=3",
                    "rewards.weights={'user_rewards:shorter_is_better': 1.0}"],
             "dpo": ["dpo.max_steps=1", "dpo.batch_size=4", "dpo.grad_accum=1"]}.get(
        stage, [f"{stage}.max_steps=1", f"{stage}.batch_size=4", f"{stage}.grad_accum=1", f"{stage}.max_len=256"])
    runs = {}
    for on in (False, True):
        recipe = load_config(None, [*common, *extra, f"model.gradient_checkpointing={str(on).lower()}"])
        STAGES[stage].run(recipe, tmp_path / str(on), data=str(data) if data else None, progress=False)
        rows = [json.loads(x) for x in (tmp_path / str(on) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        runs[on] = rows[0]["loss"], rows[0]["grad_norm"]
    assert runs[True][0] == pytest.approx(runs[False][0], abs=5e-6)  # metrics keep 6 decimals
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5) and runs[True][1] > 0


@pytest.mark.parametrize("arch", ["phi3", "qwen2", "phi"])  # kv heads = heads, grouped (GQA), partial rotary
def test_document_attention_equals_the_masked_packed_row_without_a_t_by_t_mask(arch, monkeypatch):
    """A packed row (documents of 7, 9 and 4 tokens, and a row of one) through train/attention.py gives the
    logits and gradients of transformers' block-diagonal mask, and no mask is built at all."""
    from transformers import AutoModelForCausalLM

    from thinkforge.train.attention import use_document_attention

    torch.manual_seed(0)
    ids_ = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(tiny_config(InitConfig(arch=arch, hidden=32, layers=2, heads=4), VOCAB, **ids_),
                                             attn_implementation="sdpa").eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[*range(7), *range(9), *range(4)], list(range(20))])

    def run():
        model.zero_grad()
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    masked, g_masked = run()
    padded = torch.ones(2, 20, dtype=torch.long)
    padded[0, :5] = 0  # a left-padded batch, as generation sees it
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=padded).logits

    masks = _record_masks(monkeypatch)
    assert use_document_attention(model) and model.config._attn_implementation == "thinkforge_documents"
    mine, g_mine = run()
    assert len(masks) == model.config.num_hidden_layers and all(m is None for _, m in masks)  # no (T, T) mask made
    assert torch.allclose(mine, masked, atol=1e-5) and torch.allclose(g_mine, g_masked, atol=1e-5)
    alone = model(input_ids=ids[:1, 7:16], use_cache=False).logits  # the second document by itself
    assert torch.allclose(mine[0, 7:16], alone[0], atol=1e-5)
    with torch.no_grad():  # padded rows and a cache after the switch: transformers' own mask, the same numbers
        after = model(input_ids=ids, attention_mask=padded).logits
    assert torch.allclose(after[:, 5:], before[:, 5:], atol=1e-5) and torch.allclose(after[1], before[1], atol=1e-5)


@pytest.mark.parametrize("window", [8, 64])
def test_a_sliding_window_keeps_transformers_mask_where_it_bites(window, monkeypatch):
    """A window shorter than the row (8) keeps transformers' mask and numbers; one that covers the row (64,
    as Phi-4-mini's covers its context) is plain causal attention and takes the mask-free paths."""
    from transformers import AutoModelForCausalLM

    from thinkforge.train import attention

    def build():
        torch.manual_seed(0)
        config = tiny_config(InitConfig(arch="phi3", hidden=32, layers=2, heads=4), VOCAB, bos_token_id=0,
                             eos_token_id=0, pad_token_id=1)
        config.sliding_window = window
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()

    ids = torch.randint(2, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    packed = torch.tensor([[*range(12), *range(8)], list(range(20))])
    padded = torch.ones(2, 20, dtype=torch.long)
    padded[0, :5] = 0
    calls = [dict(input_ids=ids, position_ids=packed, use_cache=False), dict(input_ids=ids, attention_mask=padded)]
    with torch.no_grad():
        want = [build()(**c).logits for c in calls]
    masks = _record_masks(monkeypatch)
    monkeypatch.setattr(attention, "SMALL_MASK", 0)
    model = build()
    assert attention.use_document_attention(model)
    with torch.no_grad():
        got = [model(**c).logits for c in calls]
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert torch.allclose(got[1][:, 5:], want[1][:, 5:], atol=1e-5) and torch.allclose(got[1][1], want[1][1], atol=1e-5)
    assert {m for _, m in masks} == ({4} if window == 8 else {None, 2})  # biting: transformers' (B, 1, T, T); else none built


def test_a_soft_capped_attention_keeps_its_own_implementation():
    from transformers import AutoModelForCausalLM

    from thinkforge.train.attention import use_document_attention

    config = tiny_config(InitConfig(arch="phi3", hidden=32, layers=1, heads=4), VOCAB, bos_token_id=0, eos_token_id=0,
                         pad_token_id=1)
    config.attn_logit_softcapping = 50.0
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert not use_document_attention(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["phi3", "qwen2", "phi", "llama"])
@pytest.mark.parametrize("layout", ["packed", "packed, causal bias", "padded on the cache", "one pass"])
def test_long_padded_rows_equal_the_masked_ones_without_a_q_by_k_mask(arch, layout, monkeypatch):
    """RL and DPO rows (prompts padded on the left, completions on the right: packed in one row on top of their
    prompt's cache, padded on the cache repeated, or prompt and completion in one pass) through
    train/attention.py give the log-probs and gradients of transformers' (B, 1, Q, K) mask, and no such mask is
    built. The completions' lengths straddle the prompts' (the packed masks' both shapes), two are a single token,
    and two of a prompt share a length (one packed call for both). "causal bias": the packed calls as CUDA runs
    them (torch's bottom-right CausalBias, grouped heads repeated), here through the bias's CPU fallback."""
    from transformers import AutoModelForCausalLM

    from thinkforge.rollout.types import Rollout
    from thinkforge.train import attention, forward
    from thinkforge.train.forward import forward_logp

    share_prompt = layout != "one pass"
    if layout == "padded on the cache":
        monkeypatch.setattr(forward, "packable", lambda *a: False)
    biases = []
    if layout == "packed, causal bias":
        monkeypatch.setattr(attention, "lower_right_kernel", lambda device: True)
        real_mask = attention.Packed._mask
        monkeypatch.setattr(attention.Packed, "_mask", lambda *a: biases.append(real_mask(*a)) or biases[-1])
    packed_runs = []
    real_states = forward.packed_states
    monkeypatch.setattr(forward, "packed_states", lambda *a: packed_runs.append(1) or real_states(*a))

    def build():
        torch.manual_seed(0)
        ids_ = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
        return AutoModelForCausalLM.from_config(tiny_config(InitConfig(arch=arch, hidden=32, layers=2, heads=4), VOCAB,
                                                            **ids_), attn_implementation="sdpa").eval()

    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(2, VOCAB, (n,), generator=g).tolist()

    batch = Rollout.build([ids(4), ids(9)], [ids(6), ids(6), ids(11), ids(1), ids(1), ids(8)], [0, 0, 0, 1, 1, 1], 1,
                          rewards=[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], temperature=0.7)

    def run(model):
        model.zero_grad()
        logp = forward_logp(model, batch, slice(0, 6), share_prompt=share_prompt)[0]
        (logp * batch.completion_mask * torch.linspace(0.5, 1.5, logp.numel()).view(logp.shape)).sum().backward()
        return (logp * batch.completion_mask).detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    want, g_want = run(build())
    masks = _record_masks(monkeypatch)
    monkeypatch.setattr(attention, "SMALL_MASK", 0)  # these short rows take the long rows' path
    model = build()
    assert attention.use_document_attention(model)
    got, g_got = run(model)
    # every layer got the (B, K) valid keys, or (the packed completions) no mask; never a (B, 1, Q, K) mask
    packed = layout.startswith("packed")
    assert masks and {m for _, m in masks} == ({2, None} if packed else {2})
    assert len(packed_runs) == packed
    assert {type(b).__name__ for b in biases} == ({"CausalBias"} if layout == "packed, causal bias" else set())
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(g_got, g_want, atol=1e-5)


def test_a_causal_bias_gets_autocasts_dtype_and_repeated_heads(monkeypatch):
    """The packed calls' CausalBias (CUDA) reaches its kernels past autocast and past sdpa's grouped-query handling:
    `_sdpa` hands it q/k/v in autocast's dtype with the key/value heads repeated, and it computes what the bool
    mask computes (bottom-right causal: every prompt key, then the completion's own causally)."""
    from torch.nn.attention.bias import CausalBias, causal_lower_right

    from thinkforge.train.attention import _sdpa

    seen = []
    real = CausalBias._dispatch
    monkeypatch.setattr(CausalBias, "_dispatch", staticmethod(lambda q, k, v, *a, **kw: seen.append(
        (q.dtype, k.dtype, v.dtype, k.shape[1])) or real(q, k, v, *a, **kw)))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    keys = torch.arange(7) <= torch.arange(4, 7)[:, None]  # 4 prompt keys, then causal over 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _sdpa(q, k, v, causal_lower_right(3, 7), dropout=0.0, scaling=None)
        want = _sdpa(q, k, v, keys, dropout=0.0, scaling=None)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, 4)]
    assert got.dtype == want.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=2e-2)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as on CUDA: q, k fp32 after the rotation, v from a bf16 cache
        mixed = _sdpa(q, k, v.bfloat16(), causal_lower_right(3, 7), dropout=0.0, scaling=None)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, 4)] and torch.allclose(mixed.float(), want.float(), atol=2e-2)
    seen.clear()
    got = _sdpa(q, k, v, causal_lower_right(3, 7), dropout=0.0, scaling=None)  # no autocast: as given
    assert seen == [(torch.float32, torch.float32, torch.float32, 4)]
    assert torch.allclose(got, _sdpa(q, k, v, keys, dropout=0.0, scaling=None), atol=1e-6)


def test_the_padded_layout_says_why_the_completions_are_not_packed(monkeypatch):
    """Each reason the packed layout is refused is named (once per reason, as a warning); a refused layout
    runs padded, which gives the same numbers (the test above)."""
    from transformers import AutoModelForCausalLM

    from thinkforge.train import attention
    from thinkforge.train.forward import packable, unpackable

    def build(**extra):
        config = tiny_config(InitConfig(arch="phi3", hidden=32, layers=2, heads=4), VOCAB, bos_token_id=0,
                             eos_token_id=0, pad_token_id=1)
        for k, v in extra.items():
            setattr(config, k, v)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        attention.use_document_attention(model)
        return model

    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    model = build()
    assert unpackable(model, left, right) is None and packable(model, left, right)
    assert not packable(model, left, torch.zeros_like(right))  # nothing to run: no reason, no warning
    assert "left-padded" in unpackable(model, left.flip(-1), right)
    assert "right-padded" in unpackable(model, left, right.flip(-1))
    assert "sliding window of 5" in unpackable(build(sliding_window=5), left, right)
    assert unpackable(build(sliding_window=7), left, right) is None  # as long as the rows: plain causal
    assert "2 layers share" in unpackable(build(num_kv_shared_layers=2), left, right)
    plain = AutoModelForCausalLM.from_config(model.config.__class__(**{**model.config.to_dict(),
                                                                       "_attn_implementation": "eager"}))
    assert "'eager'" in unpackable(plain, left, right)
    with pytest.warns(UserWarning, match="not packed: the completions are not right-padded"):
        assert not packable(model, left, right.flip(-1))


def test_padded_attention_with_valid_keys_in_several_runs_uses_that_rows_mask():
    """A row whose valid keys are not one run (not a layout thinkforge makes) is still right: its own mask."""
    import torch.nn.functional as F

    from thinkforge.train.attention import padded_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    keys = torch.ones(2, 9, dtype=torch.bool)
    keys[0, 2] = False  # a hole
    keys[1, :3] = False  # left padding
    k9, v9 = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(2))
    got = padded_attention(q, k9, v9, keys)  # (B, Q, H, hd): queries at positions 4..8
    causal = torch.arange(9) <= torch.arange(4, 9)[:, None]
    want = F.scaled_dot_product_attention(q, k9, v9, attn_mask=(causal & keys[:, None, None, :])).transpose(1, 2)
    assert torch.allclose(got, want, atol=1e-6)


def test_generation_and_unpadded_batches_through_the_switched_model_are_unchanged(monkeypatch):
    """The policy generates with the switched model: a long prefill takes the padded path, one-token decode
    steps keep transformers' small mask, an unpadded batch runs one batched causal call; the tokens and
    logits are those of the unswitched model."""
    from transformers import AutoModelForCausalLM

    from thinkforge.engine.decode import Prompts, decode
    from thinkforge.rollout.types import SamplingParams
    from thinkforge.train import attention

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config(InitConfig(arch="qwen2", hidden=32, layers=2, heads=4), VOCAB,
                                                            bos_token_id=0, eos_token_id=0, pad_token_id=1),
                                                attn_implementation="sdpa").eval()

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 6)]
    params = SamplingParams(12, 0.0, 1.0, 0, 0)
    plain = build()
    want = decode(plain, Prompts(prompts, 2, [0], 1), params)
    ids = torch.randint(2, VOCAB, (2, 10), generator=g)
    with torch.no_grad():
        want_logits = plain(input_ids=ids, position_ids=torch.arange(10).expand(2, -1), use_cache=False).logits
    masks = _record_masks(monkeypatch)
    monkeypatch.setattr(attention, "SMALL_MASK", 0)
    model = build()
    assert attention.use_document_attention(model)
    assert decode(model, Prompts(prompts, 2, [0], 1), params) == want
    assert masks[0] == (9, 2) and {m for q, m in masks if q == 1} == {4}  # prefill: valid keys; steps: sdpa's mask
    masks.clear()
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=torch.arange(10).expand(2, -1), use_cache=False).logits
    assert torch.allclose(got, want_logits, atol=1e-5) and {m for _, m in masks} == {None}


@pytest.mark.parametrize("how", ["eager", "sinks"])
def test_models_whose_attention_is_more_than_sdpa_keep_their_own(how):
    """An eager-loaded model, and GPT-OSS (learned attention sinks, no sdpa), are not switched; a forced switch
    of a model passing sinks raises instead of dropping them."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from thinkforge.train import attention

    if how == "eager":
        config = tiny_config(InitConfig(arch="phi3", hidden=32, layers=1, heads=4), VOCAB, bos_token_id=0,
                             eos_token_id=0, pad_token_id=1)
    else:
        config = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                              num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert not attention.use_document_attention(model) and model.config._attn_implementation == "eager"
    if how == "sinks":
        from transformers import AttentionInterface

        AttentionInterface.register(attention.NAME, attention.document_attention)
        model.config._attn_implementation_internal = attention.NAME
        with pytest.raises(RuntimeError, match="s_aux"):
            model(input_ids=torch.randint(2, VOCAB, (1, 6)), use_cache=False)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_the_temperature_on_the_hidden_state_only_where_the_output_layer_is_linear_without_a_bias(lora_bias):
    """W (h / T) = (W h) / T for a bias-free output layer, LoRA on it included; an adapter with a bias of its own
    (peft's lora_bias) is not: it takes the logits' division, and both give the tempered log-probs."""
    from peft import LoraConfig, get_peft_model

    from thinkforge.train.head import Head

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("out", torch.nn.Linear(8, 16, bias=False))
    net = get_peft_model(net, LoraConfig(r=2, target_modules=["out"], lora_bias=lora_bias))
    layer = net.base_model.model.out
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))  # B (and the adapter's bias) away from zero
    head = Head(layer, 16)
    assert head.linear_without_bias is not lora_bias
    h, t = torch.randn(1, 5, 8), torch.randint(0, 16, (1, 5))
    want = torch.log_softmax(layer(h) / 0.5, -1).gather(-1, t[..., None])[..., 0]
    assert torch.allclose(head.logprobs(h, t, 0.5)[0], want, atol=1e-5)
