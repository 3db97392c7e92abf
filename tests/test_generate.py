import pytest
import torch

from thinkforge.rollout.hf import HFGenerator
from thinkforge.rollout.types import SamplingParams


def test_samples_are_grouped_per_prompt_and_greedy_is_deterministic(tiny_loaded):
    model, tok = tiny_loaded
    gen = HFGenerator(model, tok, batch_size=4)
    prompts = ["Mia has 3 apples.", "Leo has 10 books and more words here."]
    out = gen.generate(prompts, 3, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert out[0].text == out[1].text == out[2].text  # greedy
    again = gen.generate(prompts[1:], 1, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert again[0].text == out[3].text  # left padding does not change the result
    for c in out:
        assert len(c.token_ids) <= 5 and c.finish_reason in ("stop", "length")


def test_sampling_is_seeded(tiny_loaded):
    model, tok = tiny_loaded
    gen = HFGenerator(model, tok)
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    assert [c.text for c in gen.generate(["Mia"], 4, p)] == [c.text for c in gen.generate(["Mia"], 4, p)]


def test_a_sample_does_not_depend_on_its_batch(tiny_loaded):
    """Each (prompt, sample) draws from its own stream: batch size and neighbours do not change it."""
    model, tok = tiny_loaded
    p = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    prompts = ["Mia has 3 apples.", "Leo has 10 books and more words here.", "Ava"]
    wide = HFGenerator(model, tok, batch_size=64).generate(prompts, 4, p)
    narrow = HFGenerator(model, tok, batch_size=4).generate(prompts, 4, p)  # one prompt per call
    assert [c.token_ids for c in wide] == [c.token_ids for c in narrow]
    assert len({c.token_ids for c in wide}) > 6  # and the streams differ from sample to sample


def test_row_streams_drawn_in_blocks_equal_one_long_draw_per_row():
    """Memory is rows x block for any max_new_tokens; the numbers are each row's single stream."""
    import numpy as np
    import pytest

    from thinkforge.engine.decode import RowStreams

    keys = [(2**100 + 7, 0), (2**100 + 7, 1), (5, 3)]
    whole = np.stack([np.random.default_rng([k % 2**64, k >> 64, s]).random(150) for k, s in keys])
    streams = RowStreams(keys, torch.float64, "cpu", block=64)
    rows = torch.tensor([2, 0])  # live rows only, in any order
    got = torch.stack([streams.at(rows, t) for t in range(150)], 1).numpy()
    assert np.array_equal(got, whole[[2, 0]]) and streams.values.shape == (3, 64)
    with pytest.raises(ValueError, match="step order"):
        streams.at(rows, 10)


def test_common_random_numbers_keep_samples_of_a_nearby_model(tiny_loaded):
    """Two close checkpoints sampled with one seed share most samples (the comparison measures the models);
    independent draws of the same model share few."""
    import copy

    model, tok = tiny_loaded
    prompts = [f"Mia has {i} apples." for i in range(8)]
    p = SamplingParams(max_new_tokens=8, temperature=0.6, seed=11)
    base = HFGenerator(model, tok, 64).generate(prompts, 4, p)
    near = copy.deepcopy(model)
    with torch.no_grad():
        for w in near.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 1e-3 * w.std().nan_to_num())
    moved = HFGenerator(near, tok, 64).generate(prompts, 4, p)
    other = HFGenerator(model, tok, 64).generate(prompts, 4, SamplingParams(max_new_tokens=8, temperature=0.6, seed=12))
    same = sum(a.token_ids == b.token_ids for a, b in zip(base, moved, strict=True))
    chance = sum(a.token_ids == b.token_ids for a, b in zip(base, other, strict=True))
    assert same >= 24 and chance <= 4  # measured: 28 of 32 and 0


def test_finish_reason_stop_when_eos_is_generated(tiny_loaded):
    model, tok = tiny_loaded
    gen = HFGenerator(model, tok)
    eos = tok.eos_token_id
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] += 100.0  # make eos overwhelmingly likely
    try:
        out = gen.generate(["Mia"], 2, SamplingParams(max_new_tokens=5, temperature=0.0))
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = saved
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == eos and c.text == "" for c in out)


def test_stream_yields_the_same_text_as_greedy_generate(tiny_loaded):
    model, tok = tiny_loaded
    gen = HFGenerator(model, tok)
    p = SamplingParams(max_new_tokens=6, temperature=0.0)
    assert "".join(gen.stream("Mia has", p)) == gen.generate(["Mia has"], 1, p)[0].text


def test_own_decode_loop_matches_transformers_generate_greedy(tiny_loaded):
    """Prefill once per prompt, cache repeated per sample, stopped rows leaving the batch: same tokens as
    `model.generate` on a left-padded batch of prompts of different lengths."""
    from thinkforge.rollout.types import encode, left_pad

    model, tok = tiny_loaded
    gen = HFGenerator(model, tok, batch_size=64)
    prompts = ["Mia has 3 apples.", "Leo has 10 books and gives away 4 of them to Sam.", "Ava"]
    ours = gen.generate(prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.0))
    ids, mask = left_pad([encode(tok, p) for p in prompts for _ in range(2)], tok.pad_token_id)
    with torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=gen.stop_ids)
    theirs, reasons = [], []
    for row in seqs[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in gen.stop_ids), None)
        theirs.append(tuple(row[:end]))
        reasons.append("length" if end is None else "stop")
    assert [c.token_ids for c in ours] == theirs
    assert [c.finish_reason for c in ours] == reasons


def test_generation_with_a_kv_cache_model_never_leaves_the_own_decode_loop(tiny_loaded, monkeypatch):
    """Per-sample streams, batch-independent samples and the shared-prompt prefill exist only in the own loop:
    if generation ever reaches `model.generate` (as when a transformers release renamed `past_key_values`
    and a signature probe fell back quietly), this fails."""
    import transformers

    from thinkforge.models import cache_argument

    model, tok = tiny_loaded

    def refused(*args, **kwargs):
        raise AssertionError("HFGenerator.generate called model.generate")

    monkeypatch.setattr(model, "generate", refused)
    gen = HFGenerator(model, tok, batch_size=3)
    for params in (SamplingParams(max_new_tokens=6, temperature=1.0, seed=1), SamplingParams(max_new_tokens=6, temperature=0.0)):
        assert len(gen.generate(["Mia has 3 apples.", "Ava"], 2, params)) == 4
    from packaging.version import Version

    renamed = Version(transformers.__version__) >= Version("5.24.0.dev0")
    assert cache_argument(model) == ("cache" if renamed else "past_key_values")


def test_a_forward_that_takes_the_new_cache_name_gets_it_and_its_output_cache_is_read(tiny_loaded):
    """transformers 5.24's convention (`cache=` in, `.cache` out) on whatever version the lock has: a wrapper
    of the tiny model that speaks it decodes exactly what the model decodes with its own convention."""
    from dataclasses import dataclass

    import pytest

    from thinkforge.errors import UserError
    from thinkforge.models import cache_argument, forward_cached

    model, tok = tiny_loaded
    inner = cache_argument(model)

    @dataclass
    class Out:
        logits: torch.Tensor
        cache: object

    class NewStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config, self.device, self.generation_config = model.config, model.device, model.generation_config

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, logits_to_keep=logits_to_keep, **{inner: cache})
            return Out(out.logits, getattr(out, inner))

    wrapped = NewStyle()
    assert cache_argument(wrapped) == "cache"
    out, cache = forward_cached(wrapped, None, input_ids=torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[0, 1, 2]]))
    assert cache is not None and cache.get_seq_length() == 3
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    ours = HFGenerator(wrapped, tok, 8).generate(["Mia has 3 apples."], 2, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in HFGenerator(model, tok, 8).generate(["Mia has 3 apples."], 2, params)]

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, position_ids=None):
            raise AssertionError("never called")

    with pytest.raises(UserError, match="takes no cache / past_key_values argument"):
        HFGenerator(NoCache(), tok)


def test_a_model_the_decode_loop_cannot_run_is_refused_in_one_line(tiny_loaded):
    """No quiet fallback: a forward without explicit positions is a UserError naming the class and version."""
    import pytest
    import transformers

    from thinkforge.errors import UserError

    model, tok = tiny_loaded

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
            raise AssertionError("never called")

    with pytest.raises(UserError, match=f"NoPositions.forward \\(transformers {transformers.__version__}\\) takes no position_ids"):
        HFGenerator(NoPositions(), tok)


def test_rows_that_stop_leave_the_batch_without_changing_the_others(tiny_loaded):
    from thinkforge.engine.decode import Prompts, decode

    model, tok = tiny_loaded
    eos = tok.eos_token_id
    prompts = [tok("Mia has 3 apples.").input_ids, tok("Leo has 10 books.").input_ids]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    alone = decode(model.eval(), Prompts(prompts[1:], 1, [eos], tok.pad_token_id), greedy)
    first = decode(model, Prompts(prompts, 1, [eos], tok.pad_token_id), greedy)[0]
    # Declare the first row's third token a stop token: that row stops after 3 tokens, leaves the batch,
    # and the second row still decodes exactly as it does alone (unless it emits that token itself).
    stop = first[2]
    both = decode(model, Prompts(prompts, 1, [eos, stop], tok.pad_token_id), greedy)
    assert both[0] == first[:3]
    expect = alone[0][: alone[0].index(stop) + 1] if stop in alone[0] else alone[0]
    assert both[1] == expect


def _reference_pick(logits, params, u):
    """pick's definition, with one full sort and one float64 cumulative sum over the whole row: the nucleus cut
    by value at its last token's probability (softmax in vocabulary order), then the inverse CDF."""
    import torch

    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = logits.softmax(-1)
        ordered = torch.sort(probs, dim=-1, descending=True).values
        last = (ordered.cumsum(-1) - ordered <= params.top_p).sum(-1, keepdim=True) - 1
        logits = logits.masked_fill(probs < ordered.gather(-1, last), float("-inf"))
    cdf = logits.softmax(-1, dtype=torch.float64).cumsum(-1)
    return torch.searchsorted(cdf, u.double().view(-1, 1) * cdf[:, -1:], right=True).squeeze(-1)


@pytest.mark.parametrize("V", [7, 1024, 3000, 5000, 49152])
def test_pick_draws_the_tokens_a_full_sort_and_cumulative_sum_draw(V):
    """pick's two-level inverse CDF and its top-k-first nucleus give the very tokens of the full-row definition,
    for vocabularies below, at and past its block, flat rows (the nucleus past its first top-k), peaked ones,
    and bf16-valued logits (ties at the nucleus's edge)."""
    import torch

    from thinkforge.engine.decode import pick

    g = torch.Generator().manual_seed(V)
    rows = 300 if V > 5000 else 600
    logits = torch.randn(rows, V, generator=g) * torch.tensor([0.3, 3.0, 12.0]).repeat(rows // 3)[:, None]
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    for x in (logits, logits.bfloat16().float()):
        for params in (SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=0.6, top_p=0.95),
                       SamplingParams(temperature=0.8, top_p=0.5, top_k=40), SamplingParams(temperature=1.3, top_p=0.999)):
            got, want = pick(x, params, u), _reference_pick(x, params, u)
            assert torch.equal(got, want), (params, int((got != want).sum()))
    # a row's token depends on neither its batch nor whether a row beside it had a wide nucleus
    nucleus = SamplingParams(temperature=0.6, top_p=0.95)
    alone = pick(logits[1::3], nucleus, u[1::3])
    assert torch.equal(alone, pick(logits, nucleus, u)[1::3])
    # all of a row's mass on one token at a block's start or end, in the last block; the uniform close to 1, or
    # rounded to 1 (float32 draws): that token, never a zero-width one past it
    for at in (0, 1023, 1024, V - 1):
        if at < V:
            row = torch.full((1, V), -1e4)
            row[0, at] = 0.0
            for near_one in (torch.tensor([1 - 1e-12], dtype=torch.float64), torch.tensor([1.0])):
                assert int(pick(row, SamplingParams(temperature=1.0, top_p=1.0), near_one)) == at


def test_the_nucleus_past_its_first_top_k_when_top_p_sits_on_the_edge():
    """top_p equal to the float32 mass before the 257th most likely token: a full sort keeps 257 tokens; the
    top-256 shortcut must see that the row may keep more and sort it, not stop at 256."""
    import torch

    from thinkforge.engine.decode import nucleus

    g = torch.Generator().manual_seed(0)
    for _ in range(24):
        row = torch.randn(1, 4096, generator=g) * 3
        probs = row.softmax(-1)
        ordered = torch.sort(probs, dim=-1, descending=True).values
        top_p = float((ordered.cumsum(-1) - ordered)[0, 256])  # the 257th token's mass before it
        want = int((ordered.cumsum(-1) - ordered <= top_p).sum())
        assert int(torch.isfinite(nucleus(row, top_p)).sum()) == want >= 257


def test_float32_draws_never_take_a_token_outside_the_nucleus(monkeypatch):
    """Where the draw runs in float32 (MPS), a block's start is its predecessors' running sum, not its own end minus
    its mass, which can round above it: a uniform falling between the two drew the block's first token, zero width
    or not. Rows where the two differ are searched for (seeded), and a uniform is put in that gap."""
    import torch

    from thinkforge.engine import decode

    monkeypatch.setattr(decode, "draw_dtype", lambda device: torch.float32)
    g = torch.Generator().manual_seed(0)
    tried = 0
    for _ in range(2000):
        row = torch.randn(1, 3072, generator=g) * 2
        row[0, 1024:1032] = float("-inf")  # the second block starts with tokens outside the nucleus
        sums = (row - row.amax()).exp().view(1, -1, 1024).sum(-1)
        ends = sums.cumsum(-1)
        if ends[0, 1] - sums[0, 1] <= ends[0, 0]:
            continue
        u = (ends[0, 0] / ends[0, -1]).reshape(1)
        for _ in range(64):  # the float32 uniforms just past the first block's end
            if ends[0, 0] <= u[0] * ends[0, -1] < ends[0, 1] - sums[0, 1]:
                tried += 1
                token = int(decode.pick(row, SamplingParams(temperature=1.0, top_p=1.0), u))
                assert torch.isfinite(row[0, token]), token
                break
            u = torch.nextafter(u, torch.tensor([2.0]))
        if tried >= 3:
            break
    assert tried >= 3  # the gap was found: the test exercises it


def test_a_row_without_finite_logits_is_an_error_not_a_token():
    import torch

    from thinkforge.engine.decode import pick

    logits = torch.zeros(3, 50)
    logits[1, 7] = float("nan")
    for params in (SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=1.0, top_p=0.9)):
        with pytest.raises(ValueError, match=r"no token to draw in rows \[1\]"):
            pick(logits, params, torch.rand(3))


def test_sampling_filters_and_min_new_tokens(tiny_loaded):
    import torch

    from thinkforge.engine.decode import Prompts, decode, pick

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    top1 = SamplingParams(temperature=1.0, top_k=1, top_p=1.0)
    u = torch.rand(50, generator=torch.Generator().manual_seed(0))
    draws = {int(pick(logits, top1, u[s : s + 1])) for s in range(20)}
    assert draws == {1}
    nucleus = SamplingParams(temperature=1.0, top_k=0, top_p=0.5)  # token 1 alone holds ~50.6% of the mass
    assert {int(pick(logits, nucleus, u[s : s + 1])) for s in range(20)} == {1}
    both = SamplingParams(temperature=1.0, top_k=0, top_p=0.9)  # tokens 1 and 3 together exceed 0.9
    assert {int(pick(logits, both, u[s : s + 1])) for s in range(50)} == {1, 3}
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # the draw follows the softmax; a zero-mass token never comes
    rows = pick(probs.log().expand(20000, 5), SamplingParams(temperature=1.0, top_p=1.0),
                torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert (torch.bincount(rows, minlength=5) / 20000 - probs).abs().max() < 0.015

    model, tok = tiny_loaded
    eos = tok.eos_token_id
    prompt = [tok("Mia").input_ids]
    with torch.no_grad():
        saved = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] += 100.0
    try:
        out = decode(model.eval(), Prompts(prompt, 2, [eos], tok.pad_token_id, min_new_tokens=4),
                     SamplingParams(max_new_tokens=6, temperature=0.0))
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = saved
    assert [len(r) for r in out] == [5, 5] and all(r[-1] == eos and eos not in r[:-1] for r in out)
