"""The `thinkforge` command: parse options, load the config, call one function per subcommand.

Every job reads an optional YAML recipe (--config) plus dotted overrides (`generation.temperature=0.8`);
options such as --model are shortcuts for the same keys. A UserError becomes one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path


def _term_before_main(signum, frame) -> None:
    """SIGTERM on a rank of several before `main` runs (its imports take ~0.5 s, and a rank that refuses the recipe
    exits in about that): a neutral line, as `_on_launcher_term` says it before the ranks join."""
    os.write(2, f"thinkforge: error: rank {os.environ.get('RANK', '?')}: ended by the launcher (SIGTERM): another rank "
                "ended first (its line above says why), or the launch was stopped\n".encode())
    os._exit(128 + signum)


if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before the heavy imports below; `main` installs the full handler
    import signal

    signal.signal(signal.SIGTERM, _term_before_main)

import click  # noqa: E402

from thinkforge.arch import ARCHS  # noqa: E402
from thinkforge.config import InitConfig  # noqa: E402
from thinkforge.errors import UserError  # noqa: E402
from thinkforge.io import run_folder  # noqa: E402

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_INIT = {name: f.default for name, f in InitConfig.model_fields.items()}  # the tiny model's one default


def _quiet_hf() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def config_options(f):
    """--config and trailing key=value overrides."""
    f = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="YAML recipe; trailing KEY=VALUE arguments override its keys (e.g. generation.top_p=0.9).")(f)
    return f


def model_options(f):
    opts = [
        click.option("--model", "-m", default=None, help="Hub id or local folder of the model (or a PEFT adapter folder). [model.name_or_path]"),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
                     help="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU. [model.dtype]"),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps. [model.device]"),
        click.option("--trust-remote-code", is_flag=True, default=None, help="Run code shipped with a hub model; only when you trust it."),
        click.option("--prompt-format", type=click.Choice(["auto", "phi2", "phi4", "chat_template", "plain"]), default=None,
                     help="Prompt layout; auto = the tokenizer's chat template if it has one, else phi2. [model.prompt_format]"),
        click.option("--system-prompt", default=None, help="System text; default: the Infused Phi-2 card's think/answer prompt."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def sampling_options(f):
    opts = [
        click.option("--max-new-tokens", type=int, default=None, help="Tokens generated per sample at most. [generation.max_new_tokens]"),
        click.option("--temperature", "-t", type=float, default=None, help="Sampling temperature; 0 = greedy. [generation.temperature]"),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass in (0, 1]. [generation.top_p]"),
        click.option("--top-k", type=int, default=None, help="Top-k sampling; 0 = off. [generation.top_k]"),
        click.option("--batch-size", type=int, default=None, help="Sequences generated together. [generation.batch_size]"),
        click.option("--seed", type=int, default=None, help="Random seed. [seed]"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


_KEYS = {
    "model": "model.name_or_path", "dtype": "model.dtype", "device": "model.device",
    "trust_remote_code": "model.trust_remote_code", "prompt_format": "model.prompt_format",
    "system_prompt": "model.system_prompt", "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature", "top_p": "generation.top_p", "top_k": "generation.top_k",
    "batch_size": "generation.batch_size", "seed": "seed", "samples": "eval.samples", "limit": "eval.limit",
    "data_path": "eval.data_path", "difficulty": "synthetic.difficulty",
}


def recipe_from(config_path, overrides, given: dict | None = None, **options):
    """The one way CLI options reach the recipe: the YAML, then its KEY=VALUE overrides, then every option
    that was given (None = not given) as one more override, so all are validated alike. `given` maps config
    keys to values; `options` are the shared options by name (_KEYS)."""
    import json

    from thinkforge.config import load_config

    keys = {**{_KEYS[k]: v for k, v in options.items() if k in _KEYS}, **(given or {})}
    extra = [f"{k}={json.dumps(v)}" for k, v in keys.items() if v is not None]
    return load_config(config_path, [*overrides, *extra])


def save_resolved(recipe, out_dir) -> None:
    """The resolved config beside a run's outputs (run_dir/config.yaml)."""
    from thinkforge.config import dump_config
    from thinkforge.io import atomic_write

    with atomic_write(Path(out_dir) / "config.yaml") as f:
        f.write(dump_config(recipe))


def load_generator(recipe):
    """(generator, tokenizer, prompt renderer, sampling params) of the recipe's model, for generate/chat/serve."""
    from thinkforge import rollout
    from thinkforge.evaluate import sampling_params
    from thinkforge.formats import prompt_renderer

    _quiet_hf()
    gen, tok = rollout.load_generator(recipe.model, recipe.model.name_or_path, recipe.generation.batch_size)
    return gen, tok, prompt_renderer(recipe.model, tok), sampling_params(recipe)


@click.group(context_settings=CTX)
@click.version_option(package_name="thinkforge")
def cli():
    """thinkforge: turn a small language model into a step-by-step reasoner, and prove it with numbers."""


# ---------------------------------------------------------------- init-model


@cli.command("init-model", context_settings=CTX)
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(list(ARCHS)), default=_INIT["arch"], show_default=True,
              help="Real transformers architecture to initialise at random.")
@click.option("--hidden", type=int, default=_INIT["hidden"], show_default=True, help="Hidden size (at least 8).")
@click.option("--layers", type=int, default=_INIT["layers"], show_default=True, help="Number of transformer layers.")
@click.option("--heads", type=int, default=_INIT["heads"], show_default=True, help="Attention heads (must divide --hidden).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and of the tokenizer's corpus.")
@click.option("--from-gguf", "gguf_file", type=click.Path(dir_okay=False), default=None,
              help="Instead of a random tiny model: convert this GGUF file (a real pretrained model) to a plain folder.")
def init_model(out_dir, arch, hidden, layers, heads, seed, gguf_file):
    """Write a random-initialised tiny model with a locally built tokenizer (chat template, reasoning tags),
    or, with --from-gguf, a real model converted from a GGUF file (dequantised to float32 safetensors)."""
    from thinkforge import tiny
    from thinkforge.config import InitConfig, validate

    _quiet_hf()
    if gguf_file:
        from thinkforge import models

        path = models.from_gguf(gguf_file, out_dir)
        cfg = json.loads((path / "config.json").read_text())
        click.echo(f"wrote {cfg.get('model_type')} model ({cfg.get('num_hidden_layers')} layers, hidden "
                   f"{cfg.get('hidden_size')}, vocabulary {cfg.get('vocab_size')}) converted from {gguf_file} to {path}")
        return
    size = validate({"arch": arch, "hidden": hidden, "layers": layers, "heads": heads}, InitConfig, "init-model")
    path = tiny.init_model(out_dir, size, seed)
    click.echo(f"wrote a tiny {arch} model to {path}")


# ---------------------------------------------------------------- merge


@cli.command(context_settings=CTX)
@click.argument("adapter", type=click.Path(file_okay=False))
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False))
def merge(adapter, out_dir):
    """Merge a LoRA adapter folder into its base and write the full model to OUT (plain transformers folder).

    The base is loaded in float32, also for an adapter trained on a 4-bit base (QLoRA): merging into 4-bit weights
    would round the update away. The merged model is the full-precision base plus the update; it differs from the
    4-bit model that trained by the base's rounding to 4 bits."""
    from thinkforge import models

    _quiet_hf()
    path = models.merge(adapter, out_dir)
    click.echo(f"wrote {adapter} merged into its float32 base to {path}")


# ---------------------------------------------------------------- export


@cli.command(context_settings=CTX)
@click.argument("model_dir", metavar="MODEL", type=click.Path(file_okay=False))
@click.option("--gguf", "gguf_path", required=True, type=click.Path(dir_okay=False),
              help="The GGUF file to write (llama.cpp, Ollama, LM Studio).")
@click.option("--dtype", type=click.Choice(["f32", "bf16", "f16", "q8_0"]), default="f16", show_default=True,
              help="Precision of the weight matrices (norms and biases stay f32).")
def export(model_dir, gguf_path, dtype):
    """Write MODEL (a model folder, or a LoRA adapter folder: merged into its base) as one GGUF file with its
    tokenizer and chat template."""
    from thinkforge.export import export_gguf

    _quiet_hf()
    done = export_gguf(model_dir, gguf_path, dtype)
    click.echo(f"wrote {model_dir} as {done['path']} ({done['architecture']}, {dtype}, {done['tensors']} tensors, "
               f"{done['bytes'] / 1e6:.0f} MB); run it with llama.cpp: llama-cli -m {done['path']} -cnv")


# ---------------------------------------------------------------- grade


@cli.command(context_settings=CTX)
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output JSONL: each input row plus `correct` (true/false).")
@click.option("--kind", type=click.Choice(["math", "gsm8k", "mcq", "exact"]), default="math", show_default=True,
              help="Answer kind for rows without a `kind` column (gsm8k: reference is a solution ending in '#### N'; "
                   "exact: the string itself; a reasoning-gym row's own scorer is its task's, at evaluation).")
def grade(input_path, out_path, kind):
    """Grade completions: each row has `completion`, `reference`, optionally `kind` and `choices`."""
    from thinkforge import grading
    from thinkforge.io import read_jsonl, write_jsonl

    rows = read_jsonl(input_path, required=["completion", "reference"], nonempty=True)
    for i, row in enumerate(rows, 1):
        k = row.get("kind", kind)
        if k not in ("math", "gsm8k", "mcq", "exact"):
            raise UserError(f"{input_path}: row {i}: unknown kind {k!r}; use math, gsm8k, mcq or exact")
        if not isinstance(row["completion"], str) or not isinstance(row["reference"], (str, int, float)):
            raise UserError(f"{input_path}: row {i}: completion must be a string and reference a string or number")
    out = []
    for row in rows:
        ok = grading.grade(row["completion"], str(row["reference"]), row.get("kind", kind), row.get("choices"))
        out.append({**row, "correct": ok})
    write_jsonl(out_path, out)
    n_right = sum(r["correct"] for r in out)
    click.echo(f"accuracy {n_right / max(1, len(out)):.4f} ({n_right}/{len(out)}) -> {out_path}")


# ---------------------------------------------------------------- eval


@cli.command("eval", context_settings=CTX)
@model_options
@sampling_options
@click.option("--benchmark", "-b", "benchmarks", multiple=True,
              help="A task by name (repeatable): synthetic, gsm8k, math500, aime24, gpqa_diamond, local, "
                   "reasoning_gym:<task> (e.g. reasoning_gym:chain_sum) or a tasks.mixes name. [eval.benchmarks]")
@click.option("--samples", "-k", type=int, default=None, help="Samples per problem; pass@1 is averaged over them. [eval.samples]")
@click.option("--limit", type=int, default=None, help="Only the first N problems. [eval.limit]")
@click.option("--data-path", default=None, help="Local JSONL/Parquet (file or folder) in the benchmark's schema, instead of the hub.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="Column mapping for --benchmark local: question=..., answer=..., id=...")
@click.option("--difficulty", type=int, default=None, help="Synthetic task difficulty 1-4. [synthetic.difficulty]")
@click.option("--out", "out_dir", default="runs/eval", show_default=True, type=click.Path(file_okay=False),
              help="Folder for <benchmark>.samples.jsonl and <benchmark>.summary.json.")
@config_options
def eval_cmd(benchmarks, columns, out_dir, config_path, overrides, **options):
    """Evaluate a model: pass@1, format compliance, reasoning presence, thinking length."""
    from thinkforge import evaluate

    given = {"eval.benchmarks": list(benchmarks) or None}
    for c in columns:
        if "=" not in c:
            raise UserError(f"--column {c!r} is not FIELD=COLUMN; e.g. --column question=prompt")
        field, column = c.split("=", 1)
        given[f"eval.columns.{field}"] = column
    recipe = recipe_from(config_path, overrides, given, **options)
    _quiet_hf()
    results = evaluate.run(recipe, recipe.model.name_or_path, out_dir)
    click.echo(evaluate.table(results))
    click.echo(f"samples and summaries in {out_dir}/")


@cli.command(context_settings=CTX)
@click.argument("before", type=click.Path())
@click.argument("after", type=click.Path())
def compare(before, after):
    """Did a stage help? The pass@1 change from BEFORE to AFTER (`thinkforge eval --out` folders or
    <benchmark>.samples.jsonl files of the same problems), paired by problem, with its 95% interval."""
    from thinkforge import evaluate
    from thinkforge.io import read_jsonl

    def samples(path: str) -> dict[str, Path]:
        p = Path(path)
        if p.is_file():
            if not p.name.endswith(".jsonl"):
                raise UserError(f"{path}: not a samples file; give <benchmark>.samples.jsonl or its `thinkforge eval --out` folder")
            return {p.name.removesuffix(".jsonl").removesuffix(".samples"): p}
        found = {f.name.removesuffix(".samples.jsonl"): f for f in sorted(p.glob("*.samples.jsonl"))} if p.is_dir() else {}
        if not found:
            raise UserError(f"{path}: no <benchmark>.samples.jsonl here; give a `thinkforge eval --out` folder or a samples file")
        return found

    a, b = samples(before), samples(after)
    if len(a) == 1 and len(b) == 1:  # two files (or folders) of one benchmark each: compare them whatever their names
        pairs = [(next(iter(a)), next(iter(a.values())), next(iter(b.values())))]
    else:
        pairs = [(name, a[name], b[name]) for name in a if name in b]
    if not pairs:
        raise UserError(f"{before} ({', '.join(a)}) and {after} ({', '.join(b)}) share no benchmark")
    lines = ["| benchmark | before | after | change | 95% interval | problems up / down | n |", "|---|---|---|---|---|---|---|"]
    need = ["problem_id", "question", "reference", "correct"]
    for name, path_a, path_b in pairs:
        _same_protocol(name, path_a, path_b)
        try:
            c = evaluate.paired_change(read_jsonl(path_a, need), read_jsonl(path_b, need))
        except ValueError as e:
            raise UserError(f"{name}: {e}; compare evaluations of the same benchmark and problems") from None
        lines.append(f"| {name} | {100 * c['before']:.1f} | {100 * c['after']:.1f} | {100 * c['change']:+.1f} | "
                     f"{100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f} | {c['gained']} / {c['lost']} | {c['n']} |")
    click.echo("\n".join(lines))


def _same_protocol(name: str, path_a: Path, path_b: Path) -> None:
    """Two evaluations are paired only under one protocol (sampling settings, samples per problem, seed): the
    .summary.json beside each samples file records it."""
    import json

    def protocol(samples: Path) -> dict | None:
        summary = samples.with_name(samples.name.removesuffix(".samples.jsonl") + ".summary.json")
        return json.loads(summary.read_text()).get("protocol") if summary.is_file() else None

    a, b = protocol(path_a), protocol(path_b)
    if a is not None and b is not None and a != b:
        diff = ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise UserError(f"{name}: the two evaluations ran under different protocols ({diff}); pairing needs the same "
                        f"sampling settings and seed: re-run one with the other's")


# ---------------------------------------------------------------- generate / chat


@cli.command(context_settings=CTX)
@model_options
@sampling_options
@click.option("--prompt", "-p", "prompts", multiple=True, help="A question (repeatable); wrapped in the prompt format.")
@click.option("--input", "input_path", default=None, type=click.Path(dir_okay=False),
              help="JSONL with a `question` (or `prompt`) column, instead of --prompt.")
@click.option("--samples", "-n", "n", type=int, default=1, show_default=True, help="Completions per prompt.")
@click.option("--raw", is_flag=True, help="Send prompts as they are, without the prompt format.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write JSONL rows (prompt, completion, thinking, answer, finish_reason) instead of printing.")
@config_options
def generate(prompts, input_path, n, raw, out_path, config_path, overrides, **options):
    """Generate completions for questions and show thinking and answer apart."""
    from thinkforge.formats import parse, response
    from thinkforge.io import read_jsonl, write_jsonl

    questions = list(prompts)
    if input_path:
        for i, row in enumerate(read_jsonl(input_path, nonempty=True), 1):
            q = row.get("question", row.get("prompt"))
            if not isinstance(q, str):
                raise UserError(f"{input_path}: row {i}: needs a `question` or `prompt` string column")
            questions.append(q)
    if not questions:
        raise UserError("nothing to generate: pass --prompt TEXT or --input FILE.jsonl")
    if n < 1:
        raise UserError("--samples must be at least 1")
    recipe = recipe_from(config_path, overrides, **options)
    gen, _, render, params = load_generator(recipe)
    texts = questions if raw else [render(q) for q in questions]
    completions = gen.generate(texts, n, params)
    rows = []
    for c in completions:
        p = parse(response(texts[c.prompt_index], c.text))  # a pre-filled <think> counts as opened
        rows.append({"question": questions[c.prompt_index], "completion": c.text, "thinking": p.thinking,
                     "answer": p.answer, "format_ok": p.format_ok, "finish_reason": c.finish_reason})
    if out_path:
        write_jsonl(out_path, rows)
        click.echo(f"wrote {len(rows)} completions to {out_path}")
        return
    for r in rows:
        click.echo(click.style("question: ", bold=True) + r["question"])
        if not r["format_ok"]:  # the parts alone would hide what the model wrote
            click.echo(click.style("output:   ", fg="yellow") + r["completion"].strip()
                       + click.style("   (not in the <think>/<answer> format)", dim=True))
        click.echo(click.style("thinking: ", fg="cyan") + (r["thinking"] or "(none)"))
        click.echo(click.style("answer:   ", fg="green") + str(r["answer"]) + f"   [{r['finish_reason']}]\n")


class _ThinkingPrinter:
    """Prints a streamed completion with thinking and answer in separate, labelled sections."""

    LABELS = {"<think>": "thinking", "</think>": None, "<answer>": "answer", "</answer>": None}

    def __init__(self, echo):
        self.echo, self.buffer, self.section = echo, "", None

    def feed(self, piece: str) -> None:
        self.buffer += piece
        while True:
            hits = [(self.buffer.find(t), t) for t in self.LABELS if t in self.buffer]
            if not hits:
                # Hold back a possible partial tag at the end of the buffer.
                cut = self.buffer.rfind("<")
                safe = self.buffer if cut < 0 or ">" in self.buffer[cut:] else self.buffer[:cut]
                self._text(safe)
                self.buffer = self.buffer[len(safe):]
                return
            pos, tag = min(hits)
            self._text(self.buffer[:pos])
            self.buffer = self.buffer[pos + len(tag):]
            label = self.LABELS[tag]
            if label:
                self.echo(click.style(f"\n[{label}]\n", fg="cyan" if label == "thinking" else "green", bold=True), nl=False)
            self.section = label

    def _text(self, text: str) -> None:
        if text:
            self.echo(text, nl=False)

    def close(self) -> None:
        self._text(self.buffer)
        self.buffer = ""
        self.echo("")


@cli.command(context_settings=CTX)
@model_options
@sampling_options
@config_options
def chat(config_path, overrides, **options):
    """Chat in the terminal: each answer streams, thinking and answer shown apart; the conversation is kept
    (each turn sees the ones before), `/reset` starts a new one, Ctrl-D ends."""
    from thinkforge.formats import render_messages

    recipe = recipe_from(config_path, overrides, **options)
    gen, tok, _, params = load_generator(recipe)
    m = recipe.model
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo(click.style("you> ", bold=True), nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history.clear()
            click.echo(click.style("(a new conversation)", dim=True))
            continue
        history.append({"role": "user", "content": line.strip()})
        printer, reply = _ThinkingPrinter(click.echo), []
        for piece in gen.stream(render_messages(history, tok, m.prompt_format, m.system_prompt), params):
            printer.feed(piece)
            reply.append(piece)
        printer.close()
        history.append({"role": "assistant", "content": "".join(reply)})


# ---------------------------------------------------------------- serve


@cli.command(context_settings=CTX)
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 127.0.0.1 keeps it to this machine.")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0 = any free port).")
@click.option("--api-key", default=None, envvar="THINKFORGE_API_KEY",
              help="Require `Authorization: Bearer KEY` (or set THINKFORGE_API_KEY).")
@click.option("--served-model-name", default=None, help="Model id reported by /v1/models; default: the --model value.")
@click.option("--batch-size", type=int, default=None, help="Sequences generated together for n > 1. [generation.batch_size]")
@config_options
def serve(host, port, api_key, served_model_name, config_path, overrides, **options):
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions)."""
    from thinkforge.serve import Settings, make_server

    recipe = recipe_from(config_path, overrides, **options)
    gen, tok, _, _ = load_generator(recipe)
    name = served_model_name or recipe.model.name_or_path
    try:
        settings = Settings(name, host, port, api_key, recipe.model.prompt_format, recipe.model.system_prompt)
        server = make_server(gen, tok, settings, log=lambda line: click.echo(line, err=True))
    except (OSError, OverflowError) as e:  # a port in use or out of range, a host that is not this machine's
        reason = getattr(e, "strerror", None) or str(e)
        raise UserError(f"cannot serve on {host}:{port} ({reason}); pick another --port (0-65535, free) or --host") from None
    click.echo(f"serving {name} on http://{server.server_address[0]}:{server.server_address[1]}/v1 (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------- data and training stages


@cli.group(context_settings=CTX)
def data():
    """Make training data: teacher rollouts (distill), rejection sampling (select) and DPO pairs (pairs)."""


@data.command("distill", context_settings=CTX)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output JSONL (appended; a rerun skips finished problems).")
@click.option("--task", default=None, help="The task of the problems, by name (synthetic, reasoning_gym:<task>, a "
              "tasks.mixes name, ...). [distill.source]")
@click.option("--teacher", type=click.Choice(["synthetic", "solution", "hf", "openai"]), default=None,
              help="synthetic (programmatic, with slips), solution (the task's worked solutions), hf (local model) or "
                   "openai (any compatible endpoint). [distill.teacher]")
@click.option("--teacher-model", default=None, help="Model folder / hub id (hf) or served model name (openai). [distill.teacher_model]")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1. [distill.base_url]")
@click.option("--samples", "-n", type=int, default=None, help="Rollouts per problem. [distill.samples]")
@click.option("--problems", type=int, default=None, help="Number of problems. [distill.n_problems]")
@click.option("--slip-rate", type=float, default=None, help="Synthetic teacher's share of flawed rollouts. [distill.slip_rate]")
@config_options
def data_distill(out_path, task, teacher, teacher_model, base_url, samples, problems, slip_rate, config_path, overrides):
    """Ask a teacher for N chain-of-thought rollouts per problem and grade each (all kept, with grades)."""
    from thinkforge.data import distill

    given = {"distill.source": task, "distill.teacher": teacher, "distill.teacher_model": teacher_model, "distill.base_url": base_url,
             "distill.samples": samples, "distill.n_problems": problems, "distill.slip_rate": slip_rate}
    recipe = recipe_from(config_path, overrides, given)
    _quiet_hf()
    cfg = recipe.distill
    probs = distill.problems_for(recipe)
    stats = distill.main(probs, distill.teacher_for(cfg, recipe), cfg.samples, out_path)
    click.echo(f"{stats['rollouts']} new rollouts, acceptance {stats['acceptance']:.3f}, "
               f"{stats['skipped_done']} problems already done -> {out_path}")


@data.command("select", context_settings=CTX)
@click.argument("input_path", metavar="ROLLOUTS.jsonl", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for accepted.jsonl, rejected.jsonl, hard.jsonl, stats.json, pass_rates.json.")
@click.option("--max-pass-rate", type=float, default=None, help="Hard subset: teacher pass rate at most this. [select.max_pass_rate]")
@click.option("--min-difficulty", type=int, default=None, help="Hard subset: difficulty level at least this. [select.min_difficulty]")
@click.option("--min-words", type=int, default=None, help="Hard subset: rollouts at least this many words. [select.min_words]")
@config_options
def data_select(input_path, out_dir, max_pass_rate, min_difficulty, min_words, config_path, overrides):
    """Rejection sampling: keep correct rollouts (deduplicated), keep incorrect ones for DPO, pick the hard subset."""
    from thinkforge.data import selection

    given = {"select.max_pass_rate": max_pass_rate, "select.min_difficulty": min_difficulty, "select.min_words": min_words}
    cfg = recipe_from(config_path, overrides, given).select
    stats = selection.main(input_path, out_dir, cfg.max_pass_rate, cfg.min_difficulty, cfg.min_words)
    click.echo(f"accepted {stats['accepted']} ({stats['duplicates_dropped']} duplicates dropped), rejected "
               f"{stats['rejected']}, hard {stats['hard']} from {stats['hard_problems']} problems -> {out_dir}")


@data.command("pairs", context_settings=CTX)
@click.option("--rollouts", "rollout_files", multiple=True, type=click.Path(dir_okay=False),
              help="Graded rollouts JSONL (from `data distill`: the teacher's); repeatable.")
@click.option("--model", "-m", default=None,
              help="Also sample this checkpoint's own rollouts and grade them, on the problems `thinkforge run` uses "
                   "(pipeline.policy_problems of the synthetic task's own draw, or the first distilled problems).")
@click.option("--samples", type=int, default=None, help="With --model: samples per problem. [pairs.policy_samples]")
@click.option("--problems", type=int, default=None, help="With --model: how many problems. [pipeline.policy_problems]")
@click.option("--per-problem", type=int, default=None, help="Pairs per problem at most. [pairs.per_problem]")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Output JSONL: question, chosen, rejected, chosen_source, rejected_source.")
@config_options
def data_pairs(rollout_files, model, samples, problems, per_problem, out_path, config_path, overrides):
    """Build DPO pairs: a correct (chosen) and an incorrect (rejected) rollout of the same problem."""
    from thinkforge.data import pairs as pairs_mod

    given = {"pairs.policy_samples": samples, "pairs.per_problem": per_problem, "pipeline.policy_problems": problems}
    recipe = recipe_from(config_path, overrides, given)
    if not rollout_files and not model:
        raise UserError("nothing to pair: pass --rollouts FILE.jsonl and/or --model CHECKPOINT")
    _quiet_hf()
    stats = pairs_mod.make(recipe, out_path, list(rollout_files), model)
    click.echo(f"{stats['problems_with_both']} of {stats['problems']} problems have both sides; "
               f"{stats['pairs']} pairs -> {out_path}")


@cli.command("plan", context_settings=CTX)
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(dir_okay=False))
@click.option("--gpus", type=int, default=0, show_default=True,
              help="GPUs the stages train on (ranks); 0 = this machine's CPU and memory.")
@click.option("--gpu-memory", default=None, help="Memory of one GPU, e.g. 80GB or 24GB (with --gpus; default 80GB).")
@click.option("--strategy", type=click.Choice(["auto", "ddp", "fsdp2"]), default="auto", show_default=True,
              help="How the model state is laid out over the GPUs (the accelerate config you launch with: "
                   "recipes/accelerate/ddp.yaml or fsdp2.yaml), for every stage; auto = FSDP2 on several GPUs.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def plan_cmd(recipe_path, gpus, gpu_memory, strategy, overrides):
    """Predict each stage's peak memory per device from the model's config (no weights), the largest
    micro-batch that fits, and what to change where a stage does not fit."""
    from thinkforge import plan
    from thinkforge.config import load_config

    if gpus < 0:
        raise UserError(f"--gpus {gpus}: give 0 (this machine) or a number of GPUs")
    if gpu_memory and not gpus:
        raise UserError(f"--gpu-memory {gpu_memory} needs --gpus N (without it the plan is for this machine's memory)")
    recipe = load_config(recipe_path, list(overrides))
    _quiet_hf()
    memory = plan.parse_memory(gpu_memory or "80GB") if gpus else plan.machine_memory()
    click.echo(plan.render(plan.plan(recipe, gpus, memory, strategy), gpus, memory))


def _stage_command(stage) -> None:
    """`thinkforge <stage>`: the stage's run folder from --model (and --data) with the recipe's section; its own
    options (stages.STAGES) are shortcuts for its keys."""

    def command(data_path, model, out_dir, lora, old_stage, config_path, overrides, **options):
        if old_stage:
            raise UserError(f"`thinkforge sft --stage {old_stage}` is now `thinkforge {old_stage}` (the same options)")
        data_keys, _ = stage.data_option
        given = {"model.name_or_path": model, "lora.enabled": lora,
                 **({k: data_path if v is None else v for k, v in data_keys.items()} if data_path else {}),
                 **{key: options[_param(flag)] for flag, (key, _, _) in stage.options.items()
                    if options[_param(flag)] is not None}}  # --data FILE --task gsm8k: FILE in gsm8k's schema
        recipe = recipe_from(config_path, overrides, given)  # what it trains on is in the saved config
        _quiet_hf()
        with run_folder(out_dir):
            save_resolved(recipe, out_dir)
            final = stage.run(recipe, out_dir)
        click.echo(f"{stage.name} finished: model in {final}")

    data_keys, data_help = stage.data_option
    keys = ", ".join(k if v is None else f"{k}={v}" for k, v in data_keys.items())
    opts = [
        click.option("--data", "data_path", default=None, help=f"{data_help}. [{keys}]"),
        click.option("--model", "-m", default=None, help="Starting model (hub id, folder, or a LoRA adapter folder: "
                     "merged first, a new adapter trains on it); the reference where the stage has one. [model.name_or_path]"),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help=stage.out_help),
        click.option("--lora/--no-lora", default=None, help="Train a LoRA adapter instead of all weights. [lora.enabled]"),
        click.option("--stage", "old_stage", default=None, hidden=True),
        *[click.option(flag, _param(flag), type=click.Choice(kind) if isinstance(kind, tuple) else kind, default=None,
                       help=f"{text}. [{key}]") for flag, (key, kind, text) in stage.options.items()],
    ]
    for o in reversed(opts):
        command = o(command)
    cli.command(stage.name, context_settings=CTX, help=stage.summary)(config_options(command))


def _param(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _stage_commands() -> None:
    from thinkforge.stages import STAGES

    for stage in STAGES.values():
        _stage_command(stage)


_stage_commands()


# ---------------------------------------------------------------- demo


@cli.command(context_settings=CTX)
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Run folder (default: runs/<recipe name>). A rerun skips finished stages and resumes the cut one.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def run(recipe_path, out_dir, overrides):
    """Run a recipe's stages in order (distill, mid-training, SFT, DPO, RL), evaluating after each."""
    from thinkforge import pipeline
    from thinkforge.config import load_config
    from thinkforge.report import stage_table

    recipe = load_config(recipe_path, list(overrides))
    _quiet_hf()
    out = Path(out_dir or Path("runs") / Path(recipe_path).stem)
    summary = pipeline.main(recipe, out)
    click.echo("")
    click.echo(stage_table(summary))
    click.echo(f"\nwall time {summary['wall_seconds']:.0f} s; final model {summary['final_model']}; report {out / 'report.md'}")


@cli.command(context_settings=CTX)
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder of the demo.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def demo(out_dir, overrides):
    """The CPU demo: the whole four-stage recipe (recipes/tiny.yaml) on a tiny model and the synthetic task."""
    from importlib import resources

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
    if not recipe.is_file():
        recipe = Path(str(resources.files("thinkforge") / "recipes" / "tiny.yaml"))
    run.main(args=[str(recipe), "--out", out_dir, *overrides], standalone_mode=False)


def disk_error(error: BaseException) -> str | None:
    """One line for a write the disk refused (read-only, full, no permission), else None. safetensors reports
    these as its own error type with the OS error inside its message."""
    import errno

    codes = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
    if isinstance(error, OSError) and error.errno in codes:
        where = Path(error.filename).parent if error.filename else "the output folder"
        what = codes[error.errno]
    else:
        text = str(error)
        found = [(c, w) for c, w in codes.items() if f"os error {c})" in text.lower() or f"code: {c}," in text]
        if not found:
            return None
        where, what = "the output folder", found[0][1]
    return f"cannot write to {where}: {what}; free space there or choose another output path (--out)"


def _fail(line: str, code: int = 2) -> None:
    """The one error line, on a line of its own (open progress bars end first), and exit `code` (2: the user's
    input; 1: a bug, its traceback above). On N ranks every rank ends with the same line and code."""
    _FAILING["now"] = True  # the launcher's SIGTERM no longer interrupts this rank's own ending
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()
    ranks = _ranks()
    if ranks is not None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher ends the other ranks once one exits: finish first
        first = ranks.peer_failure() is None
        code, line = ranks.failed(code, line)  # the first failing rank's, where another failed first
    click.echo(f"thinkforge: error: {line}", err=True)
    if ranks is not None:  # no barrier: a peer may be gone; skip the teardown (see main), not the exit handlers
        import atexit

        sys.stderr.flush()
        ranks.said()
        if first:  # wake the peers waiting in a collective and let them say the line before this rank exits
            ranks.release_peers(ranks.world())

        atexit._run_exitfuncs()  # a rollout server this rank started stops with it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _ranks():
    """thinkforge.train.dist when this process is a rank of several, else None. Imports nothing (it runs in the
    SIGTERM handler too, which may interrupt an import): only `dist.init` joins a group, so a process that has not
    imported that module has none."""
    dist = sys.modules.get("thinkforge.train.dist")
    return dist if dist is not None and hasattr(dist, "joined") and dist.joined() else None


_FAILING = {"now": False}  # this rank is ending on an error of its own (or a peer's): SIGTERM waits for it


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"thinkforge: warning: {message}\n" if filename.startswith(_PACKAGE) else _python_format(message, category, filename, lineno, line)


_PACKAGE = str(Path(__file__).resolve().parent)
_python_format = warnings.formatwarning


def _on_launcher_term(signum, frame) -> None:
    """SIGTERM on a rank of several. The launcher ends the remaining ranks as soon as one has exited, and the
    first failing rank exits once its line is out: a peer still on its way to that line (computing, unwinding
    from a broken collective) is ended here, wherever the main thread is between two bytecodes, with the failing
    rank's line and code, which `_fail` reads from the store. A rank already ending on an error keeps ending (its
    line or the first failure's). Without a group (the ranks have not joined yet) or without a recorded failure,
    a neutral line: the rank that ended first has said why."""
    if _FAILING["now"]:
        return
    if _ranks() is None:  # no store to read: the first rank's own line is above
        _FAILING["now"] = True
        os.write(2, f"thinkforge: error: rank {os.environ.get('RANK', '?')}: ended by the launcher (SIGTERM): another "
                    "rank ended first (its line above says why), or the launch was stopped\n".encode())
        os._exit(128 + signum)
    _fail(f"rank {os.environ.get('RANK', '?')}: ended by the launcher (SIGTERM) with no rank's error recorded: another "
          "rank died without a word (killed, out of memory?), or the launch was stopped; the launcher's summary names "
          "its exit code", 128 + signum)


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _one_line_warning  # ours read as one line; a library's keep their source
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of several: the launcher's SIGTERM ends it with a line
        import signal

        signal.signal(signal.SIGTERM, _on_launcher_term)
    try:
        code = cli.main(args=argv, prog_name="thinkforge", standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except click.exceptions.Abort:
        click.echo("thinkforge: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors too: one line that names the command's help
        ctx = getattr(e, "ctx", None)
        _fail(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
    except Exception as e:
        _FAILING["now"] = True  # from here this rank ends with its own line or the first failure's
        line = disk_error(e)
        if line is None and _ranks() is None:
            raise
        if line is None:  # on N ranks: a peer's failure seen here as a broken collective, or this rank's own bug
            peer = _ranks().peer_failure() or _ranks().timed_out(e)
            if peer is None:  # this rank's own bug: its traceback, then the line every rank ends with
                import traceback

                traceback.print_exc()
                peer = 1, (f"rank {_ranks().rank()}: {type(e).__name__}: {e}".splitlines() or [""])[0]
            _fail(peer[1], peer[0])
        _fail(line)
    code = code if isinstance(code, int) else 0
    if _ranks() is not None:  # a training command on N ranks: leave the group together
        try:
            _ranks().leave()
        except Exception:  # noqa: BLE001 - a peer failed while this rank waited to leave
            peer = _ranks().peer_failure() or (1, "a peer rank stopped without a word before the end (killed?)")
            _fail(peer[1], peer[0])
        # skip the interpreter's teardown, where a C++ thread still held aborts 1 run in ~10
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
