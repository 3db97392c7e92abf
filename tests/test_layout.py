"""The house's shape: no import circle among thinkforge's modules (imports inside functions count too)."""

import ast
from pathlib import Path

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
    report read the table, so none of them names a stage."""
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
