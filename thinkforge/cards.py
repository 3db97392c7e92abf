"""Model cards' shared parts: the Hub's YAML header and a LoRA adapter folder's own card. The full card of a
run (results, schedule, loading snippet) is report.model_card; both start with `metadata`.
"""

from __future__ import annotations

import json
from pathlib import Path


def _license(base: str) -> str:
    """The base model's license from its card's metadata or its GGUF conversion record (a local folder),
    else "other"."""
    record = Path(base) / "conversion.json"
    if record.is_file() and json.loads(record.read_text()).get("license"):
        return json.loads(record.read_text())["license"]
    card = Path(base) / "README.md"
    if card.is_file():
        head = card.read_text(errors="replace").split("---")
        for line in head[1].splitlines() if len(head) > 2 else []:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or "other"
    return "other"


def metadata(base: str, adapter: bool, tags: list[str], license_id: str | None = None) -> str:
    """The Hub's YAML header of a model card: base_model (a hub id, or a local base as an absolute path),
    library, tags, license."""
    base_ref = str(Path(base).resolve()) if Path(base).exists() else base
    lines = ["---", f"base_model: {json.dumps(base_ref)}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", f"license: {license_id or _license(base)}", "tags:"]
    lines += [f"- {t}" for t in ["thinkforge", *tags]] + ["---", ""]
    return "\n".join(lines)


# The base of a QLoRA adapter loaded as it trained (models.four_bit_config's settings), in a card's snippet.
FOUR_BIT_SNIPPET = ('quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",\n'
                    '        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.{dtype}),\n'
                    '    device_map="auto"')


def four_bit_words(compute_dtype: str) -> str:
    """What a card says of an adapter trained on a 4-bit base."""
    return (f"It was trained on the base loaded in 4 bits (NF4, double-quantized scales, products in {compute_dtype}; "
            "QLoRA): load the base that way to compute what training computed. On the full-precision base it "
            "also loads (that is what `thinkforge merge` and `thinkforge export` merge it into); the outputs then "
            "differ by the base's rounding to 4 bits.")


def adapter_card(cfg: dict, four_bit: str | None = None) -> str:
    """The card of a LoRA adapter folder: Hub metadata, what it is, and how plain peft loads it. A `thinkforge
    run` replaces it with the full card of the run (results, schedule). four_bit: the compute dtype of the 4-bit
    base it trained on (QLoRA), None for a full-precision base."""
    base = cfg.get("base_model_name_or_path") or ""
    targets = cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
    quant = "" if four_bit is None else ",\n    " + FOUR_BIT_SNIPPET.format(dtype=four_bit)
    return metadata(base, True, ["lora"]) + f"""# LoRA adapter (thinkforge)

A LoRA adapter (r {cfg.get("r")}, alpha {cfg.get("lora_alpha")}, targets {targets}) trained with thinkforge on
`{base}`.{"" if four_bit is None else " " + four_bit_words(four_bit)}

```python
{"import torch" + chr(10) if four_bit else ""}from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer{", BitsAndBytesConfig" if four_bit else ""}

base = AutoModelForCausalLM.from_pretrained({json.dumps(base)}{quant})
model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```

For llama.cpp, Ollama or LM Studio, one GGUF file (the adapter merged into its base, the tokenizer and chat
template): `thinkforge export PATH/TO/THIS/FOLDER --gguf model.gguf --dtype f16`, then `llama-cli -m model.gguf -cnv`.
"""
