"""Turn a GGUF checkpoint (e.g. SmolLM2-135M-Instruct) into a normal Hugging Face directory.

A model loaded from a GGUF file cannot be saved or trained as is, so the weights are dequantized
into a freshly built model of the same config, which is then exported with the GGUF's tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from medfoundry.errors import InputError
from medfoundry.extras import require
from medfoundry.io import atomic_dir
from medfoundry.model.export import export_hf


def load_gguf(gguf_path: Path):
    """The model of a GGUF file, dequantized to float32, in eval mode.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` needs ``accelerate``, which
    medfoundry has no other use for; this reads the file with the same transformers GGUF reader and
    dequantizer, and gives the same weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InputError(str(gguf_path), "GGUF file not found")
    require("gguf", f"reading {gguf_path.name}")
    config = AutoConfig.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=False
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in tensors}
    unfilled = [name for name in missing if state[name].data_ptr() not in loaded]  # a tied head is filled
    if unfilled or unexpected:
        raise InputError(
            str(gguf_path),
            f"tensors do not match a {type(model).__name__}: missing {unfilled[:5]}, unexpected {unexpected[:5]}",
        )
    return model.eval()


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, generation_config.json, tokenizer) from a GGUF file."""
    gguf_path = Path(gguf_path)
    model = load_gguf(gguf_path)
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as tokenizer_dir:
        _save_embedded_tokenizer(gguf_path, Path(tokenizer_dir))
        return export_hf(model, Path(tokenizer_dir), out_dir, dtype=dtype)


def convert_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> Path:
    """Write ``out_dir`` with only the tokenizer embedded in a GGUF file (the files :func:`convert_gguf` writes
    beside the weights), atomically."""
    with atomic_dir(out_dir) as tmp:
        _save_embedded_tokenizer(Path(gguf_path), tmp)
    return Path(out_dir)


def _save_embedded_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Parse the tokenizer out of a GGUF file's metadata (transformers' GGUF reader) and save it into ``out_dir``
    as a portable Hugging Face tokenizer; everything else loads it from the GGUF cache
    (:func:`medfoundry.model.load.tokenizer_directory`). Its callers have checked that the file is there (the
    GGUF cache, :func:`load_gguf`)."""
    from transformers import AutoTokenizer

    require("gguf", f"reading {gguf_path.name}")
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=False
    )
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")


def _portable_tokenizer_class(config_path: Path) -> None:
    """transformers 5 records ``TokenizersBackend``, a class older versions and other tools do not know."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for load_option in ("is_local", "local_files_only"):
        config.pop(load_option, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
