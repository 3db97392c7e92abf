"""Prompt rendering and the reasoning format: `<think>` reasoning `</think>` then `<answer>` answer `</answer>`.

Two prompt formats from the seeds (SPEC 1), or the tokenizer's own chat template:
- phi2: `<|system|>\\n{system}\\n<|user|>\\n{question}\\n<|assistant|>\\n` (Infused Phi-2 card)
- phi4: `<|system|>{system}<|end|><|user|>{question}<|end|><|assistant|>` (Phi-4-mini card)

`parse(completion)` splits a completion into thinking and answer and reports the format status. It is linear
in the input (str.find, no backtracking regex over the whole text) so megabyte outputs cannot hang it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively."
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMATS = ("auto", "phi2", "phi4", "chat_template", "plain")


def prompt_renderer(model_cfg, tokenizer):
    """question -> prompt text, in the prompt format and system prompt of a recipe's `model` section."""
    return lambda question: render_prompt(question, model_cfg.prompt_format, model_cfg.system_prompt, tokenizer)


# The seeds' layouts: each turn is `<|role|>` + NL + text + END (phi2: a newline after the tag and after the
# text; phi4: nothing after the tag, <|end|> after the text), then `<|assistant|>` + NL for the model to continue.
# The one owner of the layout: training, evaluation, serve, chat and the model card's snippet all render here.
TURNS = {"phi2": ("\n", "\n"), "phi4": ("", "<|end|>")}


def render_prompt(question: str, fmt: str = "phi2", system: str | None = None, tokenizer=None) -> str:
    """The prompt text that precedes the model's completion to one question."""
    return render_messages([{"role": "user", "content": question}], tokenizer, fmt, system)


def render_messages(messages: list[dict], tokenizer, fmt: str = "auto", system: str | None = None) -> str:
    """Chat messages -> prompt text: the tokenizer's chat template (fmt chat_template, or auto where it has
    one), else the seeds' phi2 / phi4 layout, or plain (one question). The system prompt is the messages' own,
    else `system`, else the Infused Phi-2 card's think/answer prompt. ValueError for messages without a turn."""
    own = next((m["content"] for m in messages if m["role"] == "system"), None)
    system = own if own is not None else (SYSTEM_PROMPT if system is None else system)
    turns = [m for m in messages if m["role"] != "system"]
    if fmt == "auto":
        fmt = "chat_template" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "phi2"
    if fmt == "chat_template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format chat_template needs a tokenizer that has a chat template")
        # The messages as the client sent them when they hold a system message; else ours first (an empty one
        # stays empty: without a system message, templates such as SmolLM2's or Qwen's inject their own).
        if own is None:
            messages = [{"role": "system", "content": system}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not turns:
        raise ValueError("'messages' needs a user message")
    if fmt == "plain":
        return f"{system}\n\nQuestion: {turns[-1]['content']}\nAnswer: "
    if fmt not in TURNS:
        raise ValueError(f"unknown prompt format {fmt!r}; choose one of {', '.join(FORMATS)}")
    nl, end = TURNS[fmt]
    text = f"<|system|>{nl}{system}{end}"
    for m in turns:
        text += f"<|{'assistant' if m['role'] == 'assistant' else 'user'}|>{nl}{m['content']}{end}"
    return text + f"<|assistant|>{nl}"


def prompt_snippet(fmt: str) -> str:
    """The line of Python that renders a question's prompt in `fmt` (system_prompt and question variables), for
    a model card: written from the renderer itself, so the card cannot drift from training."""
    import json

    if fmt == "chat_template":
        return ('messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]\n'
                "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)")
    return "prompt = f" + json.dumps(render_prompt("{question}", fmt, "{system_prompt}"))


def format_completion(thinking: str, answer: str) -> str:
    """The target text of a well-formed response."""
    return f"{THINK_OPEN}\n{thinking.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{answer.strip()}\n{ANSWER_CLOSE}"


@dataclass(frozen=True)
class Parsed:
    """A completion split into its parts.

    thinking: text inside <think> (or before a lone </think>), "" if none.
    answer: the final answer string, None when there is none (e.g. cut off inside <think>).
    format_ok: both tag pairs present once each, balanced, thinking before answer.
    source: where the answer came from: answer_tag, boxed, final_answer, hashes, after_think, none.
    """

    thinking: str
    answer: str | None
    format_ok: bool
    source: str
    truncated_in_think: bool = False


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if absent or unbalanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        start = text.rfind("\\boxed ")
        if start < 0:
            return None
        rest = text[start + len("\\boxed ") :].strip()
        return rest.split("$")[0].split()[0] if rest else None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


# "The final answer is X", "The answer is: X", "the answer is $X$" (instruct models' own closing line)
_FINAL_RE = re.compile(r"\b(?:final\s+)?answer\s+is\b[:\s]*", re.IGNORECASE)
_NUMBER_THEN_WORDS = re.compile(r"^\$?(-?[\d,]*\.?\d+(?:/\d+)?)\$?\s+[A-Za-z][A-Za-z\s]*$")


def extract_answer(text: str) -> tuple[str | None, str]:
    """Best answer string from untagged text: last \\boxed{}, "The (final) answer is X", "#### X"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    tail = text[-2000:]
    matches = list(_FINAL_RE.finditer(tail))
    if matches:
        rest = tail[matches[-1].end() :].strip()
        rest = re.split(r"\n|\.\s", rest)[0].strip()  # its sentence: "9. I hope it is correct." -> "9"
        rest = rest.rstrip(".").strip()
        rest = re.sub(r"^\$+|\$+$", "", rest).strip().rstrip(".").strip()
        number = _NUMBER_THEN_WORDS.match(rest)  # "15 apples" -> "15"
        if number:
            rest = number.group(1)
        if rest:
            return rest, "final_answer"
    pos = tail.rfind("####")
    if pos >= 0:
        rest = tail[pos + 4 :].strip().split("\n")[0].strip()
        if rest:
            return rest, "hashes"
    return None, "none"


def answer_statement(text: str) -> tuple[int, int] | None:
    """The span of the sentence in which untagged text states its final answer ("So the answer is 7."), from the
    end of the sentence before it to the end of its own (`extract_answer`'s "answer is" match and its sentence);
    None where the answer is read another way (\\boxed{}, ####) or not at all."""
    if extract_answer(text)[1] != "final_answer":
        return None
    offset = max(0, len(text) - 2000)
    match = list(_FINAL_RE.finditer(text[offset:]))[-1]
    start, end = offset + match.start(), offset + match.end()
    before = max(text.rfind(mark, 0, start) for mark in (". ", "! ", "? ", "\n"))
    start = before + 1 if before >= 0 else 0
    after = re.search(r"\n|\.\s", text[end:])
    return start, end + after.end() if after else len(text)


def _clean_answer(answer: str) -> str:
    """An answer tag may itself hold \\boxed{} or 'The final answer is X': reduce to X."""
    inner, source = extract_answer(answer)
    return inner if inner is not None and source in ("boxed", "final_answer", "hashes") else answer.strip()


def _answer_bodies(text: str) -> list[str]:
    bodies, pos = [], text.find(ANSWER_OPEN)
    while pos >= 0:
        start = pos + len(ANSWER_OPEN)
        close = text.find(ANSWER_CLOSE, start)
        nxt = text.find(ANSWER_OPEN, start)
        end = min(e for e in (close, nxt, len(text)) if e >= 0)
        bodies.append(text[start:end])
        pos = nxt
    return bodies


def response(prompt: str, completion: str) -> str:
    """The model's whole response to `prompt`: a chat template that pre-fills `<think>` (the generation prompt
    ends with it) opened the thinking for the model, so the completion is read as if it had opened it: its
    format, thinking and answer are those of "<think>" + completion."""
    if completion and prompt.rstrip().endswith(THINK_OPEN) and not completion.lstrip().startswith(THINK_OPEN):
        return THINK_OPEN + completion
    return completion


def parse(completion: str) -> Parsed:
    """Split a completion into thinking and answer, tolerating format variations. A completion of a prompt
    that pre-fills `<think>` is parsed as `response(prompt, completion)`."""
    text = completion
    n_to, n_tc = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    n_ao, n_ac = text.count(ANSWER_OPEN), text.count(ANSWER_CLOSE)
    tc = text.find(THINK_CLOSE)
    to = text.find(THINK_OPEN)
    ao = text.find(ANSWER_OPEN, max(tc, 0))
    format_ok = (
        n_to == n_tc == n_ao == n_ac == 1
        and to < tc < ao < text.find(ANSWER_CLOSE)
        and text[:to].strip() == ""
    )

    # Thinking: inside <think>...</think>; a lone </think> (templates that pre-fill <think>) counts too.
    if tc >= 0:
        start = to + len(THINK_OPEN) if 0 <= to < tc else 0
        thinking = text[start:tc].strip()
        after = text[tc + len(THINK_CLOSE) :]
    elif to >= 0:
        # Opened <think> and never closed: the response was cut off while thinking. No answer.
        return Parsed(text[to + len(THINK_OPEN) :].strip(), None, False, "none", truncated_in_think=True)
    else:
        thinking, after = "", text

    # Answer: the last <answer>...</answer> after the thinking, else fallbacks on the text after thinking.
    if ANSWER_OPEN in after:
        answers = [_clean_answer(body) for body in _answer_bodies(after)]
        # Several different answers is hedging, not an answer; "42" and "42." are one answer written twice.
        distinct = {" ".join(a.split()).rstrip(".").strip() for a in answers}
        answer = answers[-1] if len(distinct) == 1 else None
        return Parsed(thinking, answer if answer else None, format_ok, "answer_tag")
    answer, source = extract_answer(after)
    if answer is None and after.strip() and tc >= 0:
        last_line = after.strip().splitlines()[-1].strip()
        if len(last_line) <= 200:
            answer, source = last_line, "after_think"
    return Parsed(thinking, answer, format_ok, source)


def words(text: str) -> int:
    return len(text.split())
