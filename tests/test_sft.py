import json
from pathlib import Path

import pytest
import torch

from thinkforge.config import load_config
from thinkforge.data.packing import collate_packed, collate_padded, pack, tokenize
from thinkforge.errors import UserError
from thinkforge.formats import format_completion, render_prompt
from thinkforge.losses import IGNORE, label_mask, normaliser, sft_loss, shift_labels, token_logprobs
from thinkforge.tasks import synthetic


def _examples(tok, n=6):
    out = []
    for r in synthetic.generate(n, "train", 2, seed=5):
        thinking, answer = synthetic.worked_solution(r)
        out.append(tokenize(tok, render_prompt(r["question"], "auto", "Think.", tok), format_completion(thinking, answer), 512))
    return out


def test_packed_loss_equals_unpacked_loss(tiny_loaded):
    model, tok = tiny_loaded
    model.eval()
    examples = _examples(tok)
    bins = pack(examples, 400)
    assert len(bins) < len(examples)  # several documents really share rows
    ids, labels, pos = collate_packed(bins, 400, tok.pad_token_id)
    ids_u, labels_u, attn = collate_padded(examples, tok.pad_token_id)
    with torch.no_grad():
        packed = sft_loss(model(input_ids=ids, position_ids=pos, use_cache=False).logits, labels)
        unpacked = sft_loss(model(input_ids=ids_u, attention_mask=attn, use_cache=False).logits, labels_u)
    assert (labels != IGNORE).sum() == (labels_u != IGNORE).sum()
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-4)


def test_second_document_in_a_row_sees_only_itself(tiny_loaded):
    """Logits of a packed row's second document equal those of the document alone; with plain causal
    attention (positions not restarting) they do not, so the packed == unpacked test can fail."""
    model, tok = tiny_loaded
    model.eval()
    a, b = _examples(tok, 2)
    ids, _, pos = collate_packed([[a, b]], len(a) + len(b), tok.pad_token_id)
    alone = torch.tensor([[*b.prompt, *b.completion]])
    with torch.no_grad():
        want = model(input_ids=alone).logits[0]
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, len(a):]
        leaky = model(input_ids=ids, use_cache=False).logits[0, len(a):]
    assert (packed - want).abs().max() < 1e-4
    assert (leaky - want).abs().max() > 1e-2


def test_prompt_tokens_carry_no_loss_and_eos_is_trained(tiny_loaded):
    model, tok = tiny_loaded
    ex = _examples(tok, 1)[0]
    ids, labels, _ = collate_padded([ex], tok.pad_token_id)
    assert (labels[0, : len(ex.prompt)] == IGNORE).all()
    assert labels[0, len(ex) - 1] == tok.eos_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logp, mask = token_logprobs(logits, shift_labels(labels))
    assert mask.sum() == len(ex.completion)
    # Changing the prompt's logits at positions that predict prompt tokens changes nothing.
    bumped = logits.clone()
    bumped[0, : len(ex.prompt) - 1] += torch.randn_like(bumped[0, : len(ex.prompt) - 1])
    assert sft_loss(bumped, labels).item() == pytest.approx(sft_loss(logits, labels).item(), abs=1e-6)
    by_hand = -torch.log_softmax(logits[0], -1)[torch.arange(len(ex) - 1), ids[0, 1 : len(ex)]][len(ex.prompt) - 1 :].mean()
    assert sft_loss(logits, labels).item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_microbatches_with_accumulation_equal_one_full_batch(tiny_loaded):
    model, tok = tiny_loaded
    examples = _examples(tok, 4)

    def grads(groups):
        model.zero_grad()
        n = sum(normaliser(label_mask(collate_padded(g, tok.pad_token_id)[1])) for g in groups)
        for g in groups:
            ids, labels, attn = collate_padded(g, tok.pad_token_id)
            sft_loss(model(input_ids=ids, attention_mask=attn).logits, labels, n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    model.eval()
    full = grads([examples])
    split = grads([examples[:1], examples[1:3], examples[3:]])
    model.zero_grad()
    assert torch.allclose(full, split, atol=1e-6)


def _data(tmp_path, n=24):
    path = tmp_path / "data.jsonl"
    with path.open("w") as f:
        for r in synthetic.generate(n, "train", 1, seed=1):
            thinking, answer = synthetic.worked_solution(r)
            f.write(json.dumps({"question": r["question"], "completion": format_completion(thinking, answer)}) + "\n")
    return path


def _recipe(tiny_model, data, stage, **extra):
    over = [f"model.name_or_path={tiny_model}", "model.system_prompt=Think.", f"{stage}.data={data}",
            f"{stage}.max_len=256", f"{stage}.batch_size=2", f"{stage}.grad_accum=2", f"{stage}.optim.lr=1e-3",
            f"{stage}.epochs=1", f"{stage}.optim.warmup_ratio=0.2"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, over)


@pytest.mark.parametrize("stage", ["midtrain", "sft"])
def test_resume_continues_at_the_same_step_with_the_same_data(tiny_model, tmp_path, stage):
    from thinkforge.train import sft

    data = _data(tmp_path)
    straight = tmp_path / "straight"
    small = {f"{stage}.checkpoints.every": 2, f"{stage}.batch_size": 1, f"{stage}.grad_accum": 2, f"{stage}.max_len": 128}
    sft.main(_recipe(tiny_model, data, stage, **small), stage, straight, progress=False)

    cut = tmp_path / "cut"
    assert sft.main(_recipe(tiny_model, data, stage, **small), stage, cut, progress=False, stop_after=3) is None
    assert (cut / "step-0000003").is_dir() and not (cut / "final").exists()
    sft.main(_recipe(tiny_model, data, stage, **small), stage, cut, progress=False)

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    a, b = rows(straight), rows(cut)
    assert len(a) >= 5
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    from safetensors.torch import load_file

    wa = load_file(str(straight / "final" / "model.safetensors"))
    wb = load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_learns_and_logs(tiny_model, tmp_path):
    from thinkforge.train import sft

    data = _data(tmp_path, 16)
    run = tmp_path / "run"
    final = sft.main(_recipe(tiny_model, data, "midtrain", **{"midtrain.epochs": 6, "midtrain.batch_size": 1,
                                                        "midtrain.grad_accum": 1, "midtrain.max_len": 128}), "midtrain", run, progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] * 0.8
    assert all(0 < r["nonpad_share"] <= 1 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert (final / "config.json").is_file() and list((run / "tensorboard").iterdir())


def test_lora_sft_saves_an_adapter(tiny_model, tmp_path):
    from thinkforge.train import sft

    data = _data(tmp_path, 8)
    final = sft.main(_recipe(tiny_model, data, "sft", **{"lora.enabled": "true", "lora.r": 4}), "sft", tmp_path / "r",
                     progress=False)
    assert (final / "adapter_config.json").is_file()


def test_a_step_at_the_recipes_lr_moves_the_weights_with_a_bf16_model_dtype(tiny_model, tmp_path):
    """The Phi-4 recipe sets model.dtype bfloat16 and lr 5e-7 (DPO, RL): the trained weights are fp32 master
    weights, so one AdamW step (~lr) changes nearly every weight; bf16 weights updated in place would keep
    all but a few (below half an ulp): the run would train nothing with nothing in the logs."""
    from safetensors.torch import load_file

    from thinkforge.train import sft

    data = _data(tmp_path, 8)

    def changed(**extra):
        over = {"model.dtype": "bfloat16", "sft.optim.lr": 5e-7, "sft.optim.warmup_ratio": 0.0, "sft.max_steps": 1,
                "sft.batch_size": 2, "sft.grad_accum": 1, "sft.max_len": 128, **extra}
        final = sft.main(_recipe(tiny_model, data, "sft", **over), "sft", tmp_path / str(len(list(tmp_path.iterdir()))),
                         progress=False)
        after = load_file(str(final / "model.safetensors"))
        start = load_file(str(Path(tiny_model) / "model.safetensors"))
        moved = sum(int((after[k] != start[k].to(after[k].dtype)).sum()) for k in start)
        return moved / sum(v.numel() for v in start.values()), {v.dtype for v in after.values()}

    share, dtypes = changed()
    assert share > 0.8 and dtypes == {torch.float32}  # measured 0.9x
    share, dtypes = changed(**{"model.trainable_dtype": "pure_bfloat16"})
    assert share < 0.05 and dtypes == {torch.bfloat16}  # the trap, asked for by name


def test_a_low_precision_trainable_dtype_without_asking_by_name_is_a_config_error():
    with pytest.raises(UserError, match="model.trainable_dtype=bfloat16 would update bfloat16 weights in place.*pure_bfloat16"):
        load_config(None, ["model.trainable_dtype=bfloat16"])


def test_a_prompt_that_prefills_think_is_not_followed_by_a_second_one_in_the_target(tiny_loaded):
    """Graded rollouts of a template that pre-fills <think> are stored as whole responses ("<think>..."):
    the training target starts inside the thinking, never with a second <think>."""
    _, tok = tiny_loaded
    opened = tokenize(tok, "<|assistant|><think>", "<think>2 + 2 = 4</think><answer>4</answer>", 256)
    plain = tokenize(tok, "<|assistant|><think>", "2 + 2 = 4</think><answer>4</answer>", 256)
    assert opened == plain
    kept = tokenize(tok, "Question:", "<think>a</think>", 256).completion  # a prompt that opens nothing: kept whole
    assert tok.decode(list(kept)).startswith("<think>a")
