"""Loading, adapting and saving causal LMs.

- load(name_or_path, ...): any Hugging Face causal LM by hub id or local folder, or a PEFT adapter folder
  (its base is loaded first). 4-bit NF4 (QLoRA) through bitsandbytes, on CUDA or a CPU (import_bitsandbytes).
- add_lora(model, ...): PEFT LoRA with per-architecture default targets (arch.ARCHS' `lora_targets`).
- disable_dropout(model): the training-mode forward made the eval-mode one (RL and DPO: PITFALLS 22).
- save(model, tokenizer, out): a standard folder, full weights or a PEFT adapter (optionally merged),
  written to a temporary folder and renamed, safetensors only.
Tiny random-init models for tests and the demo are in tiny.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from thinkforge import cards
from thinkforge.arch import ARCHS
from thinkforge.errors import UserError
from thinkforge.io import respect_umask


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available here; use device=cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _check_source(name_or_path: str) -> None:
    p = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists() or name_or_path.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"model folder {name_or_path} not found; pass a folder from `thinkforge init-model` or a hub id")
    if p.is_dir() and not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise UserError(f"{name_or_path} holds no config.json or adapter_config.json; it is not a model folder")
    if not p.is_dir():
        _check_hub(name_or_path)


def _check_hub(repo_id: str) -> None:
    """A hub id must be in the local cache or the hub reachable: fail in seconds with one line, not after
    20 s of retry logs (offline machines, firewalls)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except ValueError:  # not a valid repo id
        raise UserError(f"model {repo_id!r} is neither a local folder nor a valid hub id (owner/name)") from None
    hint = f"download it where the hub is reachable (`huggingface-cli download {repo_id}`) or pass a local folder"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub at {host}:{port} ({e.strerror or e}) to download "
                        f"{repo_id!r}; {hint}") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right; training builds its own batches
    return tok


# The bitsandbytes release whose CPU 4-bit layers thinkforge is tested with (the test lock): the floor of the
# `qlora` extra; older releases are refused on a CPU rather than tried.
BNB_CPU = "0.50.2"


def import_bitsandbytes(device: str):
    """bitsandbytes, or one line saying which release to install (none, or one older than BNB_CPU on a CPU). Its
    import asks the optional `kernels` package for a Hub kernel on a CPU with AVX-512 BF16: thinkforge/__init__.py
    keeps that import from finding `kernels` (no code is fetched unasked), so bitsandbytes takes its own compiled
    CPU kernels, whoever imports it first (peft does, whenever bitsandbytes is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    need = f"pip install 'bitsandbytes>={BNB_CPU}' (or 'thinkforge[qlora]')"
    try:
        have = version("bitsandbytes")
    except PackageNotFoundError:
        raise UserError(f"model.load_in_4bit needs bitsandbytes, which is not installed: {need}") from None
    if device == "cpu" and Version(have) < Version(BNB_CPU):
        raise UserError(f"model.load_in_4bit on a CPU: bitsandbytes {have} is older than {BNB_CPU}, the release "
                        f"thinkforge's CPU 4-bit path is tested with; {need}")
    import bitsandbytes

    return bitsandbytes


def _never_repack_for_cpu_inference(model) -> None:
    """bitsandbytes 0.50's Linear4bit, on a CPU with AVX-512 BF16, rewrites its weight into a layout for its
    inference kernel at the first forward in eval mode without gradients (a sampling pass), for good; every later
    forward, training ones too, then runs that kernel, which has no backward: gradients through the layer are
    silently wrong (layer-0 LoRA gradients 10-20% off on a tiny Llama, measured), or the forward fails where the
    layer has a bias (Phi-2). RL samples and trains the same model, so the rewrite is switched off: every forward
    dequantizes and multiplies, with gradients (tests/test_qlora.py)."""
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            if "support_avx512bf16_for_cpu" not in vars(module):  # a release that decides it elsewhere: say so
                raise UserError(f"bitsandbytes {bitsandbytes.__version__}'s Linear4bit has no support_avx512bf16_for_cpu "
                                f"switch, which thinkforge turns off so that a sampling pass cannot leave it without "
                                f"gradients; install bitsandbytes=={BNB_CPU}")
            module.support_avx512bf16_for_cpu = False


def four_bit_config(compute_dtype):
    """QLoRA's base (its paper, the Infused Phi-2 card): NF4 weights, double-quantized scales, products computed in
    the dtype the rest of the model is loaded in (model.dtype: bf16 on CUDA, float32 on a CPU unless asked)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load(
    name_or_path: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    *,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    trainable_adapter: bool = False,
):
    """(model, tokenizer). A folder with adapter_config.json loads its base, then the adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    adapter_cfg = Path(name_or_path) / "adapter_config.json"
    base = name_or_path
    if adapter_cfg.is_file():
        base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        _check_source(base)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        import_bitsandbytes(device)
        kwargs["quantization_config"] = four_bit_config(torch_dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else device}
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load model {base!r}: {str(e).splitlines()[0]}") from None
    if not load_in_4bit:
        model.to(device)
    if load_in_4bit:  # before an adapter is put on: peft's preparation freezes every parameter there is
        _never_repack_for_cpu_inference(model)
        from peft import prepare_model_for_kbit_training

        with _peft_asking_a_deprecated_question():  # checkpointing below, as without 4 bits (non-reentrant)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter_cfg.is_file():
        from peft import PeftModel

        with _peft_asking_a_deprecated_question():
            model = PeftModel.from_pretrained(model, name_or_path, is_trainable=trainable_adapter)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    tok_source = name_or_path if (Path(name_or_path) / "tokenizer_config.json").is_file() else base
    return model, load_tokenizer(tok_source, trust_remote_code)


def adapter_base(path: str) -> tuple[str | None, int | None]:
    """(base model path, LoRA rank) of a PEFT adapter folder; (None, None) for a full model folder."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None, None
    data = json.loads(cfg.read_text())
    return data["base_model_name_or_path"], int(data.get("r", 16))


def default_lora_targets(model) -> list[str]:
    kind = getattr(model.config, "model_type", "")
    if kind not in ARCHS:
        raise UserError(
            f"no default LoRA targets for architecture {kind!r}; set lora.target_modules "
            f"(e.g. [q_proj, v_proj]); known: {', '.join(ARCHS)}"
        )
    return list(ARCHS[kind].lora_targets)


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: list[str] | None = None):
    """Wrap `model` in a trainable PEFT LoRA adapter (Infused Phi-2 defaults: r 16, alpha 32, dropout 0.05)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = target_modules or default_lora_targets(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"LoRA target modules {missing} are not in this model; its linear layers are {linear}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with _peft_asking_a_deprecated_question():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _peft_asking_a_deprecated_question():
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: a FutureWarning on every adapter
    that no user can act on. Only that warning is hidden; peft's own stay."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def disable_dropout(model) -> None:
    """Make `model`'s training-mode forward its eval-mode forward: every dropout module off (the config's
    residual, embedding and MLP dropout, PEFT's LoRA dropout) and every probability an attention or MoE module
    hands its kernel as a number (`attention_dropout`, `dropout_p`, `layerdrop`, `jitter_noise`, ...). RL and
    DPO compare the training pass with passes in eval mode (sampler, reference, old log-probs): with dropout in
    one of them, ratios, KL, implicit rewards and the sampler mismatch measure dropout noise (PITFALLS 22).
    The config is left as it is: a saved model keeps its dropout for a stage that trains with it (SFT).
    A probe forward then checks both modes agree (an architecture with noise under another name fails here)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("drop" in name or "jitter" in name):
                setattr(module, name, 0.0)
    ids = torch.arange(8, device=model.device).unsqueeze(0) % model.config.vocab_size  # (1, 8)
    with torch.no_grad(), eval_mode(model):  # (the mode it had, restored after both)
        got = [model.train(mode)(input_ids=ids, use_cache=False).logits.float() for mode in (True, False)]
    if not torch.allclose(*got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{type(model).__name__}: the training-mode forward still differs from the eval-mode one "
                           f"by {(got[0] - got[1]).abs().max().item():.3g} with every known dropout off: a random "
                           "layer this code does not know, which RL and DPO would compare (PITFALLS 22)")


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the passes inside (sampling, reference and old log-probs, probes, value targets); the
    model's mode is restored after them, on an error too."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def forward_cached(model, cache, **inputs):
    """(output, cache): `model(**inputs)` continuing the KV cache `cache`, and the cache it returns.

    transformers 5.24 renamed the forward's `past_key_values` to `cache` (and the output's field with it); the
    old name works, deprecated, until 5.40. Both generations are supported by name, decided once per model class.
    """
    name = cache_argument(model)
    out = model(**inputs, **{name: cache}, use_cache=True)
    return out, getattr(out, name)


def cache_argument(model) -> str:
    """The name of the KV-cache argument of this model's forward, "cache" or "past_key_values". A model whose
    forward takes neither, or no explicit positions, cannot run the decode loop or the shared-prompt pass,
    and thinkforge does not quietly take another path (PITFALLS 13): one line names the class and the version."""
    import torch

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if is_adapter(model):
        model = model.get_base_model()
    return _cache_argument(type(model))


@functools.cache
def _cache_argument(cls: type) -> str:
    import inspect

    import transformers

    takes = inspect.signature(cls.forward).parameters
    names = [n for n in ("cache", "past_key_values") if n in takes]
    missing = [n for n, ok in (("position_ids", "position_ids" in takes), ("cache / past_key_values", names)) if not ok]
    if missing:
        raise UserError(f"{cls.__name__}.forward (transformers {transformers.__version__}) takes no {' and no '.join(missing)} "
                        f"argument; thinkforge's decode loop and shared-prompt pass need both (a remote-code model "
                        f"written for another transformers? load it without trust_remote_code or pin transformers)")
    return names[0]


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save(model, tokenizer, out: str | Path, merged: bool = False, state_dict: dict | None = None,
         extra: dict[str, str] | None = None) -> Path:
    """Save a loadable folder atomically. An adapter is saved as a PEFT folder (or merged into full weights).

    The adapter's `base_model_name_or_path` is made absolute when the base is a local folder, so that
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)` works from any directory.
    extra: more files (name -> text) written into the folder before it is renamed into place.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if is_adapter(model) and merged:
            if four_bit_of(model):
                raise UserError("merging an adapter into 4-bit weights would round the update away: merge into "
                                "the full-precision base (thinkforge merge ADAPTER OUT loads it so)")
            model = model.merge_and_unload()
        # state_dict: a sharded model's full weights, gathered by the caller
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "adapter_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            base = cfg.get("base_model_name_or_path") or ""
            if base and Path(base).is_dir():
                cfg["base_model_name_or_path"] = str(Path(base).resolve())
                cfg_path.write_text(json.dumps(cfg, indent=2))
        if cfg_path.is_file():  # PEFT wrote its empty card template: ours says what this folder is
            (tmp / "README.md").write_text(cards.adapter_card(json.loads(cfg_path.read_text()), four_bit_of(model)))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        respect_umask(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def four_bit_of(model) -> str | None:
    """The compute dtype ("bfloat16", "float32", ...) of `model`'s 4-bit layers when its base was loaded in 4 bits,
    else None."""
    import sys

    import torch

    bnb = sys.modules.get("bitsandbytes")  # not imported: nothing was loaded in 4 bits
    for module in model.modules() if bnb is not None else ():
        if isinstance(module, bnb.nn.Linear4bit):  # not PEFT's LoRA wrapper of one, also named Linear4bit
            return str(module.compute_dtype or torch.float32).removeprefix("torch.")
    return None


def merge(adapter: str | Path, out: str | Path) -> Path:
    """Write `adapter` (a PEFT LoRA folder) merged into its base as a full-weight folder: the policy that a
    later stage starts from and refers to. The base is always loaded in full precision (float32), also for an
    adapter trained on a 4-bit base (QLoRA): adding the update to 4-bit weights would round the sum back to NF4's
    16 levels per block and lose most of it. The merged model is therefore the full-precision base plus the
    update, which differs from the 4-bit model that trained by the base's rounding (the QLoRA paper's setting)."""
    if not Path(adapter).is_dir():
        raise UserError(f"adapter folder {adapter} not found; pass a LoRA adapter folder (e.g. a LoRA run's final/)")
    if adapter_base(str(adapter))[0] is None:
        raise UserError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); nothing to merge")
    model, tok = load(str(adapter), dtype="float32", device="cpu")
    return save(model, tok, out, merged=True)


def _gguf_general(path: Path) -> dict:
    """The GGUF file's own description (name, organization, license, ...): its `general.*` string fields."""
    from gguf import GGUFReader

    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("general.") and key.split(".", 1)[1] in ("name", "organization", "basename", "size_label",
                                                                   "license", "finetune"):
            try:
                out[key.split(".", 1)[1]] = str(field.contents())
            except (ValueError, IndexError):
                pass
    return out


def from_gguf(path: str | Path, out: str | Path) -> Path:
    """Convert a GGUF file that transformers reads into an ordinary model folder (safetensors, tokenizer with
    its chat template, generation config). The weights are dequantised to float32; the plain architecture is
    rebuilt from the config (a model loaded from GGUF refuses to be saved) and must give the same logits."""
    import copy
    import hashlib
    import struct

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found; pass the path of a .gguf file (`make real-model` fetches one)")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the gguf package: pip install 'thinkforge[gguf]'") from None
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, struct.error) as e:  # a bad file
        raise UserError(f"cannot read {path} as a GGUF model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        f"the file may be truncated or of an architecture transformers does not read") from None
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if config.eos_token_id is not None and tok.eos_token_id != config.eos_token_id:
        raise UserError(f"{path}: the tokenizer's end token {tok.eos_token!r} (id {tok.eos_token_id}) is not the "
                        f"model's eos id {config.eos_token_id}; this file's metadata is inconsistent")
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    if tok.bos_token_id is not None:
        config.bos_token_id = tok.bos_token_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.eval()
    probe = torch.tensor([tok("The answer is 42.", add_special_tokens=False).input_ids])
    with torch.no_grad():
        if not torch.equal(plain(probe).logits, quantized.eval()(probe).logits):
            raise RuntimeError(f"the rebuilt model's logits differ from the GGUF model's ({path})")
    plain.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    plain.config.name_or_path = path.stem
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = json.dumps({"gguf_file": path.name, "sha256": digest, **_gguf_general(path)}, indent=2) + "\n"
    return save(plain, tok, out, extra={"conversion.json": record})
