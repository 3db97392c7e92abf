from thinkforge.formats import SYSTEM_PROMPT, format_completion, parse, render_prompt


def test_phi2_prompt_is_the_cards_layout():
    assert render_prompt("Q?", "phi2") == f"<|system|>\n{SYSTEM_PROMPT}\n<|user|>\nQ?\n<|assistant|>\n"


def test_phi4_prompt_layout_and_chat_template_agree(tiny_loaded):
    _, tok = tiny_loaded
    phi4 = render_prompt("Q?", "phi4", "S")
    assert phi4 == "<|system|>S<|end|><|user|>Q?<|end|><|assistant|>"
    assert render_prompt("Q?", "chat_template", "S", tok) == phi4
    assert render_prompt("Q?", "auto", "S", tok) == phi4  # a tokenizer's own template wins
    assert render_prompt("Q?", "auto", "S") == render_prompt("Q?", "phi2", "S")


def test_well_formed_completion():
    p = parse(format_completion("2 + 2 = 4", "4"))
    assert p.format_ok and p.answer == "4" and p.thinking == "2 + 2 = 4" and p.source == "answer_tag"


def test_format_status_flags_problems():
    assert not parse("<answer>4</answer><think>x</think>").format_ok  # out of order
    assert not parse("<think>x</think><think>y</think><answer>4</answer>").format_ok  # repeated
    assert not parse("<think>x</think><answer>4").format_ok  # unbalanced
    assert not parse("hi <think>x</think><answer>4</answer>").format_ok  # text before thinking


def test_tolerated_variations():
    assert parse("no tags, so \\boxed{\\frac{1}{2}}.").answer == "\\frac{1}{2}"
    assert parse("Thus the final answer is $12$.").answer == "12"
    assert parse("step one\n#### 1,234").answer == "1,234"
    assert parse("x</think>\nThe final answer is 7").thinking == "x"  # template pre-filled <think>
    assert parse("<think>x</think><answer>The final answer is \\boxed{3}</answer>").answer == "3"


def test_an_instruct_models_own_closing_lines_give_the_answer():
    assert parse("3 + 4 = 7, so 7 in all. The answer is 7.").answer == "7"
    assert parse("So the answer is: $12$").answer == "12"
    assert parse("The answer is 15 apples.").answer == "15"
    assert parse("The answer is 1,250 meters per hour.").answer == "1,250"
    assert parse("The final answer is 9. I hope it is correct.").answer == "9"
    assert parse("The answer is x + 2.").answer == "x + 2"
    assert parse("First the answer is unclear. Then 5. The answer is 5").answer == "5"  # the last one
    assert parse("My answer isn't clear").answer is None


def test_an_empty_system_prompt_stays_empty(tiny_loaded):
    """Templates like SmolLM2's inject their own system prompt when the messages have none."""
    from transformers import PreTrainedTokenizerFast

    _, tok = tiny_loaded
    injecting = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    injecting.chat_template = (
        "{% if messages[0]['role'] != 'system' %}[DEFAULT SYSTEM]{% endif %}"
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    )
    assert render_prompt("Q?", "chat_template", "", injecting) == "[system][user]Q?[assistant]"
    assert render_prompt("Q?", "chat_template", "S", injecting) == "[system]S[user]Q?[assistant]"


def test_cut_off_inside_think_has_no_answer():
    p = parse("<think>so the answer is \\boxed{42} and")
    assert p.answer is None and p.truncated_in_think


def test_answer_inside_think_is_not_the_answer():
    assert parse("<think>\\boxed{42}</think><answer>I am not sure</answer>").answer == "I am not sure"


def test_different_answers_in_several_tags_are_no_answer():
    assert parse("<think>x</think><answer>41</answer><answer>42</answer>").answer is None
    assert parse("<think>x</think><answer>42</answer><answer>42</answer>").answer == "42"


def test_megabyte_input_parses():
    p = parse("<think>" + "a " * 500_000 + "</think><answer>1</answer>")
    assert p.answer == "1" and p.format_ok


def test_a_completion_of_a_prompt_that_prefills_think_is_read_as_opened():
    """Chat templates that end the generation prompt with <think> (Qwen3, R1 distills): the completion starts
    inside the thinking, and its format, thinking and answer are those of the whole response."""
    from thinkforge.formats import parse, response

    prompt, comp = "<|im_start|>assistant\n<think>\n", "2 + 2 = 4</think><answer>4</answer>"
    assert not parse(comp).format_ok
    whole = parse(response(prompt, comp))
    assert whole.format_ok and whole.thinking == "2 + 2 = 4" and whole.answer == "4"
    assert response("Question: 2 + 2?", comp) == comp and response(prompt, "<think>a</think>") == "<think>a</think>"


def test_one_answer_written_twice_is_one_answer_and_two_answers_are_none():
    from thinkforge.formats import parse

    assert parse("<think>x</think><answer>42</answer><answer>42.</answer>").answer in ("42", "42.")
    assert parse("<think>x</think><answer>42</answer><answer>43</answer>").answer is None


def test_evaluation_counts_the_format_of_a_prefilled_think(tiny_loaded):
    from thinkforge.evaluate import evaluate
    from thinkforge.rollout.types import Completion, SamplingParams
    from thinkforge.tasks import Problem

    class Fixed:
        batch_size = 8

        def generate(self, prompts, n, params):
            return [Completion(i, "I add.</think><answer>4</answer>", (1,), "stop") for i in range(len(prompts)) for _ in range(n)]

    problems = [Problem("p1", "2 + 2?", "4")]
    _, summary = evaluate(Fixed(), problems, lambda q: f"<|user|>{q}<|assistant|><think>\n", SamplingParams(), progress=False)
    assert summary["format_rate"] == 1.0 and summary["accuracy"] == 1.0
