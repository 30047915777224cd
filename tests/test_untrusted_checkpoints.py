"""Untrusted checkpoints: weights load from safetensors, or from pickles only when asked (--allow-pickle) and then
through torch.load(weights_only=True); a checkpoint asking for its own Python code (auto_map) is refused. Each
malicious file here would create a marker file if it were ever unpickled or imported: the marker never appears."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from medfoundry.errors import InputError, MedfoundryError
from medfoundry.generation.engine import Engine
from medfoundry.model.load import load_model
from medfoundry.train.model_setup import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


class Exploit:
    """Unpickling this calls ``exec``: a pickle may call any importable function with any arguments."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny GPT-2 with a small byte-level BPE, exported as medfoundry exports (safetensors)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM

    from medfoundry.model.export import export_hf
    from medfoundry.model.presets import model_config

    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["The patient had a fever and a cough; the blood pressure was high."] * 50, trainer)
    (root / "tok").mkdir()
    tokenizer.save(str(root / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    config = model_config(
        "gpt2-tiny",
        vocab_size=tokenizer.get_vocab_size(),
        context=64,
        overrides={"n_layer": 1, "n_embd": 32, "n_head": 2},
    )
    model = AutoModelForCausalLM.from_config(config)
    return export_hf(model, root / "tok", root / "model")


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def _without_weights(checkpoint: Path, dst: Path) -> Path:
    shutil.copytree(checkpoint, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    return dst


def _malicious_torch_file(path: Path, state: dict, marker: Path) -> None:
    """A real torch.save checkpoint (zip format) with one extra entry that runs code when unpickled."""
    torch.save({**state, "exploit": Exploit(marker)}, path)


def _malicious_raw_pickle(path: Path, state: dict, marker: Path) -> None:
    """A plain pickle (the legacy format torch.load also reads)."""
    path.write_bytes(pickle.dumps(Exploit(marker), protocol=2))


MALICIOUS = {"torch_zip": _malicious_torch_file, "raw_pickle": _malicious_raw_pickle}


def _loaders():
    return {
        "eval": lambda d, **kw: load_model(d, device="cpu", precision="fp32", threads=1, **kw),
        "serve": lambda d, **kw: Engine.load(d, device="cpu", precision="fp32", threads=1, **kw),
        "train": lambda d, **kw: load_pretrained(str(d), **kw),
    }


def test_the_exploit_is_real_when_unpickled_unsafely(tmp_path, checkpoint):
    """The control: the malicious file does run code under a plain torch.load, so the tests below mean something."""
    marker = tmp_path / "PWNED"
    _malicious_torch_file(tmp_path / "evil.bin", _state(checkpoint), marker)
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("loader", ["eval", "serve", "train"])
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_pickled_weights_are_refused_naming_the_flag(tmp_path, checkpoint, loader, kind):
    marker = tmp_path / "PWNED"
    directory = _without_weights(checkpoint, tmp_path / "pickled")
    MALICIOUS[kind](directory / "pytorch_model.bin", _state(checkpoint), marker)
    with pytest.raises(InputError, match=r"pickled.*pytorch_model\.bin.*--allow-pickle.*weights_only=True") as refused:
        _loaders()[loader](directory)
    assert str(directory) in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["eval", "serve", "train"])
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_allow_pickle_still_refuses_a_malicious_pickle(tmp_path, checkpoint, loader, kind):
    marker = tmp_path / "PWNED"
    directory = _without_weights(checkpoint, tmp_path / "pickled")
    MALICIOUS[kind](directory / "pytorch_model.bin", _state(checkpoint), marker)
    with pytest.raises(InputError, match=r"refused by torch\.load\(weights_only=True\)"):
        _loaders()[loader](directory, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["eval", "train"])
def test_allow_pickle_loads_plain_tensor_pickles(tmp_path, checkpoint, loader):
    directory = _without_weights(checkpoint, tmp_path / "pickled")
    torch.save(_state(checkpoint), directory / "pytorch_model.bin")
    loaded = _loaders()[loader](directory, allow_pickle=True)
    model = loaded.model if loader == "eval" else loaded
    expected = _state(checkpoint)["transformer.wte.weight"]
    assert torch.equal(model.get_input_embeddings().weight.float(), expected.float())


def test_safetensors_are_preferred_over_a_pickle_beside_them(tmp_path, checkpoint):
    marker = tmp_path / "PWNED"
    directory = tmp_path / "both"
    shutil.copytree(checkpoint, directory)
    _malicious_torch_file(directory / "pytorch_model.bin", _state(checkpoint), marker)
    for loader in _loaders().values():
        loader(directory)  # no allow_pickle needed: the pickle is never opened
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "model.ckpt", "weights.pth"])
def test_other_pickle_files_are_refused_too(tmp_path, checkpoint, name):
    marker = tmp_path / "PWNED"
    directory = _without_weights(checkpoint, tmp_path / "pickled")
    _malicious_torch_file(directory / name, _state(checkpoint), marker)
    with pytest.raises(InputError, match=rf"weights are pickled \({name}\).*--allow-pickle"):
        load_model(directory, device="cpu", threads=1)
    with pytest.raises(InputError, match=rf"no weights transformers can load: found {name}"):
        load_model(directory, device="cpu", threads=1, allow_pickle=True)
    assert not marker.exists()


def _remote_code_checkpoint(checkpoint: Path, directory: Path, marker: Path) -> Path:
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (directory / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (directory / "configuration_evil.py").write_text(code)
    (directory / "modeling_evil.py").write_text(code)
    return directory


@pytest.mark.parametrize("loader", ["eval", "serve", "train"])
def test_a_checkpoint_asking_for_its_own_code_is_refused(tmp_path, checkpoint, loader):
    marker = tmp_path / "PWNED"
    directory = _remote_code_checkpoint(checkpoint, tmp_path / "remote", marker)
    with pytest.raises(
        InputError,
        match=r"config\.json: refused: 'auto_map' asks to run Python code shipped with the "
        r"checkpoint \(AutoConfig: configuration_evil\.EvilConfig.*trust_remote_code",
    ):
        _loaders()[loader](directory)
    assert not marker.exists()


def test_the_remote_code_refusal_says_when_transformers_has_the_model_itself(tmp_path, checkpoint):
    directory = _remote_code_checkpoint(checkpoint, tmp_path / "remote", tmp_path / "PWNED")
    with pytest.raises(InputError, match="implements model_type 'gpt2' itself: deleting 'auto_map'"):
        load_model(directory, device="cpu", threads=1)


def _remote_code_tokenizer(checkpoint: Path, directory: Path, marker: Path) -> Path:
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    return directory


@pytest.mark.parametrize("loader", ["eval", "load", "finetune", "export"])
def test_a_tokenizer_asking_for_its_own_code_is_refused(tmp_path, checkpoint, loader):
    """Through the one loader (what training and every stage use) and the paths that copy or stage a tokenizer."""
    from medfoundry.model.export import copy_tokenizer
    from medfoundry.model.load import load_tokenizer
    from medfoundry.sft.templates import load_base_tokenizer

    marker = tmp_path / "PWNED"
    directory = _remote_code_tokenizer(checkpoint, tmp_path / "remote", marker)
    load = {
        "eval": lambda: load_model(directory, device="cpu", threads=1),
        "load": lambda: load_tokenizer(str(directory)),
        "finetune": lambda: load_base_tokenizer(directory),
        "export": lambda: copy_tokenizer(directory, (tmp_path / "copy").resolve()),
    }[loader]
    (tmp_path / "copy").mkdir()
    with pytest.raises(
        InputError,
        match=r"tokenizer_config\.json: refused: 'auto_map' asks to run Python code "
        r"shipped with the tokenizer.*trust_remote_code",
    ):
        load()
    assert not marker.exists()


def test_a_safetensors_index_naming_a_pickle_shard_is_refused(tmp_path, checkpoint):
    """transformers would torch.load a shard whose name does not end in .safetensors."""
    marker = tmp_path / "PWNED"
    directory = _without_weights(checkpoint, tmp_path / "sharded")
    state = _state(checkpoint)
    _malicious_torch_file(directory / "shard-1.bin", state, marker)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {name: "shard-1.bin" for name in state}})
    )
    with pytest.raises(
        InputError,
        match=r"model\.safetensors\.index\.json: refused: shards shard-1\.bin are not "
        r"\.safetensors files",
    ):
        load_model(directory, device="cpu", threads=1)
    assert not marker.exists()


def test_config_naming_a_pickle_as_its_weights_is_refused(tmp_path, checkpoint):
    """config.json's transformers_weights overrides the usual file names: naming a pickle makes it a pickle
    checkpoint."""
    marker = tmp_path / "PWNED"
    directory = tmp_path / "explicit"
    shutil.copytree(checkpoint, directory)
    _malicious_torch_file(directory / "adapter_model.bin", _state(checkpoint), marker)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(InputError, match=r"pickled \(adapter_model\.bin\)"):
        load_model(directory, device="cpu", threads=1)
    assert not marker.exists()


def test_cli_refuses_pickles_and_names_the_flag(tmp_path, checkpoint, capsys):
    from medfoundry.cli import main

    marker = tmp_path / "PWNED"
    directory = _without_weights(checkpoint, tmp_path / "pickled")
    _malicious_torch_file(directory / "pytorch_model.bin", _state(checkpoint), marker)
    assert main(["generate", str(directory), "The patient", "--max-tokens", "2", "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["generate", str(directory), "The patient", "--max-tokens", "2", "--quiet", "--allow-pickle"]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not marker.exists()
    torch.save(_state(checkpoint), directory / "pytorch_model.bin")
    assert main(["generate", str(directory), "The patient", "--max-tokens", "2", "--quiet", "--allow-pickle"]) == 0
    assert json.loads(capsys.readouterr().out)["completion_tokens"] == 2


@pytest.mark.parametrize(
    "argv, field",
    [
        (["eval", "--model", "m", "--allow-pickle"], "allow_pickle"),
        (["serve", "m", "--allow-pickle"], "allow_pickle"),
        (["chat", "m", "--allow-pickle"], "allow_pickle"),
        (["pretrain", "c.yaml", "--allow-pickle"], "allow_pickle"),
        (["finetune", "c.yaml", "--allow-pickle"], "allow_pickle"),
    ],
)
def test_every_command_that_loads_a_checkpoint_has_the_flag(argv, field):
    from medfoundry.cli import build_parser

    assert getattr(build_parser().parse_args(argv), field) is True
    assert getattr(build_parser().parse_args(argv[:-1]), field) is False


def test_training_checkpoints_never_unpickle_code(tmp_path):
    """A training checkpoint is read without running code from it: each process's RNG state with
    torch.load(weights_only=True), DCP's pickled index with an unpickler that accepts only DCP's own
    metadata classes, and a pickled object saved where a tensor belongs is refused, never unpickled."""
    import torch.distributed.checkpoint as dcp

    from medfoundry.train.checkpoint import Checkpointer, read_checkpoint
    from medfoundry.train.state import TrainState

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpointer = Checkpointer(tmp_path / "run", model=model, optimizer=optimizer, scheduler=scheduler)
    step = checkpointer.save(TrainState(step=1))
    marker = tmp_path / "PWNED"
    for name, plant in (("rng-00000.pt", _malicious_torch_file), (".metadata", _malicious_raw_pickle)):
        original = (step / name).read_bytes()
        plant(step / name, {}, marker)
        with pytest.raises((pickle.UnpicklingError, MedfoundryError)):
            read_checkpoint(step, verify=False)
        with pytest.raises((pickle.UnpicklingError, MedfoundryError)):
            checkpointer.load(step, verify=False)
        (step / name).write_bytes(original)
    assert not marker.exists()
    assert read_checkpoint(step)["trainer_state"]["step"] == 1

    planted = tmp_path / "planted"  # DCP pickles non-tensors: a weight saved as an object
    dcp.save({"model": {"weight": Exploit(marker), "bias": model.bias.detach()}}, checkpoint_id=planted, no_dist=True)
    from medfoundry.train.checkpoint import _load

    with pytest.raises(MedfoundryError, match="a pickled object where the checkpoint holds tensors"):
        _load(planted, {"model": {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}}, no_dist=True)
    assert not marker.exists()
