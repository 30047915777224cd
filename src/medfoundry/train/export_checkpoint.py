"""``medfoundry export CHECKPOINT_DIR OUT_DIR``: any saved training step as a Hugging Face folder.

A checkpoint holds each process's shards (:mod:`medfoundry.train.checkpoint`) and, in ``hf/``, the
model's config, generation config and tokenizer. The export reads one whole tensor at a time from the
shards (whatever number of processes wrote them, without a process group) and streams it into the
safetensors files, so it never holds more than one parameter: a 70B checkpoint exports on a machine
with a few GB of memory.
"""

from __future__ import annotations

from pathlib import Path

from medfoundry.errors import ConfigError
from medfoundry.model.export import Weights, export_hf
from medfoundry.train.checkpoint import DESCRIPTION, read_tensor, saved_tensors, verify_checkpoint

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def checkpoint_weights(checkpoint: Path) -> Weights:
    """The model weights of a checkpoint, read one tensor at a time, with the model's description."""
    from transformers import AutoConfig, GenerationConfig

    description = checkpoint / DESCRIPTION
    if not (description / "config.json").is_file():
        raise ConfigError(
            f"{checkpoint}: this checkpoint has no {DESCRIPTION}/config.json (a LoRA run's: its adapter is in "
            "the run's adapter/ folder; or not a medfoundry training checkpoint)"
        )
    config = AutoConfig.from_pretrained(str(description), trust_remote_code=False)
    generation = None
    if (description / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(description))
    spec = saved_tensors(checkpoint, "model")
    tensors = ((name, read_tensor(checkpoint, name)) for name in spec)
    architecture = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
    return Weights(config, generation, architecture, spec, tensors)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Verify the checkpoint (every file against its manifest), then write ``out_dir``: weights in
    ``dtype`` (``bf16``/``fp32``; default: the run's own export dtype, recorded in its config)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(f"{checkpoint}: no such checkpoint folder (a run's checkpoints/step-NNNNNNNN)")
    verify_checkpoint(checkpoint)
    weights = checkpoint_weights(checkpoint)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    name = DTYPES[dtype] if dtype else str(getattr(weights.config, "dtype", None) or "float32").removeprefix("torch.")
    return export_hf(weights, checkpoint / DESCRIPTION, Path(out_dir), dtype=name)
