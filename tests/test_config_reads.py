"""Every key of the schema does something: some code outside config.py reads it."""

import ast
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from thinkforge.config import Recipe, dump_config, load_config
from thinkforge.errors import UserError

PACKAGE = Path(__file__).resolve().parent.parent / "thinkforge"

# Keys the package reads without naming them, each with how.
READ_BY_NAME = {
    "Recipe.midtrain": "a stage section: the stage's main reads getattr(recipe, stage) with stage from stages.STAGES",
    "Recipe.sft": "a stage section: the stage's main reads getattr(recipe, stage) with stage from stages.STAGES",
}


def _sections(schema: type[BaseModel]):
    """(schema, field name) for every field of the schema and of the sections nested in it."""
    for name, field in schema.model_fields.items():
        yield schema, name
        for t in (field.annotation, *typing.get_args(field.annotation)):  # InitConfig | None
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _sections(t)


def _names_read(tree: ast.AST) -> set[str]:
    """Attribute names this code reads: `x.name` loads and `getattr(x, "name")`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            out.add(node.args[1].value)
    return out


def test_every_config_key_is_read_by_some_code():
    """A key no code reads does nothing however a recipe sets it (synthetic.n_train promised "training problems
    generated" and set none). config.py itself does not count: a validator reading a key does not make it act.
    Read means an attribute load of the key's name (or getattr with it) anywhere in the package, so a name that
    several sections share (batch_size) passes once any of them is read: this catches a key whose name nothing
    reads, not every dead key."""
    read = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name != "config.py":
            read |= _names_read(ast.parse(path.read_text()))
    unread = sorted({f"{schema.__name__}.{name}" for schema, name in _sections(Recipe)
                     if name not in read and f"{schema.__name__}.{name}" not in READ_BY_NAME})
    assert not unread, f"config keys no code reads: {unread}; make them act, or remove them (config.RENAMED)"


def test_what_the_allow_list_says_is_so():
    """Each key read by name is a stage whose main looks its section up by that name."""
    from thinkforge.stages import STAGES

    for key in READ_BY_NAME:
        section = key.split(".")[1]
        assert section in STAGES and section in Recipe.model_fields, key
        module = PACKAGE / "train" / f"{STAGES[section].module}.py"
        assert "getattr(recipe, stage)" in module.read_text(), module


def test_a_removed_key_names_its_replacement_and_an_old_runs_config_still_loads(tmp_path):
    """synthetic.n_train was read by nothing and is gone: a recipe that sets it is told what to set instead; the
    config.yaml of an earlier run, which holds it at its old default, still loads."""
    with pytest.raises(UserError, match=r"'synthetic.n_train' was replaced by distill.n_problems and rl.n_problems"):
        load_config(None, ["synthetic.n_train=500"])
    old = yaml.safe_load(dump_config(load_config(None, [])))
    old["synthetic"]["n_train"] = 2000  # as every run before the key's removal wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_config(tmp_path / "config.yaml") == load_config(None, [])
