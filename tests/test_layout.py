"""The house's shape: no import circle among thinkforge's modules (imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "thinkforge"


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thinkforge"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("thinkforge"))
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_detector_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_stage_of_the_table_has_the_shared_main_a_section_a_command_and_a_card_line():
    """A stage is its module, its recipe section and one row of stages.STAGES: the pipeline, the CLI and the
    report read the table, so none of them names a stage (plan.py does: a stage's memory depends on its kind)."""
    import inspect
    import re
    import typing

    from click.testing import CliRunner

    from thinkforge.cli import cli
    from thinkforge.config import PipelineConfig, Recipe, _Stage, load_config
    from thinkforge.report import model_card
    from thinkforge.stages import STAGES

    shared = ["recipe", "stage", "run_dir", "data", "progress", "stop_after"]
    listed = typing.get_args(typing.get_args(PipelineConfig.model_fields["stages"].annotation)[0])
    assert set(listed) == {"distill", *STAGES}
    card = model_card(load_config(None, ["model.prompt_format=phi2"]), {"final_model": "/nowhere", "protocol": {"benchmarks": ["synthetic"], "temperature": 0.6,
                                 "top_p": 0.95, "max_new_tokens": 8, "samples": 1}, "stages": []}, "base")
    for name, stage in STAGES.items():
        assert list(inspect.signature(stage.main()).parameters)[: len(shared)] == shared, name
        assert issubclass(type(getattr(Recipe(), name)), _Stage), name
        help_text = CliRunner().invoke(cli, [name, "--help"]).output
        assert "--out" in help_text and all(flag in help_text for flag in stage.options), name
        assert re.search(rf"- {re.escape(stage.title)} \(stage \d\): ", card, re.IGNORECASE), name
    for path in [PACKAGE / "pipeline.py", PACKAGE / "cli.py"]:  # driven by the table, not by names
        text = path.read_text()
        assert not re.search(r"""\b(sft|dpo|rl)_stage\b|stage == ["'](midtrain|sft|dpo|rl)["']""", text), path.name


# How the layout test reaches each registered task's problems without the hub: (argument, options, data file).
TASK_SAMPLES = {
    "synthetic": (None, {}, None),
    "gsm8k": (None, {}, "gsm8k_test.jsonl"),
    "math500": (None, {}, "math500_test.jsonl"),
    "aime24": (None, {}, "aime24_train.jsonl"),
    "gpqa_diamond": (None, {}, "gpqa_diamond_train.jsonl"),
    "local": (None, {}, "custom.jsonl"),
    "reasoning_gym": ("chain_sum", {}, None),
}
TASK_COLUMNS = {"local": {"question": "prompt", "answer": "target", "id": "uid"}}


def test_every_registered_task_is_one_file_and_one_line_and_checks_its_own_problems():
    """A task is a `Task` subclass in its own module under thinkforge/tasks/ and one line of tasks.TASKS: its
    problems carry it, its checker gives its own reference 1.0 and a wrong answer less, in [0, 1], and its levels
    (if any) are what its problems say they were drawn at. No consumer compares a task's name: they reach tasks
    through their problems."""
    import importlib

    from thinkforge import tasks

    fixtures = Path(__file__).parent / "fixtures"
    assert set(tasks.TASKS) == set(TASK_SAMPLES), "give a new task a row in TASK_SAMPLES"
    for family, where in tasks.TASKS.items():
        module, _, cls_name = where.partition(":")
        assert (PACKAGE.parent / (module.replace(".", "/") + ".py")).is_file(), family
        cls = getattr(importlib.import_module(module), cls_name)
        assert issubclass(cls, tasks.Task) and cls.family == family, family
        argument, options, data = TASK_SAMPLES[family]
        name = f"{family}:{argument}" if argument else family
        task = tasks.load(name, {name: options}, data_path=str(fixtures / data) if data else None,
                          columns=TASK_COLUMNS.get(family))
        assert task.name == name
        levels = [task.levels[0]] if task.levels else None
        problems = task.problems("test", 2, 0, levels)
        assert 1 <= len(problems) <= 2 and all(p.task is task for p in problems), family
        for p in problems:
            assert p.score(p.reference) == 1.0, (family, p.id)
            assert 0.0 <= p.score("zzz not an answer") < 1.0, (family, p.id)
            assert p.score(None) == 0.0, (family, p.id)
            if levels:
                assert p.meta["difficulty"] == levels[0], family
        if task.levels is not None:
            assert list(task.levels) == sorted(task.levels) and all(isinstance(x, int) for x in task.levels), family
    consumers = ["evaluate.py", "pipeline.py", "cli.py", "rewards.py", "train/rl.py", "train/sampling.py",
                 "data/distill.py", "data/pairs.py", "data/selection.py", "report.py"]
    names = set(tasks.TASKS)
    for rel in consumers:
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr in ("source", "benchmark"):
                literal = [c.value for c in node.comparators if isinstance(c, ast.Constant)]
                assert not set(literal) & names, f"{rel}:{node.lineno} compares a task's name: reach it through the task"


def _parametrized(module: str, test: str, argument: str) -> list:
    """The values a test module's test is parametrized over (its module imported as pytest imports it)."""
    import importlib

    marks = getattr(importlib.import_module(module), test).pytestmark
    return next(list(m.args[1]) for m in marks if m.name == "parametrize" and m.args[0] == argument)


def test_every_architecture_of_the_table_is_offered_by_init_model_and_read_from_the_table():
    """An architecture is one row of arch.ARCHS: init.arch's Literal (written out for pydantic) and
    `init-model --arch` offer exactly the rows, the tiny-model test runs every row, and the modules that act on
    an architecture name none of its classes (they read the table)."""
    import typing

    from thinkforge.arch import ARCHS
    from thinkforge.cli import cli
    from thinkforge.config import InitConfig

    assert set(typing.get_args(InitConfig.model_fields["arch"].annotation)) == set(ARCHS)
    option = next(p for p in cli.commands["init-model"].params if p.name == "arch")
    assert list(option.type.choices) == list(ARCHS)
    assert _parametrized("test_models", "test_every_architecture_inits_loads_and_takes_lora", "arch") == list(ARCHS)
    names = {n for row in ARCHS.values() for n in (row.model_class, row.config_class)}
    for rel in ["engine/fast.py", "export.py", "models.py", "tiny.py", "config.py", "cli.py"]:
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                raise AssertionError(f"{rel}:{node.lineno} names {node.value}: read it from arch.ARCHS")


def test_every_row_marked_fast_step_is_checked_against_transformers():
    from thinkforge.arch import ARCHS

    fast = [name for name, row in ARCHS.items() if row.fast_step]
    assert _parametrized("test_fast_step", "test_the_fast_step_gives_transformers_logits", "arch") == fast


def test_every_row_with_a_llama_cpp_name_is_checked_against_llama_cpp():
    """(Skipped with tests/test_export.py where llama.cpp's venv is not built.)"""
    from thinkforge.arch import ARCHS

    exported = [name for name, row in ARCHS.items() if row.gguf]
    assert _parametrized("test_export", "test_every_exported_architecture_matches_in_f32", "arch") == exported


def test_every_rollout_backend_of_the_config_is_one_loader_and_rollout_imports_no_training_code():
    """rollout.backend's Literal equals rollout.LOADERS' keys (a backend is one module and one row); the three
    interfaces stay narrow: a sampling-only backend has no policy sync and no stream, and no module of rollout/
    or engine/ imports train/ (the trainer hands rollout plain functions, `types.Policy`)."""
    import typing

    from thinkforge import rollout
    from thinkforge.config import RolloutConfig
    from thinkforge.rollout.openai import OpenAIClient
    from thinkforge.rollout.vllm import VLLMGenerator

    assert list(typing.get_args(RolloutConfig.model_fields["backend"].annotation)) == list(rollout.LOADERS)
    for cls in (OpenAIClient, VLLMGenerator):
        assert not {"push", "prove", "stream", "load_weights", "done"} & set(vars(cls)), cls
    for folder in ("rollout", "engine"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("thinkforge.train"):
                    raise AssertionError(f"{folder}/{path.name}:{node.lineno} imports {node.module}")


@pytest.mark.parametrize("section,field,table", [("RLConfig", "advantage", "thinkforge.losses:ADVANTAGES"),
                                                  ("RLConfig", "policy_loss", "thinkforge.losses:POLICY_LOSSES"),
                                                  ("ModelConfig", "prompt_format", "thinkforge.formats:FORMATS"),
                                                  ("RolloutConfig", "backend", "thinkforge.rollout:LOADERS")])
def test_every_config_choice_equals_its_table(section, field, table):
    """A config Literal is written out for pydantic; the table the code dispatches on is the fact: they are equal."""
    import importlib
    import typing

    from thinkforge import config

    module, name = table.split(":")
    choices = typing.get_args(getattr(config, section).model_fields[field].annotation)
    assert list(choices) == list(getattr(importlib.import_module(module), name))
