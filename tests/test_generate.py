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
