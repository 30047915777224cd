"""The one place that turns a model or tokenizer reference into something loaded: a Hugging Face checkpoint
directory, a Hub id (``org/name[@revision]``, downloaded into the Hugging Face cache: :mod:`medfoundry.model.hub`,
through :func:`resolve_reference`) or a GGUF file resolved to a directory (:func:`hf_directory`, one cache for
every stage), models
(:func:`load_model` for inference, :func:`load_causal_lm` with :func:`weights_policy` for training) and
tokenizers (:func:`load_tokenizer`, :func:`load_backend_tokenizer`) under the same safety rules, and the cache
root (:func:`cache_root`). Every stage loads through here.

A GGUF file is dequantized once into a regular checkpoint in a cache directory (keyed on the file's
path, size and modification time), because transformers cannot run a GGUF model without first
building that checkpoint. The context window follows lm-eval's rule (``n_positions``,
``max_position_embeddings``, ``n_ctx``, the tokenizer's ``model_max_length``, else 2048) so that long
inputs are cut at the same place as in lm-eval.

Checkpoints are untrusted input (:func:`weights_policy`, used by every loader: evaluation, serving,
pretraining and fine-tuning): weights load from safetensors whenever they are there; a checkpoint
whose weights are only pickles (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) is refused unless the
caller passes ``allow_pickle``, and even then goes through ``torch.load(weights_only=True)``, which
rebuilds tensors and refuses any other object; a ``config.json`` asking for the checkpoint's own
Python code (``auto_map``) is refused unless the caller passes ``trust_remote_code``, which is
otherwise passed to transformers as ``False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medfoundry.errors import ConfigError, InputError
from medfoundry.io import folder_lock, write_json
from medfoundry.model import hub
from medfoundry.runtime import configure, resolve_device_precision

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # what transformers loads with torch.load
WEIGHT_FILES = SAFE_WEIGHT_FILES + PICKLE_WEIGHT_FILES
SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weights in Python's pickle format
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer gives a length
_UNSET_TOKENIZER_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER: "no limit recorded"
CONVERTED = ".converted.json"  # a GGUF cache folder's completion record: its files and their sizes, written last


@dataclass
class LoadedModel:
    """A model ready for scoring, its weights in ``precision`` (bf16: bfloat16 weights, as lm-eval's
    ``dtype="bfloat16"``, rather than float32 weights under autocast, which casts every weight at every
    forward pass)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    name: str
    path: Path
    precision: str
    device: str
    max_length: int

    def autocast(self):
        """bfloat16 autocast for bf16 runs (a no-op for fp32), for callers that feed float32 tensors
        (e.g. embeddings) to a bf16 model."""
        import torch

        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def load_model(
    path,
    *,
    precision: str = "auto",
    device: str = "auto",
    tokenizer=None,
    threads: int = 0,
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``path`` (checkpoint directory, Hub id or ``.gguf`` file) in eval mode.

    ``tokenizer`` overrides the checkpoint's own: a directory, a Hub id, a ``.gguf`` file or a loaded fast
    tokenizer. ``cache_dir`` holds dequantized GGUF checkpoints (default ``$MEDFOUNDRY_CACHE`` or
    ``~/.cache/medfoundry``, subfolder ``gguf``). ``allow_pickle`` and ``trust_remote_code``: see
    :func:`weights_policy`.
    """
    configure(threads)
    device, resolved = resolve_device_precision(device, precision)
    if precision == "auto" and resolved not in ("bf16", "fp32"):  # fp16 on older GPUs: scores need fp32 there
        resolved = "fp32"
    if resolved not in ("bf16", "fp32"):
        raise ConfigError(f"precision {precision!r}: evaluation runs in 'bf16' or 'fp32' (or 'auto')")
    precision = resolved
    name = model_name(path)
    path = resolve_reference(path, allow_pickle=allow_pickle)
    directory = gguf_checkpoint(path, cache_dir) if is_gguf(path) else path
    policy = check_checkpoint(
        directory, need_tokenizer=tokenizer is None, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    tok = load_tokenizer(directory if tokenizer is None else tokenizer, trust_remote_code=trust_remote_code)
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_causal_lm(directory, policy, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        name=name,
        path=path,
        precision=precision,
        device=device,
        max_length=context_window(model.config, tok),
    )


def check_checkpoint(
    directory: Path, *, need_tokenizer: bool = True, allow_pickle: bool = False, trust_remote_code: bool = False
) -> dict:
    """Name the missing piece before transformers fails with a message about the Hub, and refuse what
    :func:`weights_policy` refuses. Returns the ``from_pretrained`` arguments that load the weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(str(directory), "model not found: expected a checkpoint directory or a .gguf file")
    if not (directory / "config.json").is_file():
        raise InputError(str(directory), "no config.json: not a Hugging Face checkpoint directory")
    policy = weights_policy(directory, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if need_tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            str(directory),
            f"no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} (or pass a tokenizer explicitly)",
        )
    return policy


def weights_policy(directory: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """How to load the weights of checkpoint ``directory`` without running code from it: the keyword
    arguments for ``from_pretrained``, or an :class:`InputError` saying why it is refused.

    - safetensors (``model.safetensors``, or an index whose shards are all ``.safetensors`` files inside the
      directory) are used whenever present, whatever else the directory holds (``use_safetensors=True``);
    - pickled weights alone (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``...) are refused: unpickling
      runs whatever code the file names. With ``allow_pickle`` they load through
      ``torch.load(weights_only=True)`` (``use_safetensors=False, weights_only=True``), which only rebuilds
      tensors and containers and refuses anything else;
    - ``auto_map`` in ``config.json`` (the model's own Python code) is refused unless ``trust_remote_code``;
      transformers always gets ``trust_remote_code`` explicitly, so it never asks or decides by itself.
    """
    directory = Path(directory)
    config = _read_config(directory)
    if config.get("auto_map") and not trust_remote_code:
        raise InputError(str(directory / "config.json"), _remote_code_refusal(config))
    explicit = config.get("transformers_weights")  # config.json may name its weights file; transformers then uses it
    if isinstance(explicit, str):
        safe = [explicit] if explicit.endswith(SAFE_SUFFIXES) and (directory / explicit).is_file() else []
    else:
        safe = [name for name in SAFE_WEIGHT_FILES if (directory / name).is_file()]
    if safe:
        if safe[0].endswith(".index.json"):
            _check_safetensors_index(directory / safe[0])
        return {
            "use_safetensors": True,
            "weights_only": True,
            "trust_remote_code": trust_remote_code,
            "local_files_only": True,
        }
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise InputError(str(directory), f"no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not allow_pickle:
        raise InputError(
            str(directory),
            f"refused: its weights are pickled ({', '.join(pickles[:3])}), and loading a "
            "pickle can run any code it names. Convert them to safetensors (load them once "
            "where you trust the file and save_pretrained(..., safe_serialization=True)), "
            "or allow pickled weights (--allow-pickle; in a config, allow_pickle: true for "
            "eval, model.allow_pickle: true for pretrain and finetune): they then load with "
            "torch.load(weights_only=True), which rebuilds tensors and refuses any other "
            "object",
        )
    if not any((directory / name).is_file() for name in PICKLE_WEIGHT_FILES):
        raise InputError(
            str(directory),
            f"no weights transformers can load: found {', '.join(pickles[:3])}, expected "
            f"one of {', '.join(WEIGHT_FILES)}",
        )
    return {
        "use_safetensors": False,
        "weights_only": True,
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
    }


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(str(path), f"not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(str(path), "not a JSON object")
    return config


def _remote_code_refusal(config: dict) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    classes = config["auto_map"] if isinstance(config["auto_map"], dict) else {}
    shown = ", ".join(f"{k}: {v}" for k, v in list(classes.items())[:3]) or repr(config["auto_map"])
    model_type = config.get("model_type")
    native = (
        f" transformers implements model_type {model_type!r} itself: deleting 'auto_map' from config.json "
        "loads the model without that code."
        if model_type in CONFIG_MAPPING_NAMES
        else ""
    )
    return (
        f"refused: 'auto_map' asks to run Python code shipped with the checkpoint ({shown}), and medfoundry "
        f"never runs a checkpoint's code unless told to trust it (trust_remote_code=True).{native}"
    )


def _check_safetensors_index(index: Path) -> None:
    """Every shard of a sharded safetensors checkpoint is a ``.safetensors`` file in the directory:
    transformers would ``torch.load`` a shard named otherwise."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(str(index), f"not a safetensors index (a JSON object with a 'weight_map'): {exc!r}") from None
    bad = sorted(
        str(s) for s in shards if not (isinstance(s, str) and s.endswith(".safetensors") and Path(s).name == s)
    )
    if bad:
        raise InputError(
            str(index), f"refused: shards {', '.join(bad[:3])} are not .safetensors files in the checkpoint directory"
        )


def load_causal_lm(directory: Path, policy: dict, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(directory, **policy, **kwargs)``, with a refused pickle reported
    as an :class:`InputError` naming the checkpoint."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), **policy, **kwargs)
    except Exception as exc:
        cause: BaseException | None = exc
        for _ in range(16):  # transformers may wrap torch's error; chains can loop
            if cause is None or isinstance(cause, pickle.UnpicklingError):
                break
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, pickle.UnpicklingError):
            raise
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise InputError(
            str(directory),
            "pickled weights refused by torch.load(weights_only=True): they hold more "
            f"than tensors, which a weights file never needs ({first})",
        ) from None


def load_tokenizer(source, *, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """The one loader of ``transformers`` tokenizers: a directory, a Hub id, a ``.gguf`` file (its embedded
    tokenizer, read from the GGUF cache: :func:`tokenizer_directory`), or a tokenizer already loaded, which
    passes through.

    Local files only (``local_files_only``; a Hub id's snapshot is downloaded first, :func:`resolve_reference`).
    A ``tokenizer_config.json`` asking to run the tokenizer's own Python code (``auto_map``) is an
    :class:`InputError` naming the file unless ``trust_remote_code``. Slow (Python) tokenizers are refused: every
    stage tokenizes whole batches in one call of the Rust tokenizer."""
    from transformers import AutoTokenizer

    if isinstance(source, (str, os.PathLike)):
        source = tokenizer_directory(source)
        if not source.is_dir():
            raise InputError(str(source), "tokenizer not found: expected a directory or a .gguf file")
        else:
            _refuse_tokenizer_code(source / "tokenizer_config.json", trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(
                str(source), local_files_only=True, trust_remote_code=trust_remote_code
            )
    else:
        tokenizer = source
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {type(tokenizer).__name__}: a fast (Rust) tokenizer is required")
    return tokenizer


def _refuse_tokenizer_code(config: Path, trust_remote_code: bool) -> None:
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as exc:
        raise InputError(str(config), f"not a readable JSON object ({exc})") from None
    if auto_map:
        raise InputError(
            str(config),
            f"refused: 'auto_map' asks to run Python code shipped with the tokenizer ({auto_map!r:.200}), and "
            "medfoundry never runs a checkpoint's code unless told to trust it (trust_remote_code=True)",
        )


def load_backend_tokenizer(source: str | Path) -> Tokenizer:
    """The Rust ``tokenizers.Tokenizer`` of a tokenizer directory (``tokenizer.json``, or GPT-2's ``vocab.json`` +
    ``merges.txt``), a Hub id or a ``.gguf`` file: what training, tokenizing and counting use, with no
    ``transformers`` wrapper around it."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    source = tokenizer_directory(source)
    if (source / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(source / "tokenizer.json"))
    vocab, merges = source / "vocab.json", source / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizer = Tokenizer(BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer
    raise InputError(str(source), "not a tokenizer directory: expected tokenizer.json, or vocab.json and merges.txt")


def context_window(config, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: the first context field of the (text) config, else the
    tokenizer's ``model_max_length`` when it records one, else 2048."""
    config = getattr(config, "text_config", None) or config
    for field in CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            return int(value)
    recorded = getattr(tokenizer, "model_max_length", None)
    return int(recorded) if recorded is not None and recorded < _UNSET_TOKENIZER_LENGTH else DEFAULT_MAX_LENGTH


def is_gguf(path: str | Path) -> bool:
    """Whether a model or tokenizer reference names a GGUF file (the one place that decides it)."""
    return Path(path).suffix == ".gguf"


def model_name(path: str | Path) -> str:
    """The name a model goes by in reports and the API: its GGUF file's stem, its folder's name, or its Hub
    repository's name."""
    if hub.is_hub_id(path):
        return hub.repo_name(str(path))
    path = Path(path)
    return path.stem if is_gguf(path) else path.resolve().name


def resolve_reference(reference: str | Path, *, allow_pickle: bool = False) -> Path:
    """A model or tokenizer reference as a local path: a Hub id's snapshot folder in the Hugging Face cache
    (downloaded when needed; pickled weights only with ``allow_pickle``, :func:`medfoundry.model.hub.resolve`),
    any other reference as given (an existing local path always wins over a Hub id)."""
    if hub.is_hub_id(reference):
        return hub.resolve(str(reference), allow_pickle=allow_pickle)
    return Path(reference)


def check_reference(reference: str | Path, field: str, *, allow_pickle: bool = False) -> Path:
    """``reference`` as a path that names a model: a ``.gguf`` file, a Hugging Face directory (``config.json``)
    or a Hub id's snapshot of one, else a :class:`ConfigError` naming the config ``field`` that gave it."""
    path = resolve_reference(reference, allow_pickle=allow_pickle)
    if (is_gguf(path) and path.is_file()) or (path / "config.json").is_file():
        return path
    raise ConfigError(
        f"{field} {reference}: not a Hugging Face model directory (no config.json), a .gguf file nor a Hub id "
        "(org/name[@revision])"
    )


def hf_directory(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """A Hugging Face directory for a model or tokenizer reference: the path itself, a Hub id's snapshot
    (:func:`resolve_reference`), or for a ``.gguf`` file its dequantized checkpoint in the cache (so a GGUF works
    wherever a tokenizer or model directory does)."""
    path = resolve_reference(path, allow_pickle=allow_pickle)
    return gguf_checkpoint(path) if is_gguf(path) else path


def gguf_checkpoint(gguf_path: Path, cache_dir: str | Path | None = None) -> Path:
    """The dequantized checkpoint of a GGUF file, converted on first use.

    This is the one GGUF cache: every stage (training's ``init_from``, evaluation, serving, tokenizing) reads
    the same conversion. The key covers the file's resolved path, size and modification time, so a replaced
    file is converted again; ``convert_gguf`` writes the directory atomically, its files fsynced, so an
    interrupted conversion never leaves a half-written checkpoint behind, and the lock makes concurrent
    processes (torchrun ranks) take turns: one converts, the others find it done. The directory is trusted
    only with its completion record (:func:`_converted`).
    """
    from medfoundry.model.convert import convert_gguf

    return _gguf_cached(Path(gguf_path), "gguf", convert_gguf, cache_dir)


def tokenizer_directory(reference: str | Path) -> Path:
    """A Hugging Face tokenizer directory for a tokenizer reference: a folder or a Hub id's snapshot as
    :func:`hf_directory` gives it, but for a ``.gguf`` file only its embedded tokenizer, written once into the
    cache (``gguf-tokenizer``): tokenizing a corpus with a GGUF model's tokenizer never dequantizes its weights,
    and every later load reads a ``tokenizer.json`` in a fraction of a second instead of parsing the GGUF's
    metadata again (about 8 s for SmolLM2's 49k-token vocabulary)."""
    from medfoundry.model.convert import convert_gguf_tokenizer

    path = resolve_reference(reference)
    return _gguf_cached(path, "gguf-tokenizer", convert_gguf_tokenizer) if is_gguf(path) else path


def _gguf_cached(gguf_path: Path, kind: str, convert, cache_dir: str | Path | None = None) -> Path:
    """``convert(gguf_path, out)`` once into the cache folder ``kind``, keyed on the file's resolved path, size and
    modification time (a replaced file is converted again), under a lock that makes concurrent processes take
    turns; trusted only with its completion record (:func:`_converted`)."""
    if not gguf_path.is_file():
        raise InputError(str(gguf_path), "GGUF file not found")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / kind / f"{gguf_path.stem}-{key}"
    if not _converted(out):
        with folder_lock(out, "GGUF conversion", wait=True):
            if not _converted(out):  # another process may have converted it meanwhile
                convert(gguf_path, out)
                write_json(out / CONVERTED, _file_sizes(out))  # last, once the files are on disk
    return out


def _converted(out: Path) -> bool:
    """Whether a GGUF cache folder holds a finished conversion: its completion record is there and every file
    it lists has its size. A folder without it (a conversion by a version that did not fsync its files, which
    a power cut may have left with ``config.json`` and empty weights) or with a truncated file is converted
    again."""
    try:
        recorded = json.loads((out / CONVERTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    sizes = _file_sizes(out)
    return isinstance(recorded, dict) and bool(recorded) and all(sizes.get(n) == b for n, b in recorded.items())


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def cache_root() -> Path:
    """medfoundry's cache folder (GGUF conversions, measured peak FLOP/s): ``$MEDFOUNDRY_CACHE``, else
    ``$XDG_CACHE_HOME/medfoundry`` or ``~/.cache/medfoundry``."""
    if os.environ.get("MEDFOUNDRY_CACHE"):
        return Path(os.environ["MEDFOUNDRY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medfoundry"
