import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from thinkforge.config import load_config
from thinkforge.data import pairs as pairs_mod
from thinkforge.errors import UserError
from thinkforge.losses import IGNORE, dpo_loss, sequence_logprobs


def test_dpo_loss_matches_the_formula_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -5.0])
    beta = 0.5
    losses, m = dpo_loss(pc, pr, rc, rr, beta)
    loss = losses.mean()
    # h_w = [0.5, 0.0], h_l = [-1.0, 0.5]; beta (h_w - h_l) = [0.75, -0.25]
    want = (-math.log(1 / (1 + math.exp(-0.75))) - math.log(1 / (1 + math.exp(0.25)))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["reward_chosen"] == pytest.approx(0.5 * (0.5 + 0.0) / 2)
    assert m["reward_rejected"] == pytest.approx(0.5 * (-1.0 + 0.5) / 2)
    assert m["margin"] == pytest.approx((0.75 - 0.25) / 2)
    assert m["preference_accuracy"] == 0.5
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert ipo.mean().item() == pytest.approx(((1.5 - 1.0) ** 2 + (-0.5 - 1.0) ** 2) / 2)


def test_sequence_logprobs_sum_completion_tokens_only():
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1]])
    lp = F.log_softmax(logits[0], -1)
    assert sequence_logprobs(logits, labels).item() == pytest.approx((lp[1, 3] + lp[2, 1]).item(), abs=1e-6)


def test_loss_matches_trl_dpo_on_the_same_batch_and_model(tiny_model, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs from the policy
    rows = [{"prompt": "Mia has 3 apples. ", "chosen": "<think>3 + 1 = 4</think><answer>4</answer>",
             "rejected": "<think>3 + 1 = 5</think><answer>5</answer>"},
            {"prompt": "Leo has 7 books. ", "chosen": "<think>7 - 2 = 5</think><answer>5</answer>",
             "rejected": "<answer>9</answer>"}]
    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    policy.eval()
    ref.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(policy, batch, False)
        trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
        ours = []
        for model in (policy, ref):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ours.append(sequence_logprobs(logits, labels).chunk(2))
    losses, _ = dpo_loss(ours[0][0], ours[0][1], ours[1][0], ours[1][1], beta=0.1)
    loss = losses.mean()
    assert abs(loss.item() - math.log(2)) > 1e-3  # not the trivial policy == reference value
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)


def test_pairs_prefer_similar_lengths_and_skip_one_sided_problems():
    rows = [
        {"problem_id": "a", "question": "q", "completion": "right short", "correct": True, "teacher": "t"},
        {"problem_id": "a", "question": "q", "completion": "right and a much much longer text", "correct": True, "teacher": "policy"},
        {"problem_id": "a", "question": "q", "completion": "wrong long text of similar size ok", "correct": False, "teacher": "policy"},
        {"problem_id": "a", "question": "q", "completion": "wrong", "correct": False, "teacher": "t"},
        {"problem_id": "b", "question": "q", "completion": "only right", "correct": True, "teacher": "t"},
    ]
    pairs, stats = pairs_mod.build(rows, per_problem=2)
    assert stats == {"problems": 2, "problems_with_both": 1, "skipped_missing_side": 1, "pairs": 2,
                     "cut_off_correct_dropped": 0}
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) in {("right short", "wrong"),
                                                           ("right and a much much longer text", "wrong long text of similar size ok")}
    assert {p["chosen"] for p in pairs} == {"right short", "right and a much much longer text"}  # each used once
    assert pairs[0]["chosen_source"] in ("t", "policy")


def _pairs_file(tmp_path, n=12):
    from thinkforge.tasks import synthetic

    out = tmp_path / "pairs.jsonl"
    with out.open("w") as f:
        for r in synthetic.generate(n, "train", 1, seed=2):
            thinking, answer = synthetic.worked_solution(r)
            f.write(json.dumps({"question": r["question"], "chosen": f"<think>{thinking}</think><answer>{answer}</answer>",
                                "rejected": f"<think>{thinking}</think><answer>{int(answer) + 1}</answer>"}) + "\n")
    return out


def _recipe(tiny_model, data, **extra):
    over = [f"model.name_or_path={tiny_model}", "model.system_prompt=Think.", f"dpo.data={data}", "dpo.max_len=256",
            "dpo.batch_size=2", "dpo.grad_accum=2", "dpo.optim.lr=1e-3", "dpo.epochs=3", "dpo.optim.warmup_ratio=0"]
    return load_config(None, over + [f"{k}={v}" for k, v in extra.items()])


def test_dpo_raises_preference_for_chosen_and_resumes_exactly(tiny_model, tmp_path):
    from thinkforge.train import dpo

    data = _pairs_file(tmp_path)
    straight = dpo.main(_recipe(tiny_model, data), "dpo", tmp_path / "a", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert rows[-1]["margin"] > rows[0]["margin"] + 0.1 and rows[-1]["preference_accuracy"] >= 0.75

    assert dpo.main(_recipe(tiny_model, data), "dpo", tmp_path / "b", progress=False, stop_after=4) is None
    dpo.main(_recipe(tiny_model, data), "dpo", tmp_path / "b", progress=False)
    other = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["loss"] for r in rows] == [r["loss"] for r in other]
    from safetensors.torch import load_file

    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_dpo_reference_is_the_starting_model(tiny_model, tmp_path):
    from thinkforge import models
    from thinkforge.train import dpo

    data = _pairs_file(tmp_path, 4)
    recipe = _recipe(tiny_model, data, **{"lora.enabled": "true", "lora.r": 4, "dpo.epochs": 1})
    final = dpo.main(recipe, "dpo", tmp_path / "r", progress=False)
    assert (final / "adapter_config.json").is_file()
    model, tok = models.load(tiny_model)
    pairs = dpo.load_pairs(str(data), tok, recipe, 256)
    from safetensors.torch import load_file

    ref = load_file(str(tmp_path / "r" / "reference_logps.safetensors"))["logps"]
    assert torch.allclose(ref, dpo.reference_logprobs(model, pairs, tok.pad_token_id, 2), atol=1e-5)


@pytest.mark.parametrize("stage", ["dpo", "rl"])
def test_under_bf16_autocast_the_reference_pass_matches_the_policys_precision(tiny_model, tmp_path, stage):
    """With bf16 autocast (the CPU speed-up) the reference log-probs are computed in the loss pass's precision:
    at the start DPO's margin is exactly 0 (loss log 2) and GRPO's KL is 0; in fp32 they read 1e-3 off."""
    if stage == "dpo":
        from thinkforge.train import dpo

        # A pair's prompt is left-padded to its micro-batch's longest (one prompt pass per pair): in bf16 a batch
        # of other companions than the reference pass's rounds otherwise (measured 6e-6 to 1.1e-5 on this loss),
        # far below the 1e-3 of an fp32 reference this test is for.
        dpo.main(_recipe(tiny_model, _pairs_file(tmp_path), **{"dpo.mixed_precision": "bf16", "dpo.max_steps": 1}), "dpo",
                 tmp_path / "run", progress=False)
        first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
        assert first["loss"] == pytest.approx(math.log(2), abs=5e-5)
    else:
        from thinkforge.train import rl

        over = [f"model.name_or_path={tiny_model}", "model.system_prompt=Think.", "rl.steps=1", "rl.preflight=false", "rl.prompts_per_step=2",
                "rl.group_size=4", "rl.max_new_tokens=12", "rl.beta=0.04", "rl.mixed_precision=bf16", "rl.truncation=none"]
        rl.main(load_config(None, over), "rl", tmp_path / "run", progress=False)
        first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x][0]
        assert first["kl"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_with_the_models_dropout_the_policy_starts_exactly_at_the_reference(dropout_model, tmp_path, monkeypatch, lora):
    """A model with Phi-2's residual dropout (and attention, embedding dropout; LoRA dropout 0.05): DPO runs
    without dropout, so in step 1 the policy, which starts as the reference, gives the reference's log-probs:
    implicit rewards 0, loss log 2. With dropout in the training pass alone they carry its noise (PITFALLS 22)."""
    from thinkforge.train import dpo

    gaps = []
    real = dpo.dpo_loss

    def spy(chosen, rejected, ref_chosen, ref_rejected, *args):
        gaps.append(max((chosen - ref_chosen).abs().max().item(), (rejected - ref_rejected).abs().max().item()))
        return real(chosen, rejected, ref_chosen, ref_rejected, *args)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    recipe = _recipe(dropout_model, _pairs_file(tmp_path), **{"lora.enabled": str(lora).lower(), "dpo.max_steps": 1})
    assert recipe.lora.dropout == 0.05
    dpo.main(recipe, "dpo", tmp_path / "run", progress=False)
    first = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    # sums over a completion's tokens, in micro-batches padded unlike the reference pass's: 1.5e-5 of float rounding
    assert len(gaps) == 2 and gaps == pytest.approx([0.0, 0.0], abs=1e-4)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_regenerated_pairs_file_of_the_same_size_gets_fresh_reference_logprobs(tiny_model, tmp_path):
    """The reference log-probs are keyed by the pairs' content: a pairs file regenerated with as many pairs in a
    run folder without checkpoints is recomputed, never reused (it was once validated by count only)."""
    from safetensors.torch import load_file

    from thinkforge.train import dpo

    (tmp_path / "a").mkdir()
    first = _pairs_file(tmp_path / "a", 6)
    second = tmp_path / "b.jsonl"
    rows = [json.loads(x) for x in first.read_text().splitlines()]
    second.write_text("".join(json.dumps({**r, "rejected": r["rejected"] + " and more"}) + "\n" for r in rows))
    run = tmp_path / "run"
    dpo.main(_recipe(tiny_model, first, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    with pytest.raises(UserError, match="was computed for other pairs .* has checkpoints trained on them"):
        dpo.main(_recipe(tiny_model, second, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    for ckpt in run.glob("step-*"):  # a folder without checkpoints: the stale file is recomputed, not reused
        shutil.rmtree(ckpt)
    dpo.main(_recipe(tiny_model, second, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    dpo.main(_recipe(tiny_model, second, **{"dpo.max_steps": 1}), "dpo", tmp_path / "fresh", progress=False)
    got = load_file(str(run / "reference_logps.safetensors"))["logps"]
    want = load_file(str(tmp_path / "fresh" / "reference_logps.safetensors"))["logps"]
    assert torch.equal(got, want) and len(got) == len(rows)


def test_the_reference_key_names_the_start_model_by_what_it_is_not_where_it_lies(tiny_model, tmp_path):
    """A moved run folder (or a relative path resumed from another directory) is the same start model."""
    from thinkforge.train.dpo import model_identity

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, moved)
    assert model_identity(str(moved)) == model_identity(tiny_model)
    assert model_identity("microsoft/phi-2") == "microsoft/phi-2"



def test_a_start_model_retrained_in_place_with_the_same_shapes_gets_fresh_reference_logprobs(tiny_model, tmp_path):
    """The reference log-probs are keyed by the start model's contents: weights overwritten in place (same file
    names, shapes and sizes) are another reference, refused beside checkpoints trained on the old one and
    recomputed without them (they were once keyed by file names and sizes, and reused)."""
    from safetensors.torch import load_file, save_file

    from thinkforge.train import dpo

    start = tmp_path / "start"
    shutil.copytree(tiny_model, start)
    data = _pairs_file(tmp_path, 6)
    run = tmp_path / "run"
    dpo.main(_recipe(str(start), data, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    before = load_file(str(run / "reference_logps.safetensors"))["logps"]
    weights_file = start / "model.safetensors"
    size = weights_file.stat().st_size
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(str(weights_file)).items()},
              str(weights_file), metadata={"format": "pt"})  # "retrained": same names, shapes and dtypes
    assert weights_file.stat().st_size == size
    with pytest.raises(UserError, match="was computed for other pairs \\(or another start model"):
        dpo.main(_recipe(str(start), data, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    for ckpt in run.glob("step-*"):
        shutil.rmtree(ckpt)
    dpo.main(_recipe(str(start), data, **{"dpo.max_steps": 1}), "dpo", run, progress=False)
    dpo.main(_recipe(str(start), data, **{"dpo.max_steps": 1}), "dpo", tmp_path / "fresh", progress=False)
    got = load_file(str(run / "reference_logps.safetensors"))["logps"]
    assert torch.equal(got, load_file(str(tmp_path / "fresh" / "reference_logps.safetensors"))["logps"])
    assert not torch.allclose(got, before, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_pairs_prompt_runs_once_and_gives_the_log_probs_and_gradients_of_two_whole_passes(tiny_model, checkpointing):
    """dpo.pair_logprobs runs each pair's prompt once (its cache repeated for chosen and rejected): the same
    sequence log-probs and gradients as one pass per whole sequence, with prompts of different lengths."""
    from thinkforge import models
    from thinkforge.data.packing import collate_padded, tokenize
    from thinkforge.train import dpo

    model, tok = models.load(tiny_model, gradient_checkpointing=checkpointing)
    model.train(checkpointing)  # checkpointing recomputes in training only; the tiny model has no dropout
    pairs = [(tokenize(tok, p, c, 256), tokenize(tok, p, r, 256)) for p, c, r in [
        ("Mia has 3 apples. ", "<think>3 + 1 = 4</think><answer>4</answer>", "<answer>5</answer>"),
        ("Leo has 7 books and gives 2 to Sam. ", "<answer>5</answer>", "<think>7 - 2 = 9 more words</think><answer>9</answer>")]]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    chosen, rejected = dpo.pair_logprobs(model, pairs, tok.pad_token_id)
    g_shared = grads((chosen - 0.5 * rejected).sum())
    ids, labels, attn = collate_padded([c for c, _ in pairs] + [r for _, r in pairs], tok.pad_token_id)
    whole = sequence_logprobs(model(input_ids=ids, attention_mask=attn).logits, labels)
    g_whole = grads((whole[:2] - 0.5 * whole[2:]).sum())
    assert torch.allclose(chosen.detach(), whole[:2].detach(), atol=1e-4)
    assert torch.allclose(rejected.detach(), whole[2:].detach(), atol=1e-4)
    assert torch.allclose(g_shared, g_whole, atol=1e-4, rtol=1e-4)
