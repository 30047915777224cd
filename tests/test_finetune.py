"""`medfoundry finetune` end to end on tiny GPT-2 and LLaMA models: learning on response tokens only,
per-source validation, export with the chat template, exact resume, 2 processes equal to 1, LoRA
(adapters only train, added tokens train, merged export equals the adapted model), and config errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_torchrun
from medfoundry.config import validate
from medfoundry.errors import ConfigError
from medfoundry.sft.config import FinetuneConfig
from medfoundry.sft.finetune import finetune
from test_sft_dataset import write_sources
from test_sft_templates import make_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}

pytestmark = pytest.mark.usefixtures("one_thread")


def _base_model(directory: Path, tokenizer: Path, kind: str) -> Path:
    """A tiny random model saved as an HF directory with the tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(vocab),
                n_embd=48,
                n_layer=2,
                n_head=4,
                n_positions=256,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(vocab),
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                tie_word_embeddings=False,
            )
        )
    model.save_pretrained(directory)
    shutil.copy(tokenizer / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune_inputs")
    tokenizer = make_tokenizer(root / "tok")
    return {
        "sources": write_sources(root / "data"),
        "gpt2": _base_model(root / "gpt2", tokenizer, "gpt2"),
        "llama": _base_model(root / "llama", tokenizer, "llama"),
    }


def _tree(inputs: dict, out: Path, kind: str = "gpt2", **training) -> dict:
    return {
        "output_dir": str(out),
        "model": {"init_from": str(inputs[kind])},
        "data": {
            "max_length": 256,
            "allow_test_overlap": True,
            "seed": 1,
            "mixture": {"total": 240},
            "prepared_dir": str(out.parent / f"data-{kind}"),
            "sources": [
                {"name": "defs", "path": str(inputs["sources"]["defs"]), "weight": 0.6},
                {"name": "dialogues", "path": str(inputs["sources"]["dialogues"]), "weight": 0.4},
            ],
            "validation": {"fraction": 0.1},
        },
        "training": {"steps": 30, "micro_batch_size": 4, "global_batch_size": 8, "precision": "fp32", **training},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "cosine", "warmup_steps": 3},
        "checkpoint": {"every": 10},
        "eval": {"every": 15, "batches": 4},
        "log": {"every": 1},
    }


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "run"
    finetune(validate(FinetuneConfig, _tree(inputs, out)))
    return out


def test_loss_falls_on_response_tokens_and_each_source_is_validated(trained):
    records = _records(trained)
    train = [r for r in records if "loss" in r]
    assert len(train) == 30 and train[-1]["loss"] < train[0]["loss"] - 1.0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert {"val_loss/defs", "val_loss/dialogues"} <= evals[-1].keys()
    # targets are response tokens only, fewer than the tokens the model reads
    assert 0 < train[-1]["targets"] < train[-1]["tokens"]
    run = json.loads((trained / "run.json").read_text())
    assert run["kernels"]["loss"] == "chunked" and run["steps"] == 30


def test_export_carries_the_chat_template_and_grown_vocabulary(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(trained / "model"))
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Define fever."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_masked_loss_matches_the_plain_loss(inputs, trained):
    """The fused output layer over response positions only == the model's logits + masked cross-entropy."""
    from transformers import AutoModelForCausalLM

    from medfoundry.sft.batch import masked_token_loss, model_inputs, target_count
    from medfoundry.sft.dataset import SFTData
    from medfoundry.sft.finetune import MaskedTokenLoss
    from medfoundry.train.accel import HiddenStatesLM, fused_head

    batch = next(SFTData(trained.parent / "data-gpt2").reader(4, seed=3))
    model = AutoModelForCausalLM.from_pretrained(str(trained / "model"))
    with torch.no_grad():
        plain, n_plain = masked_token_loss(model(**model_inputs(batch)).logits, batch["labels"]), target_count(batch)
        head = fused_head(model, "chunked")
        fused, n_fused = MaskedTokenLoss(head, "fp32", "cpu")(HiddenStatesLM(model), batch)
    assert n_plain == n_fused > 0
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)


def test_resume_from_a_checkpoint_is_bit_identical(inputs, trained, tmp_path):
    """Rerun the same config after removing what came after step 10: it resumes there and ends on the same weights."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cfg = validate(FinetuneConfig, _tree(inputs, out, steps=20))
    finetune(cfg)
    first = load_file(out / "model" / "model.safetensors")
    for name in ("model", "checkpoints/step-00000020"):
        shutil.rmtree(out / name)
    finetune(cfg)
    again = load_file(out / "model" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps == list(range(1, 21))


def test_two_processes_match_one(inputs, tmp_path):
    """torchrun with 2 gloo processes (micro 4 each) gives the losses of 1 process (2 accumulation steps)."""
    single = tmp_path / "single"
    finetune(validate(FinetuneConfig, _tree(inputs, single, steps=4)))
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(_tree(inputs, tmp_path / "ddp", steps=4)))
    run_torchrun("finetune", cfg, ENV)
    one = [r["loss"] for r in _records(single) if "loss" in r]
    two = [r["loss"] for r in _records(tmp_path / "ddp") if "loss" in r]
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4)


def test_epochs_become_whole_steps(inputs, tmp_path):
    out = tmp_path / "run"
    tree = _tree(inputs, out)
    tree["training"] = {**tree["training"], "steps": None, "epochs": 0.5}
    finetune(validate(FinetuneConfig, tree))
    rows = json.loads((tmp_path / "data-gpt2" / "manifest.json").read_text())["counts"]["train_rows"]
    assert json.loads((out / "run.json").read_text())["steps"] == -(-rows // 2 // 8)


def test_lora_trains_adapters_and_added_tokens_and_merges(inputs, tmp_path):
    """LLaMA + ChatML (two tokens added) + LoRA: base weights stay, the new tokens' rows learn, and the merged
    export computes what the adapted model computes."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from medfoundry.model.resize import resize_for_tokenizer

    out = tmp_path / "lora"
    tree = _tree(inputs, out, kind="llama", steps=12)
    tree["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    finetune(validate(FinetuneConfig, tree))
    run = json.loads((out / "run.json").read_text())
    assert run["kernels"]["loss"] == "plain" and 0 < run["lora"]["trainable_share"] < 0.5
    added = json.loads((tmp_path / "data-llama" / "manifest.json").read_text())["details"]["tokenizer"]["added_ids"]

    base = AutoModelForCausalLM.from_pretrained(str(inputs["llama"]))
    resize_for_tokenizer(base, tmp_path / "data-llama" / "tokenizer")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = load_file(out / "model" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert not torch.equal(merged[emb][added], before[emb][added])  # the new tokens learned
    assert torch.equal(merged[emb][: added[0]], before[emb][: added[0]])  # the others did not move
    assert torch.equal(merged["model.norm.weight"], before["model.norm.weight"])  # not adapted
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )

    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    exported = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ids = torch.tensor([[1, 5, 9, added[0], 40, added[1], 7]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"training": {"steps": 3, "epochs": 1.0}}, "exactly one of training.steps and training.epochs"),
        ({"training": {"micro_batch_size": 3, "global_batch_size": 8}}, "multiple of"),
        ({"lora": {"r": 0}}, "lora.r"),
    ],
)
def test_config_errors(inputs, tmp_path, change, message):
    tree = _tree(inputs, tmp_path / "bad")
    for key, value in change.items():
        tree[key] = {**tree.get(key, {}), **value} if key == "training" else value
    if "epochs" not in change.get("training", {}) and "steps" not in change.get("training", {}):
        tree["training"]["steps"] = 3
    with pytest.raises(ConfigError, match=message):
        validate(FinetuneConfig, tree)


def test_fused_loss_with_lora_and_added_tokens_is_refused(inputs, tmp_path):
    pytest.importorskip("peft")
    tree = _tree(inputs, tmp_path / "bad", kind="llama", steps=2, loss="chunked")
    tree["lora"] = {"r": 4}
    with pytest.raises(ConfigError, match="chunked cannot train the tokens the template added"):
        finetune(validate(FinetuneConfig, tree))


def test_mfu_counts_the_output_layer_only_where_it_runs(trained):
    """With the fused loss, the output layer's FLOPs count for response positions only."""
    from transformers import AutoModelForCausalLM

    from medfoundry.model.presets import flops_per_token
    from medfoundry.sft.finetune import _step_flops

    model = AutoModelForCausalLM.from_pretrained(str(trained / "model"))
    per_token, head = flops_per_token(model.config, 256), 6.0 * model.get_output_embeddings().weight.numel()
    assert _step_flops(model, 256, fused=False)(1000, 10) == pytest.approx(1000 * per_token)
    assert _step_flops(model, 256, fused=True)(1000, 10) == pytest.approx(1000 * per_token - 990 * head)
