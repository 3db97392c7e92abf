import dataclasses
import json
import random
import re

import pytest
import torch

from thinkforge.config import load_config
from thinkforge.errors import UserError
from thinkforge.losses import grpo_advantages, normaliser, policy_loss
from thinkforge.rollout.hf import HFGenerator
from thinkforge.rollout.types import Completion, Rollout, SyncError, encode
from thinkforge.train import ppo, rl, sampling
from thinkforge.train.backend import Backend
from thinkforge.train.dist import Dist
from thinkforge.train.forward import forward_logp, logp_no_grad

PROMPTS = ["Mia has 3 apples.", "Leo has 10 books and gives away 4 of them to Sam."]


def _backend(make):
    """rl.main's make_backend for a sampler alone: no policy sync, as the in-process backend."""
    return lambda model, tok, batch_size: Backend(make(model, tok, batch_size))


def _rollout(tok, texts, rewards, group_size, temperature=1.0):
    """Groups of group_size completions; groups alternate between two prompts of different lengths."""
    n = len(texts)
    prompts = [tok(PROMPTS[g % 2], add_special_tokens=False).input_ids for g in range(n // group_size)]
    comps = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    return Rollout.build(prompts, comps, [i // group_size for i in range(n)], tok.pad_token_id, rewards=rewards,
                         correct=[r > 0 for r in rewards], truncated=[False] * n, texts=texts, temperature=temperature)


def test_one_grpo_update_raises_logprob_of_positive_advantage_samples(tiny_model):
    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.train()
    texts = ["<think>3 + 1 = 4</think><answer>4</answer>", "<think>3 + 1 = 5</think><answer>5</answer>",
             "<answer>7</answer>", "<think>so 4</think><answer>4</answer>"]
    ro = _rollout(tok, texts, [1.0, -1.0, -1.0, 1.0], 4)
    mask = ro.completion_mask.float()
    adv = grpo_advantages(ro.rewards, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def seq_logp():
        with torch.no_grad():
            lp, _, _ = forward_logp(model, ro, slice(0, 4))
        return (lp * mask).sum(-1)

    before = seq_logp()
    logp, _, _ = forward_logp(model, ro, slice(0, 4))
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, normaliser(mask, "sequence"))
    loss.backward()
    opt.step()
    after = seq_logp()
    assert (after - before)[adv > 0].min() > 0
    assert (after - before)[adv < 0].max() < 0


def test_rollout_logprobs_equal_a_fresh_forward_at_the_sampling_temperature(tiny_loaded):
    model, tok = tiny_loaded
    model.eval()
    prompt = "Mia has 3 apples."
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    new = out.sequences[0, enc.input_ids.shape[1]:]
    sampler = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, new, strict=True)])
    ro = Rollout.build([enc.input_ids[0].tolist()], [new.tolist()], [0], tok.pad_token_id, rewards=[0.0], temperature=0.7)
    for share in (True, False):
        with torch.no_grad():
            lp, _, _ = forward_logp(model, ro, slice(0, 1), share_prompt=share)
        assert torch.allclose(lp[0], sampler, atol=1e-4)


def test_temperature_anneals_linearly_then_stays():
    cfg = load_config(None, ["rl.temperature_start=1.0", "rl.temperature=0.6", "rl.anneal_steps=10"]).rl
    assert [round(sampling.temperature_at(s, cfg), 3) for s in (0, 5, 10, 50)] == [1.0, 0.8, 0.6, 0.6]


def test_group_filters():
    cfg = load_config(None, ["rl.drop_easy=true", "rl.dynamic_sampling=true", "rl.uniform_length=0.5"]).rl
    assert sampling.keep_group([1, 1], [True, True], [10, 10], cfg) == "easy"
    assert sampling.keep_group([-1, -1], [False, False], [10, 10], cfg) == "zero_variance"
    assert sampling.keep_group([1, -1], [True, False], [10, 40], cfg) == "length_spread"
    assert sampling.keep_group([1, -1], [True, False], [10, 12], cfg) is None
    cfg2 = load_config(None, ["rl.drop_all_wrong=true"]).rl
    assert sampling.keep_group([-1, -1], [False, False], [1, 1], cfg2) == "all_wrong"


def test_balance_keeps_all_positives_and_as_many_negatives():
    keep = rl.balance_mask(torch.tensor([1.0, -0.5, -0.5, -0.5, 0.0, 2.0]), random.Random(0))
    assert keep[0] == keep[5] == 1 and keep[4] == 0 and int(keep[1:4].sum()) == 2


def _recipe(model, algo, **extra):
    over = [f"model.name_or_path={model}", "model.system_prompt=Think.", f"rl.algo={algo}", "rl.preflight=false", "rl.steps=4",
            "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=12", "rl.optim.lr=1e-3", "rl.micro_batch=3",
            "rl.checkpoints.every=2", "rl.truncation=none", "rl.temperature=1.0", "rl.temperature_start=null"]
    return load_config(None, over + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("algo,extra", [("grpo", {"rl.beta": 0.04}), ("ppo", {"rl.beta": 0.0}),
                                         ("grpo", {"lora.enabled": "true", "rl.loss_agg": "sequence", "rl.mu": 2})])
def test_rl_runs_logs_and_resumes_exactly(tiny_model, tmp_path, algo, extra):
    straight = rl.main(_recipe(tiny_model, algo, **extra), "rl", tmp_path / "a", progress=False)
    assert rl.main(_recipe(tiny_model, algo, **extra), "rl", tmp_path / "b", progress=False, stop_after=2) is None
    rl.main(_recipe(tiny_model, algo, **extra), "rl", tmp_path / "b", progress=False)

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(a) == 4
    for key in ("reward", "loss", "pg_loss", "clip_fraction", "entropy", "truncated_rate", "think_words",
                "format_rate", "reward_verifiable", "zero_variance_share"):
        assert key in a[0], key
    assert ("kl" in a[0]) == (extra.get("rl.beta", 0.04) > 0)  # a KL is logged only where there is a reference
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert (straight / ("adapter_config.json" if "lora.enabled" in extra else "config.json")).is_file()
    if algo == "ppo":
        assert "value_loss" in a[0]


def test_the_entropy_every_n_steps_changes_nothing_else_and_the_log_says_so(tiny_model, tmp_path):
    """rl.entropy_every=3 (4 steps): the entropy is in the rows of steps 1 and 4 only, equal to every step's run
    there, and the training (losses, rewards, gradient norms) is the same; the start row says it."""
    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    rl.main(_recipe(tiny_model, "grpo", **{"rl.mu": 2}), "rl", tmp_path / "every", progress=False)
    rl.main(_recipe(tiny_model, "grpo", **{"rl.mu": 2, "rl.entropy_every": 3}), "rl", tmp_path / "third", progress=False)
    every, third = ([r for r in rows(d) if "reward" in r] for d in (tmp_path / "every", tmp_path / "third"))
    assert [r["step"] for r in third if "entropy" in r] == [1, 4]
    assert [r["entropy"] for r in third if "entropy" in r] == [every[0]["entropy"], every[3]["entropy"]]
    for key in ("loss", "reward", "grad_norm", "kl"):
        assert [r[key] for r in third] == [r[key] for r in every], key
    assert "entropy logged every 3 steps" in rows(tmp_path / "third")[0]["note"]


def test_lora_reference_is_the_adapter_disabled(tiny_model):
    from conftest import random_lora

    from thinkforge import models

    base, tok = models.load(tiny_model)
    lora = random_lora(models.load(tiny_model)[0], 4, 8, 0.5)
    ro = _rollout(tok, ["<answer>4</answer>", "<answer>5</answer>"], [1.0, -1.0], 2)
    ref = rl.reference_logp(lora, None, ro, 2)
    want = logp_no_grad(base, ro, 2)
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(logp_no_grad(lora, ro, 2), want, atol=1e-3)


@pytest.mark.parametrize("lora", ["true", "false"])
def test_a_stage_after_a_lora_stage_starts_from_and_refers_to_that_policy(tiny_model, tmp_path, lora):
    """RL from a LoRA adapter folder (what `thinkforge run` chains after a LoRA stage): the start is the
    adapter merged into its base, so the first step's KL to the reference is 0 (it was the KL to the original
    base), the first rollouts are the previous policy's, and the final adapter loads on the merged start."""
    from conftest import random_lora

    from thinkforge import models

    model, tok = models.load(tiny_model)
    previous = models.save(random_lora(model, 4, 8, 0.5), tok, tmp_path / "sft-final")
    final = rl.main(_recipe(str(previous), "grpo", **{"lora.enabled": lora, "rl.beta": 0.04, "rl.steps": 1}), "rl",
                    tmp_path / "rl", progress=False)
    first = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["step"] == 1 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    merged = tmp_path / "rl" / "start-model"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    if lora == "true":
        assert models.adapter_base(str(final))[0] == str(merged.resolve())
    # the merged start gives the previous policy's log-probs
    ro = _rollout(tok, ["<answer>4</answer>", "<answer>5</answer>"], [1.0, -1.0], 2)
    want = logp_no_grad(models.load(str(previous))[0], ro, 2)
    assert torch.allclose(logp_no_grad(models.load(str(merged))[0], ro, 2), want, atol=1e-5)


def _out_of_memory_above(gen, rows: int):
    """The HF backend `gen` with a simulated memory limit: a chunk of more than `rows` sequences runs out."""
    real = gen._rows

    def limited(chunk, start, n, p, stops):
        if len(chunk) * n > rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(chunk, start, n, p, stops)

    gen._rows = limited
    return gen


def test_out_of_memory_halves_the_backend_batch_and_a_group_that_never_fits_is_skipped(tiny_loaded):
    """The HF backend halves its batch on out-of-memory and retries (the same samples: per-sample streams);
    the sampler skips and counts a chunk that still does not fit; any other error is a bug and propagates."""
    from thinkforge.rollout import hf
    from thinkforge.rollout.types import SamplingParams

    model, tok = tiny_loaded
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    want = hf.HFGenerator(model, tok, 64).generate(["a", "b", "c"], 2, params)
    gen = _out_of_memory_above(hf.HFGenerator(model, tok, 64), 2)
    assert gen.generate(["a", "b", "c"], 2, params) == want and gen.batch_size == 2

    class Failing:
        batch_size = 2

        def __init__(self, error):
            self.error = error

        def generate(self, prompts, n, params):
            if prompts[0] == "bad":
                raise self.error
            return [hf.Completion(i, "x", (1,), "stop") for i in range(len(prompts)) for _ in range(n)]

    stats = {}
    out = sampling.generate_groups(Failing(RuntimeError("CUDA out of memory (simulated)")), ["a", "bad", "c"], 2,
                                   SamplingParams(streams=(1, 2, 3)), stats)
    assert out[1] is None and len(out[0]) == 2 and len(out[2]) == 2
    assert stats["generation_failures"] == 1
    with pytest.raises(RuntimeError, match="size mismatch"):
        sampling.generate_groups(Failing(RuntimeError("size mismatch (a bug)")), ["a", "bad"], 2, SamplingParams(streams=(1, 2)), {})


def test_steps_that_keep_no_group_stop_the_run_with_the_reasons(tiny_model, tmp_path):
    """The random model answers nothing right: every group is all wrong, and dropping those keeps none."""
    recipe = _recipe(tiny_model, "grpo", **{"rl.drop_all_wrong": "true", "rl.max_refills": 0, "rl.steps": 5})
    with pytest.raises(UserError, match=r"3 steps in a row kept no group \(2 groups sampled, 2 dropped as all_wrong\)"):
        rl.main(recipe, "rl", tmp_path / "r", progress=False)
    events = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["step"] > 0] == ["empty_batch"] * 3


@pytest.mark.parametrize("agg", ["sequence", "token", "constant"])
def test_micro_batches_give_the_full_batch_gradient(tiny_model, agg):
    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.eval()  # no dropout: the two passes must see the same function
    texts = ["<think>3 + 1 = 4</think><answer>4</answer>", "<answer>5</answer>", "<think>long " * 5 + "</think>",
             "<answer>4</answer>", "<think>a</think><answer>4</answer>", "<answer>7</answer>"]
    ro = _rollout(tok, texts, [1.0, -1.0, -1.0, 1.0, 1.0, -1.0], 3)
    ro.loss_mask = ro.completion_mask.float()
    ro.advantages = grpo_advantages(ro.rewards, 3)

    def grads(micro):
        cfg = load_config(None, [f"rl.loss_agg={agg}", f"rl.micro_batch={micro}", "rl.group_size=3", "rl.beta=0"]).rl
        model.zero_grad()
        stats = rl.backward(model, ro, normaliser(ro.loss_mask, agg, cfg.max_new_tokens), cfg)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats

    full, s_full = grads(6)
    split, s_split = grads(4)
    assert torch.allclose(full, split, atol=1e-6)
    assert s_full["loss"] == pytest.approx(s_split["loss"], abs=1e-6)
    assert s_full["pg_loss"] == pytest.approx(s_split["pg_loss"], abs=1e-6)


def test_prompt_run_once_per_group_gives_the_same_logprobs_values_and_gradients(tiny_model):
    """The shared-prompt pass (prompt once, its cache repeated for the group) equals one pass per row over
    prompt + completion: log-probs, PPO values and the gradient of a loss, with prompts of two lengths."""
    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.eval()  # no dropout: both passes must see the same function
    texts = ["<think>3 + 1 = 4</think><answer>4</answer>", "<answer>5</answer>", "<think>long " * 5 + "</think>",
             "<answer>4</answer>", "<think>a</think><answer>4</answer>", "<answer>7</answer>"]
    ro = _rollout(tok, texts, [1.0, -1.0, -1.0, 1.0, 1.0, -1.0], 3)
    ro.temperature = 0.8
    head = ppo.ValueHead(model.config.hidden_size, trunk=True)
    torch.nn.init.normal_(head.weight, std=0.5)
    mask = ro.completion_mask.float()

    def run(share, rows):
        model.zero_grad()
        head.zero_grad()
        logp, logits, values = forward_logp(model, ro, rows, head, share_prompt=share)
        ((logp * mask[rows]).sum() + (values * mask[rows]).sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in [*model.parameters(), *head.parameters()] if p.grad is not None])
        return logp.detach() * mask[rows], values.detach() * mask[rows], grads

    for rows in (slice(0, 6), slice(2, 5)):  # whole groups, and a micro-batch that splits both groups
        lp_a, v_a, g_a = run(True, rows)
        lp_b, v_b, g_b = run(False, rows)
        assert torch.isfinite(g_a).all()
        assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(v_a, v_b, atol=1e-5)
        assert torch.allclose(g_a, g_b, atol=1e-4, rtol=1e-4)


def test_the_ppo_value_head_steps_at_its_own_lr_scale(tiny_model, tmp_path):
    """The optimizer rl.main builds, read back from its checkpoint: the head's group at lr x value_lr_scale."""
    recipe = _recipe(tiny_model, "ppo", **{"rl.beta": 0.0, "rl.steps": 1, "rl.optim.lr": 2e-5, "rl.value_lr_scale": 7.0})
    rl.main(recipe, "rl", tmp_path / "p", progress=False)
    state = json.loads((tmp_path / "p" / "step-0000001" / "trainer_state.json").read_text())
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-5, 2e-5, 1.4e-4])
    assert groups[-1]["weight_decay"] == 0.0 and len(groups[-1]["params"]) == 2  # the head's weight and bias


@pytest.mark.parametrize("trunk", [False, True])
def test_the_ppo_value_loss_reaches_the_model_only_when_asked(tiny_model, trunk):
    """value_trunk false (the default): the head fits detached features, a separate critic's behaviour."""
    from thinkforge import models

    model, tok = models.load(tiny_model)
    head = ppo.ValueHead(model.get_input_embeddings().weight.shape[1], trunk=trunk)
    torch.nn.init.normal_(head.weight, std=0.5)  # it starts at zero, which would stop the trunk's gradient anyway
    ro = _rollout(tok, ["<answer>4</answer>", "<answer>5</answer>"], [1.0, -1.0], 2)
    _, _, values = forward_logp(model, ro, slice(0, 2), head)
    (values ** 2).sum().backward()
    assert head.weight.grad.abs().sum() > 0
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()]
    assert any(reached) == trunk


def test_under_gradient_checkpointing_each_row_runs_whole(tiny_model):
    """Checkpointing drops the KV cache in training, so the shared-prompt pass cannot be used: the automatic
    choice falls back to one pass per row and gives the same log-probs."""
    from thinkforge import models

    model, tok = models.load(tiny_model, gradient_checkpointing=True)
    model.train()
    for m in model.modules():  # no dropout, so the two passes compare exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ro = _rollout(tok, ["<answer>4</answer>", "<think>3 + 1 = 4</think><answer>4</answer>"], [1.0, -1.0], 2)
    logp, _, _ = forward_logp(model, ro, slice(0, 2))
    logp.sum().backward()
    model.eval()
    with torch.no_grad():
        want, _, _ = forward_logp(model, ro, slice(0, 2), share_prompt=True)
    mask = ro.completion_mask.bool()
    assert torch.allclose(logp.detach()[mask], want[mask], atol=1e-5)


def _shorter(model):
    """A reward that always varies within a group (the random model never answers right): shorter is better."""
    recipe = _recipe(model, "grpo", **{"rl.steps": 3, "rl.reward": "weighted", "rl.truncation": "none"})
    recipe.rewards.weights = {"user_rewards:shorter_is_better": 1.0}
    return recipe


def test_a_backend_with_its_own_weights_plugs_in_and_is_synced_every_step(tiny_model, tmp_path):
    """The shape of a server backend (vLLM/SGLang with hot-reload): it generates from its own copy of the
    weights, which only `push` updates. The run must equal in-process generation, step for step."""
    import copy

    from thinkforge.rollout.hf import HFGenerator

    class OwnCopy:
        def __init__(self, model, tok, batch_size):
            self.policy, self.inner = model, HFGenerator(copy.deepcopy(model), tok, batch_size)
            self.batch_size, self.version, self.syncs = batch_size, 0, 0
            backends.append(self)

        def generate(self, prompts, n, params):  # each sample of the version it came from
            return [dataclasses.replace(c, version=self.version) for c in self.inner.generate(prompts, n, params)]

        def push(self):
            self.inner.model.load_state_dict(self.policy.state_dict())
            self.version += 1  # its samples are of the new version
            self.syncs += 1
            return {}

        def prove(self):
            return {}

        def close(self):
            pass

    def own_copy(cls):
        def make(model, tok, batch_size):
            gen = cls(model, tok, batch_size)
            return Backend(gen, sync=gen)
        return make

    backends: list = []
    plain = rl.main(_shorter(tiny_model), "rl", tmp_path / "a", progress=False)
    served = rl.main(_shorter(tiny_model), "rl", tmp_path / "b", progress=False, make_backend=own_copy(OwnCopy))

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]

    def trace(d):  # what the rollouts and the update depend on
        return [(r["reward"], r["entropy"], r["response_tokens"], r["grad_norm"]) for r in rows(d)]

    assert backends[0].syncs == 3
    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    assert plain.is_dir() and served.is_dir()

    class Unsynced(OwnCopy):  # a sync that never arrives: step 2's rollouts would come from the start weights
        def push(self):
            self.syncs += 1
            return {}

    with pytest.raises(SyncError, match="step 2's samples came from policy version\\(s\\) \\[0\\], the trainer is at version 1"):
        rl.main(_shorter(tiny_model), "rl", tmp_path / "c", progress=False, make_backend=own_copy(Unsynced))


def test_a_backend_without_token_ids_is_refused(tiny_model, tmp_path):
    from thinkforge.rollout.types import Completion

    class TextOnly:
        batch_size = 8

        def __init__(self, *args):
            pass

        def generate(self, prompts, n, params):
            return [Completion(i, "<think>2</think><answer>2</answer>", (), "stop") for i in range(len(prompts)) for _ in range(n)]

        def close(self):
            pass

    with pytest.raises(RuntimeError, match="without token ids"):
        rl.main(_recipe(tiny_model, "grpo"), "rl", tmp_path / "t", progress=False, make_backend=_backend(TextOnly))


def test_ppo_value_loss_is_weighted_by_vf_coef_once_and_logged_unweighted(tiny_model):
    """The value head's gradient is vf_coef x the gradient of the clipped value loss, computed here by hand
    (the loss was once weighted twice: vf_coef 0.5 acted as 0.25); the logged value_loss is that loss."""
    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.eval()
    texts = ["<answer>4</answer>", "<think>3 + 1</think><answer>5</answer>", "<answer>4</answer>", "<answer>7</answer>"]
    ro = _rollout(tok, texts, [1.0, -1.0, 1.0, -1.0], 2)
    ro.loss_mask = ro.completion_mask.float()
    cfg = load_config(None, ["rl.algo=ppo", "rl.beta=0", "rl.vf_coef=0.5", "rl.value_clip=0.05", "rl.micro_batch=4",
                             "rl.group_size=2", "rl.loss_agg=token"]).rl
    critic = ppo.Critic.create(model, cfg)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    critic.targets(model, ro, 4)
    ro.values = ro.values + 0.2 * ro.loss_mask  # V_old away from V, so the clipped branch is taken somewhere
    mask = ro.loss_mask
    model.zero_grad()
    stats = rl.backward(model, ro, normaliser(mask, "token", cfg.max_new_tokens), cfg, critic)
    got = critic.head.weight.grad.clone()

    head = ppo.ValueHead(critic.head.in_features)
    head.load_state_dict(critic.head.state_dict())
    _, _, v = forward_logp(model, ro, slice(0, 4), head)
    clipped = ro.values + (v - ro.values).clamp(-0.05, 0.05)
    per_token = 0.5 * torch.maximum((v - ro.returns) ** 2, (clipped - ro.returns) ** 2)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    assert ((clipped - ro.returns) ** 2 > (v - ro.returns) ** 2)[mask > 0].any()  # the clip mattered
    assert torch.allclose(got, 0.5 * head.weight.grad, atol=1e-6, rtol=1e-5)
    assert stats["value_loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_truncated_importance_weights_use_the_sampling_time_policy_when_mu_is_2(tiny_model):
    """With mu > 1 the second epoch's policy has moved: the TIS weight compares the sampler with the trainer at
    sampling time (old log-probs), not with the current policy (that ratio is PPO's, inside its clip).
    Server == trainer at theta_old: every weight is exactly 1."""
    from thinkforge import models

    model, tok = models.load(tiny_model)
    model.eval()
    ro = _rollout(tok, ["<answer>4</answer>", "<answer>5</answer>"], [1.0, -1.0], 2)
    ro.loss_mask = ro.completion_mask.float()
    ro.advantages = grpo_advantages(ro.rewards, 2)
    ro.old_logp = logp_no_grad(model, ro, 2) - 0.5 * ro.loss_mask  # the policy has moved since sampling
    ro.sampler_logp = ro.old_logp.clone()
    cfg = load_config(None, ["rl.mu=2", "rl.tis_cap=2.0", "rl.group_size=2", "rl.beta=0", "rollout.backend=vllm"]).rl
    stats = rl.backward(model, ro, normaliser(ro.loss_mask, "token", cfg.max_new_tokens), cfg)
    assert stats["tis_weight"] == pytest.approx(1.0, abs=1e-6)
    assert stats["sampler_logp_diff"] == pytest.approx(0.0, abs=1e-6)


class PerfectSampler(HFGenerator):
    """In-process sampling that reports each sampled token's log-prob as a server does: the policy's, computed
    apart from the training pass (eval mode: a server has no dropout), at the sampling temperature."""

    def generate(self, prompts, n, params):
        out = super().generate(prompts, n, params)
        ro = Rollout.build([encode(self.tokenizer, p) for p in prompts], [list(c.token_ids) for c in out],
                           [c.prompt_index for c in out], self.tokenizer.pad_token_id, rewards=[0.0] * len(out),
                           temperature=params.temperature)
        lp = logp_no_grad(self.model, ro, len(out))  # (N, C)
        return [dataclasses.replace(c, logprobs=tuple(lp[i, : len(c.token_ids)].tolist())) for i, c in enumerate(out)]


@pytest.mark.parametrize("model,lora,mu", [("dropout_model", True, 1), ("dropout_model", True, 2), ("dropout_model", False, 2),
                                           ("tiny_model", True, 1)], ids=["lora-mu1", "lora-mu2", "full-mu2", "lora-only"])
def test_with_the_recipes_dropout_every_compared_pass_sees_one_function(request, tmp_path, monkeypatch, model, lora, mu):
    """LoRA dropout 0.05 (every LoRA recipe), on a model with Phi-2's residual dropout (and attention, embedding
    dropout) or on one without (lora-only: the adapter's dropout acts from step 2): RL runs without dropout in
    every pass, so a perfect sampler reads sampler_logp_diff 0 at every step, and at step 1 the first ratio is
    exactly 1 (mu = 2: the old log-probs' pass against the loss's) and the KL to the reference exactly 0. With
    dropout in the training pass alone they read 0.05 nats per token, up to 0.2 (PITFALLS 22)."""
    first = []
    real = rl.policy_loss

    def spy(logp, old, adv, mask, *args, **kwargs):
        if not first:
            ref = args[3] if len(args) > 3 else kwargs.get("ref_logp")
            first.append(((logp - old).abs() * mask).max().item())
            first.append(((logp - ref).abs() * mask).max().item())
        return real(logp, old, adv, mask, *args, **kwargs)

    monkeypatch.setattr(rl, "policy_loss", spy)
    extra = {"rl.steps": 3, "rl.mu": mu, "rl.beta": 0.04, "rl.reward": "weighted", "lora.enabled": str(lora).lower()}
    recipe = _recipe(request.getfixturevalue(model), "grpo", **extra)
    recipe.rewards.weights = {"user_rewards:shorter_is_better": 1.0}  # a reward that varies: every step trains
    assert recipe.lora.dropout == 0.05
    rl.main(recipe, "rl", tmp_path / "run", progress=False, make_backend=_backend(PerfectSampler))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"pg_loss"' in x]
    assert len(rows) == 3 and rows[-1]["grad_norm"] > 0
    assert [r["sampler_logp_diff"] for r in rows] == pytest.approx([0.0] * 3, abs=1e-5)
    assert first == pytest.approx([0.0, 0.0], abs=1e-5)  # the first ratio is 1, the step-1 KL 0


def test_ppo_targets_run_in_the_loss_pass_precision_so_the_step_1_kl_penalty_is_zero(tiny_model, tmp_path, monkeypatch):
    """Under bf16 autocast PPO's old values and the policy side of its KL-in-reward are computed in the loss
    pass's precision, like the reference: at the first step policy == reference, so the penalty is exactly 0."""
    seen = []
    real = ppo.ppo_targets

    def spy(rewards, values, mask, gamma, lam, kl_penalty=None, **kw):
        seen.append(kl_penalty.abs().max().item())
        return real(rewards, values, mask, gamma, lam, kl_penalty, **kw)

    monkeypatch.setattr(ppo, "ppo_targets", spy)
    rl.main(_recipe(tiny_model, "ppo", **{"rl.beta": 0.04, "rl.steps": 1, "rl.mixed_precision": "bf16"}), "rl",
            tmp_path / "p", progress=False)
    assert seen == [0.0]


def test_no_two_samples_of_a_large_run_share_a_random_stream():
    """256 prompts a step, a generator batch of 64, G 8, 3 refill rounds, 2 steps (1,792 of 14,592 streams were
    drawn twice by the old seed arithmetic): every (stream key, sample) the sampler asks for is distinct, and
    so is every seed the vLLM backend sends."""
    from thinkforge.rollout.types import Completion
    from thinkforge.tasks import Problem

    class Recorder:
        batch_size = 64

        def __init__(self):
            self.keys = []

        def generate(self, prompts, n, params):
            self.keys += [(params.stream(i), j) for i in range(len(prompts)) for j in range(n)]
            return [Completion(i, "<answer>x</answer>", (1,), "stop") for i in range(len(prompts)) for _ in range(n)]

    problems = [Problem(f"p{i}", f"{i} + 1?", str(i + 1)) for i in range(50)]  # few problems: drawn many times
    task = sampling.Task(problems, lambda q: q, None)
    cfg = load_config(None, ["rl.prompts_per_step=256", "rl.group_size=8", "rl.gen_batch=64", "rl.max_refills=2",
                             "rl.drop_all_wrong=true", "rl.oversample=1.0"]).rl
    rec = Recorder()
    for step in range(2):
        sampling.collect(step, task, Backend(rec), cfg, seed=0)
    assert len(rec.keys) == 2 * 3 * 256 * 8  # every round drew a full draw (all wrong: nothing kept)
    assert len(set(rec.keys)) == len(rec.keys)
    assert len({k % 2**63 for k, _ in rec.keys}) == len(rec.keys) // 8  # the vLLM request seeds, one per prompt


def test_a_run_whose_generator_halved_its_batch_then_was_killed_resumes_as_if_it_never_stopped(tiny_model, tmp_path):
    """After an out-of-memory the HF backend keeps the halved batch; a resumed run starts at the full size. The
    streams do not depend on the chunking, so the resumed run samples (and trains) what the uninterrupted one did."""
    from thinkforge import rollout as backends

    def halving(model, tok, batch_size):
        return _out_of_memory_above(backends.hf.HFGenerator(model, tok, batch_size), 4)

    extra = {"rl.steps": 4, "rl.gen_batch": 16, "rl.prompts_per_step": 4}
    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "a", progress=False)
    assert rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False, stop_after=2,
                   make_backend=_backend(halving)) is None
    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False)

    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


class _Scripted:
    """A rollout backend that answers from a script: text (i, j) for sample j of prompt i, token ids of its
    length, finished; `truncate` marks every sample cut at max_new_tokens."""

    batch_size = 64
    texts = staticmethod(lambda i, j: "<think>1 + 1 = 2</think><answer>2</answer>")
    truncate = False

    def __init__(self, model, tokenizer, batch_size):
        self.tok = tokenizer

    def generate(self, prompts, n, params):
        out = []
        for i in range(len(prompts)):
            for j in range(n):
                text = self.texts(i, j)
                out.append(Completion(i, text, tuple(self.tok(text, add_special_tokens=False).input_ids) or (0,),
                                      "length" if self.truncate else "stop"))
        return out

    def close(self):
        pass


def _preflight_recipe(model, **extra):
    return _recipe(model, "grpo", **{"rl.preflight": "true", "rl.steps": 2, "rl.truncation": "none", **extra})


@pytest.mark.parametrize("case,backend,extra,words", [
    ("truncated", type("Cut", (_Scripted,), {"truncate": True}), {}, "of 16 samples hit rl.max_new_tokens=12 unfinished"),
    ("no variance", type("AllWrong", (_Scripted,), {"texts": staticmethod(lambda i, j: "<think>no</think><answer>-7</answer>")}),
     {}, "none of 4 groups has reward variance (accuracy 0%, format 100%)"),
    ("no tags", type("Plain", (_Scripted,), {"texts": staticmethod(lambda i, j: "The answer is 4." if j else "It is 5.")}),
     {"rl.reward": "weighted"}, "the format and reasoning rewards are 0 for all 16 samples (format rate 0%"),
])
def test_the_preflight_stops_a_run_that_could_not_learn_with_what_to_do(tiny_model, tmp_path, case, backend, extra, words):
    """Before the first step: truncation -> zero reward -> zero variance -> zero gradient is a run that silently
    learns nothing; the preflight says so in one line, and the report is in metrics.jsonl. No step is taken."""
    recipe = _preflight_recipe(tiny_model, **{"rl.preflight_groups": 4, **extra})
    with pytest.raises(UserError, match=re.escape(words)) as err:
        rl.main(recipe, "rl", tmp_path / "r", progress=False, make_backend=_backend(backend))
    assert "rl.preflight=false" in str(err.value) and "\n" not in str(err.value)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows if r.get("event") == "preflight"] == ["preflight"]
    assert not any("pg_loss" in r for r in rows) and not (tmp_path / "r" / "final").exists()
    recipe.rl.preflight = False  # asked for by name, the run trains anyway
    assert rl.main(recipe, "rl", tmp_path / "anyway", progress=False, make_backend=_backend(backend)) is not None


def test_a_learnable_policy_passes_the_preflight_and_rl_proceeds_on_its_own_streams(tiny_model, tmp_path, monkeypatch):
    """Samples of different lengths under a shorter-is-better reward: every group has variance; RL runs its
    steps. And the preflight samples on its own
    random streams: with the transformers backend a run that passed it trains on exactly the samples of a run
    without it (the random model fails it on truncation, so its verdict is waived here)."""
    class Mixed(_Scripted):
        texts = staticmethod(lambda i, j: f"<think>{'step ' * (j + 1)}</think><answer>2</answer>")

    recipe = _preflight_recipe(tiny_model, **{"rl.reward": "weighted"})
    recipe.rewards.weights = {"user_rewards:shorter_is_better": 1.0}
    assert rl.main(recipe, "rl", tmp_path / "a", progress=False, make_backend=_backend(Mixed)) is not None
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    report = next(r for r in rows if r.get("event") == "preflight")
    assert (report["flat_group_share"], report["format_rate"], report["truncated_rate"]) == (0.0, 1.0, 0.0)
    assert [r["step"] for r in rows if "pg_loss" in r] == [1, 2]

    monkeypatch.setattr(rl, "unlearnable", lambda *a: None)
    runs = {}
    for name, check in (("with", "true"), ("without", "false")):
        rl.main(_recipe(tiny_model, "grpo", **{"rl.preflight": check, "rl.steps": 2}), "rl", tmp_path / name, progress=False)
        runs[name] = [(r["reward"], r["loss"], r["response_tokens"]) for r in
                      map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines()) if "pg_loss" in r]
    assert runs["with"] == runs["without"] and len(runs["with"]) == 2


def test_out_of_memory_on_sharded_ranks_stops_the_run_instead_of_skipping_the_prompts():
    """One process skips (and counts) prompts whose generation ran out of memory; on sharded ranks the other
    ranks wait in the forward this rank left, so the error propagates (the run ends with one line)."""
    from thinkforge.rollout.types import SamplingParams

    class OutOfMemory:
        batch_size = 8

        def generate(self, prompts, n, params):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    params = SamplingParams(8, 1.0, 1.0, 0, 0, streams=(1, 2))
    stats: dict = {}
    assert sampling.generate_groups(OutOfMemory(), ["a", "b"], 2, params, stats) == [None, None]
    assert stats["generation_failures"] == 2
    with pytest.raises(RuntimeError, match="out of memory"):
        sampling.generate_groups(OutOfMemory(), ["a", "b"], 2, params, {}, sharded=True)


def test_answers_over_the_grading_budget_reach_the_step_metrics(tiny_model, monkeypatch):
    """RL's reward grades with the same budget: answers graded wrong for running over it are counted in the step's
    stats and row (summed over ranks like the other counts), not silently scored -1."""
    from thinkforge import grading
    from thinkforge.models import load_tokenizer
    from thinkforge.tasks import Problem

    class Heavy:
        batch_size = 8

        def generate(self, prompts, n, params):
            return [Completion(i, "<think>x</think><answer>(x+1)^{47}/(x+1)</answer>", (1, 2), "stop")
                    for i in range(len(prompts)) for _ in range(n)]

    monkeypatch.setattr(grading.math_equal, "__defaults__", (0.0,))  # an expression no other test grades (cache)
    task = sampling.Task([Problem("p", "expand", "(x+1)^{46}")], lambda q: q, load_tokenizer(tiny_model))
    cfg = load_config(None, ["rl.prompts_per_step=1", "rl.group_size=2", "rl.gen_batch=8"]).rl
    batch, stats = sampling.collect(0, task, Backend(Heavy()), cfg, seed=0)
    assert stats["grading_timeouts"] == 2 and stats["graded"] == 2
    batch.loss_mask = batch.completion_mask
    row = rl._row(batch, stats, Dist())
    assert row["grading_timeouts"] == 2 and row["graded"] == 2
    assert grading.timeout_warning(row["grading_timeouts"], row["graded"], "step 1").startswith("step 1: 2 of 2 answers")


@pytest.mark.parametrize("over", [
    {"rl.balance": "true", "rl.reward": "weighted", "rewards.weights": "{'user_rewards:flat': 1.0}"},  # nothing to balance
    {"rl.truncation": "mask", "rl.max_new_tokens": 1}],  # every sample cut
    ids=["balance-every-group-flat", "truncation-mask-every-sample-cut"])
def test_steps_without_a_loss_token_are_skipped_and_three_in_a_row_stop_the_run(tiny_model, tmp_path, over):
    """Groups are kept but no token carries loss: each such step is skipped and logged (no update), and the third
    in a row stops the run with one line saying why and what to change (it crashed in the backward)."""
    with pytest.raises(UserError, match=r"rl: 3 steps in a row had no token to learn from \(2 groups kept\): every "
                                         r"(group's rewards equal under rl.balance|sample cut at rl.max_new_tokens=1)"):
        rl.main(_recipe(tiny_model, "grpo", **over, **{"rl.steps": 5}), "rl", tmp_path / "r", progress=False)
    events = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["event"], e["why"]) for e in events if e["step"] > 0] == [
        (s, "empty_batch", "no loss token") for s in (1, 2, 3)]


def test_a_step_without_a_loss_token_is_skipped_and_the_run_goes_on(tiny_model, tmp_path):
    """Balance over groups that are flat on about half the problems: the steps where every kept group is flat
    are skipped, the others train, and the run ends with its final model."""
    over = {"rl.balance": "true", "rl.reward": "weighted", "rl.prompts_per_step": 1,
            "rewards.weights": "{'user_rewards:flat_on_even_answers': 1.0}", "rl.steps": 6}
    assert (rl.main(_recipe(tiny_model, "grpo", **over), "rl", tmp_path / "r", progress=False) / "config.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"] for r in rows if r.get("event") == "empty_batch"}
    trained = {r["step"] for r in rows if "pg_loss" in r}
    assert skipped and trained and skipped | trained == set(range(1, 7)) and not skipped & trained


def test_the_curriculum_moves_with_the_pass_rate_on_its_level():
    from thinkforge.train.curriculum import Curriculum

    c = Curriculum([3, 1, 2], window=4, up=0.7, down=0.2)
    assert c.level == 1 and c.update(3, 4, 2) is None  # 2 groups: not a window yet
    assert c.update(4, 4, 2) == {"level": 2, "from": 1, "pass_rate": 7 / 8}
    assert c.update(8, 8, 3) is None  # the window restarted: 3 groups
    assert c.update(0, 8, 3) is None  # the last 6 groups: 8 of 16, between the thresholds
    assert c.update(0, 8, 4)["level"] == 1  # the last 4 groups (this step's): 0 of 8
    assert c.update(0, 8, 4) is None  # the easiest level: nowhere lower
    twin = Curriculum([1, 2, 3], window=4, up=0.7, down=0.2)
    twin.replay([{"curriculum_level": 1, "correct_seen": c, "graded": g, "groups_seen": n}
                 for c, g, n in [(3, 4, 2), (4, 4, 2), (8, 8, 3)]])
    assert twin.level == 2 and twin.pass_rate() is None


def test_rl_with_a_curriculum_draws_from_the_current_level_logs_it_and_resumes_it(tiny_model, tmp_path, monkeypatch):
    """Level 1 answers all score 1 and level 2 answers 0: the level goes up after step 1, down after step 2, ...;
    each step's prompts come from its logged level, and a resumed run moves as the uninterrupted one did."""
    from thinkforge.tasks import Task

    seen: list[int] = []

    def by_level(self, problem, answer):
        seen.append(problem.meta["difficulty"])
        return 1.0 if problem.meta["difficulty"] == 1 else 0.0

    monkeypatch.setattr(Task, "check", by_level)
    extra = {"rl.curriculum": "true", "rl.difficulties": "[1,2]", "rl.curriculum_window": 2, "rl.curriculum_down": 0.1,
             "rl.dynamic_sampling": "false", "rl.drop_easy": "false", "rl.drop_all_wrong": "false", "rl.n_problems": 20}

    def levels(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return ([r["curriculum_level"] for r in rows if "reward" in r],
                [(r["from"], r["level"]) for r in rows if r.get("event") == "curriculum"])

    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "a", progress=False)
    assert levels(tmp_path / "a") == ([1, 2, 1, 2], [(1, 2), (2, 1), (1, 2), (2, 1)])
    assert seen == [1] * 8 + [2] * 8 + [1] * 8 + [2] * 8  # 2 groups of 4 per step, from the step's level
    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False, stop_after=3)
    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False)
    assert levels(tmp_path / "b") == levels(tmp_path / "a")
    with pytest.raises(UserError, match="curriculum needs a task with difficulty levels"):
        rl.main(_recipe(tiny_model, "grpo", **{**extra, "rl.difficulties": "[2]"}), "rl", tmp_path / "c", progress=False)


def test_the_curriculum_counts_groups_the_filters_drop_and_a_resume_replays_the_empty_steps(tiny_model, tmp_path, monkeypatch):
    """Level 1: half of each group right (kept, pass rate 0.5 > up 0.4: up); levels 2 and 3: all wrong, dropped by
    the all-wrong filter (an empty step, yet counted: down). A run stopped after step 3 and resumed replays step 2's
    empty row too: step 4 is at level 2, as in the uninterrupted run (without the empty row it would be 3)."""
    import itertools

    from thinkforge.tasks import Task

    flip = itertools.count()

    def by_level(self, problem, answer):
        return float(problem.meta["difficulty"] == 1 and next(flip) % 2 == 0)

    monkeypatch.setattr(Task, "check", by_level)
    extra = {"rl.curriculum": "true", "rl.difficulties": "[1,2,3]", "rl.curriculum_window": 2, "rl.curriculum_up": 0.4,
             "rl.curriculum_down": 0.1, "rl.n_problems": 20, "rl.checkpoints.every": 1, "rl.balance": "false",
             "rl.drop_all_wrong": "true", "rl.max_refills": 0}

    def levels(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("event"), r["curriculum_level"]) for r in rows if "curriculum_level" in r]

    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "a", progress=False)
    assert levels(tmp_path / "a") == [(1, None, 1), (2, "empty_batch", 2), (3, None, 1), (4, "empty_batch", 2)]
    assert rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False, stop_after=3) is None
    rl.main(_recipe(tiny_model, "grpo", **extra), "rl", tmp_path / "b", progress=False)
    assert levels(tmp_path / "b")[-1] == (4, "empty_batch", 2)


def test_a_time_budget_ends_the_stage_with_its_final_model_and_a_rerun_trains_nothing_more(tiny_model, tmp_path):
    """rl.time_budget: no step starts once the minutes are spent; the final model is written, the event logged, and
    a checkpoint at the stop makes a rerun of the same folder stop at once (counting the logged seconds)."""
    import safetensors.torch

    recipe = _recipe(tiny_model, "grpo", **{"rl.time_budget": 1e-4, "rl.steps": 50, "rl.checkpoints.every": 0})
    final = rl.main(recipe, "rl", tmp_path / "a", progress=False)

    def rows():
        return [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]

    steps = [r for r in rows() if "reward" in r]
    assert len(steps) == 1 and steps[0]["elapsed_seconds"] > 0  # 0.006 s: one step always runs
    event = [r for r in rows() if r.get("event") == "time_budget"]
    assert len(event) == 1 and event[0]["step"] == 1 and event[0]["seconds"] >= 0.006
    weights = safetensors.torch.load_file(final / "model.safetensors")
    assert (tmp_path / "a" / "step-0000001").is_dir()
    rl.main(recipe, "rl", tmp_path / "a", progress=False)  # a rerun: resumes at the stop, over budget at once
    assert len([r for r in rows() if "reward" in r]) == 1
    again = safetensors.torch.load_file(final / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
