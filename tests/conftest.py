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


def with_dropout(folder, p: float):
    """The model folder with every dropout of its config (residual, embedding, attention: whatever the
    architecture has) set to p: a tiny model that has Phi-2's residual dropout 0.1 and more."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update({k: p for k, v in config.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)})
    path.write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory):
    """A tiny Phi (Phi-2's architecture) with residual, embedding and attention dropout 0.1 in its config."""
    from thinkforge import tiny
    from thinkforge.config import InitConfig

    return with_dropout(tiny.init_model(tmp_path_factory.mktemp("models") / "tiny-phi-dropout", InitConfig(arch="phi")), 0.1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    from thinkforge import models

    return models.load(tiny_model)


def engine_python(venv: str, target: str, what: str):
    """The python of an engine's own venv (`make <target>`, which `make test` builds first). Missing: under CI a
    failure, never a silent skip; elsewhere the calling test module is skipped with the command to build it."""
    from pathlib import Path

    python = Path(__file__).resolve().parent.parent / venv / "bin" / "python"
    if not python.is_file():
        if os.environ.get("CI"):
            raise RuntimeError(f"{python} is missing: `make {target}` must run before the tests (make test does)")
        pytest.skip(f"{what} is not built: run `make {target}` (make test builds it)", allow_module_level=True)
    return python


def run_cli(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from thinkforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def random_lora(model, r: int, alpha: int, std: float):
    """`model` with a LoRA adapter whose B matrices are random (a fresh adapter is the identity)."""
    import torch

    from thinkforge import models

    model = models.add_lora(model, r=r, alpha=alpha)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model
