import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-initialised tiny Phi3 model folder with the local tokenizer (made once per test session)."""
    from thinkforge import tiny

    return str(tiny.init_model(tmp_path_factory.mktemp("models") / "tiny-phi3"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    from thinkforge import models

    return models.load(tiny_model)


def run_cli(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from thinkforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
