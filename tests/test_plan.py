"""``medfoundry plan``: the full-scale recipes validate, plan on the meta device, and match the seeds' runs."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import yaml

from ci_skips import skip_machine
from conftest import REPO
from medfoundry import runtime
from medfoundry.cli import main
from medfoundry.config import load_yaml, validate
from medfoundry.errors import ConfigError
from medfoundry.model.presets import model_config
from medfoundry.plan import (
    GIB,
    PlanSection,
    activation_bytes,
    build_meta_model,
    engine_for,
    launched_processes,
    layer_activation_bytes,
    load_target,
    loss_bytes,
    make_plan,
    state_bytes,
    with_flags,
)
from medfoundry.recipe.config import RecipeConfig, wire

FULL_SCALE = ["biomedlm-2.7b", "biomed-llama-7b", "meditron-7b", "bloom-560m"]

# LLaMA-7B (the llama-7b preset), counted by hand
P_7B = 6_738_415_616
ATTENTION_7B, MLP_7B, NORMS_7B = 4 * 4096 * 4096, 3 * 4096 * 11_008, 2 * 4096
LAYER_7B = ATTENTION_7B + MLP_7B + NORMS_7B  # 202,383,360
ROOT_7B = 32_000 * 4096 * 2 + 4096  # embeddings, untied head, final norm
MATMUL_7B = 32 * (ATTENTION_7B + MLP_7B)  # the Linear weights of the blocks (the fused loss casts the head itself)
assert 32 * LAYER_7B + ROOT_7B == P_7B


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Run from an empty directory: no downloaded checkpoint or built tokenizer changes what is planned."""
    monkeypatch.chdir(tmp_path)


def recipe(name: str) -> str:
    return str(REPO / "recipes" / f"{name}.yaml")


def plan_of(
    name: str, days: float | None = None, overrides: list[str] | None = None, stage: str | None = None, **flags
):
    return make_plan(with_flags(load_target(recipe(name), overrides, stage), **flags), days=days)


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", FULL_SCALE)
def test_every_stage_of_the_recipe_is_a_valid_config(name):
    """Each stage's section, with the paths the runner wires (run_dir/<stage>, the tokenizer, the tokens,
    the pretrained model), validates into its command's config class."""
    tree = load_yaml(recipe(name))
    configs = wire(validate(RecipeConfig, tree, name))
    assert set(configs) == set(tree["stages"])
    assert all(cfg.output_dir == f"runs/{name}/{stage}" for stage, cfg in configs.items() if hasattr(cfg, "output_dir"))
    assert configs["pretrain"].data.tokens_dir == f"runs/{name}/tokens"
    validate(PlanSection, tree["plan"], f"{name}: plan")


def _rss() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))


@pytest.mark.parametrize("name", FULL_SCALE)
def test_the_model_is_only_ever_on_the_meta_device(name):
    """No weight is ever materialized: the model built has meta parameters only, and planning raises this
    process's peak resident memory by less than 64 MiB (measured: under 1 MiB), where one block of the
    smallest recipe's model in fp32 is 50 MiB and the whole model 2.1 GiB (7B: 810 MiB and 25 GiB)."""
    target = load_target(recipe(name))
    model, *_ = build_meta_model(target, "cuda")  # also imports what planning needs
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    del model
    runtime.release_free_memory()
    runtime.reset_peak_rss()
    before = runtime.peak_rss()
    if before is None or before > _rss() + (64 << 20):
        skip_machine("this machine does not let a process reset its peak resident memory (/proc/self/clear_refs)")
    plan = make_plan(target)
    assert plan.model.parameters > 5e8
    assert runtime.peak_rss() - before < 64 << 20


# name: (GPU, GPUs, parameters, tokens, published days or None), each with its source in the recipe's comments
PUBLISHED = {
    "biomedlm-2.7b": ("a100-40gb", 128, 2.7e9, 300e9, 6.25),  # model card: 128 A100-40GB, ~6.25 days, 300B tokens
    "biomed-llama-7b": ("a100-80gb", 32, 6.74e9, 63e9, 7),  # repo: 32 A100-80GB, "about a week", 63B tokens
    "meditron-7b": ("a100-80gb", 64, 6.74e9, 48.1e9, None),  # repo: 64 A100-80GB; paper: 48.1B tokens
    "bloom-560m": ("a100-40gb", 8, 559_214_592, 10_000 * 256 * 2048, None),  # BLOOM-560m; not a published run
}
TDP_KW = {"a100-40gb": 0.4, "a100-80gb": 0.4}
DAYS_TOLERANCE = {"biomedlm-2.7b": 0.02, "biomed-llama-7b": 0.15}  # "~6.25 days"; "about a week"


@pytest.mark.parametrize("name", FULL_SCALE)
def test_the_shipped_plan_matches_the_published_run(name):
    """Each recipe as shipped (its plan: section, its stated MFU): the seed's hardware, parameters and tokens;
    the published duration within the stated tolerance where one was published (BioMedLM 6.26 days, BioMed-
    LLaMA 6.96); GPU-hours and energy from the days (GPU-hours x TDP)."""
    gpu, gpus, parameters, tokens, days = PUBLISHED[name]
    plan = plan_of(name)
    assert (plan.gpu, plan.gpus) == (gpu, gpus)
    assert plan.model.parameters == pytest.approx(parameters, rel=0.05 if name == "biomedlm-2.7b" else 0.01)
    assert plan.tokens == pytest.approx(tokens, rel=1e-3)
    if days is not None:
        assert plan.days == pytest.approx(days, rel=DAYS_TOLERANCE[name])
    assert plan.peak_tflops == 312  # A100's dense bf16 peak (NVIDIA's data sheet)
    assert plan.days == pytest.approx(plan.flops / (gpus * 312e12 * plan.mfu) / 86_400)
    assert plan.gpu_hours == pytest.approx(plan.days * 24 * gpus)
    assert plan.energy_kwh == pytest.approx(plan.gpu_hours * TDP_KW[gpu])
    assert plan.memory.fits and plan.memory.total_gib <= 0.9 * plan.memory.memory_gib


def test_biomedlm_decoupled_weight_decay_is_composers():
    """Composer's DecoupledAdamW multiplies weights by 1 - 1.6e-5 per step (at peak lr); torch's AdamW by
    1 - lr x wd."""
    optim = load_target(recipe("biomedlm-2.7b")).cfg.optim
    assert optim.lr * optim.weight_decay == pytest.approx(1.6e-5)


def test_meditron_decays_to_its_published_minimum():
    cfg = load_target(recipe("meditron-7b")).cfg
    assert cfg.optim.lr * cfg.schedule.min_lr_ratio == pytest.approx(1e-6)
    assert cfg.schedule.warmup_steps == 2000 and cfg.training.global_batch_size == 1600


# ---------------------------------------------------------------------------------------------- the seeds


def test_biomedlm_seed_128_a100_40gb_6_25_days():
    plan = plan_of("biomedlm-2.7b", days=6.25)
    assert plan.gpu == "a100-40gb" and plan.gpus == 128
    assert plan.model.parameters == pytest.approx(2.7e9, rel=0.05)  # 2.59B, tied output layer counted once
    assert plan.tokens == pytest.approx(300e9, rel=1e-3)
    assert plan.model.vocab_size == 28_896 and plan.model.context == 1024
    assert 0.20 <= plan.implied_mfu <= 0.50
    at_implied = plan_of("biomedlm-2.7b", mfu=plan.implied_mfu)
    assert at_implied.days == pytest.approx(6.25)


def test_biomed_llama_seed_32_a100_80gb_a_week():
    plan = plan_of("biomed-llama-7b", days=7)
    assert plan.gpu == "a100-80gb" and plan.gpus == 32
    assert plan.model.parameters == pytest.approx(6.74e9, rel=0.01)
    assert plan.tokens == pytest.approx(63e9, rel=1e-3)
    assert 0.20 <= plan.implied_mfu <= 0.50
    assert plan_of("biomed-llama-7b", mfu=plan.implied_mfu).days == pytest.approx(7)


def test_6nd_and_attention_flops():
    plan = plan_of("biomedlm-2.7b")
    assert plan.flops_6nd == pytest.approx(6 * plan.model.parameters * plan.tokens)
    assert plan.flops == pytest.approx(plan.model.flops_per_token * plan.tokens)
    assert plan.flops > plan.flops_6nd  # the attention term outweighs the embedding tables left out


# ---------------------------------------------------------------------------------------------- arithmetic


def test_state_bytes_by_sharding():
    p, n = 1_000_000, 8
    assert state_bytes(p, p, "ddp", n) == 16 * p
    assert state_bytes(p, p, "fsdp", n) == 16 * p / n
    assert state_bytes(p, 1000, "ddp", n) == 4 * p + 12 * 1000  # frozen weights: no gradients, no moments
    assert state_bytes(p, 1000, "fsdp", n) == (4 * p + 12 * 1000) / n


def test_only_the_engine_s_strategies():
    """The engine runs DDP and FSDP2: no ZeRO-1 / ZeRO-2 to plan."""
    for strategy in ("zero1", "zero2"):
        with pytest.raises(ConfigError, match="sharding"):
            plan_of("biomedlm-2.7b", sharding=strategy)
        with pytest.raises(SystemExit):
            main(["plan", recipe("biomedlm-2.7b"), "--sharding", strategy])


def test_activations_korthikanti():
    model = plan_of("biomedlm-2.7b").model
    s, b, h, a, layers = 1024, 8, 2560, 20, 32
    fsdp_bf16, ddp_bf16 = engine_for("fsdp", 8, "bf16"), engine_for("ddp", 8, "bf16")
    assert layer_activation_bytes(model, b) == 34 * s * b * h  # SDPA: the scores are not stored
    assert layer_activation_bytes(model, b, "fp32") == 2 * 34 * s * b * h
    eager = dataclasses.replace(model, attention="eager")
    assert layer_activation_bytes(eager, b) == 34 * s * b * h + 5 * a * s * s * b
    assert activation_bytes(model, b, False, fsdp_bf16) == layers * 34 * s * b * h
    # checkpointing keeps each block's input: bf16 under FSDP2's policy, fp32 under autocast over fp32 weights
    assert activation_bytes(model, b, True, fsdp_bf16) == layers * 2 * s * b * h + 34 * s * b * h
    assert activation_bytes(model, b, True, ddp_bf16) == layers * 4 * s * b * h + 34 * s * b * h


def test_one_process_wraps_nothing():
    assert engine_for("fsdp", 1, "bf16").layout == "single"
    plan = plan_of("biomed-llama-7b", gpus=1)
    mem, st = plan.memory, plan.storage
    assert mem.sharding == "single" and mem.states_gib == pytest.approx(16 * P_7B / GIB)
    assert mem.fsdp_gathered_gib == mem.ddp_buckets_gib == 0
    assert mem.weight_copies_gib == pytest.approx(2 * MATMUL_7B / GIB)  # bf16 autocast over fp32 weights
    assert st.checkpoint_bytes_per_rank == st.checkpoint_bytes_total == 12 * P_7B
    assert st.host_init_bytes_per_rank == 4 * P_7B


def test_llama_7b_on_8_a100_fsdp_bf16():
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), activation checkpointing."""
    plan = plan_of("biomed-llama-7b", gpus=8)
    mem, st, m = plan.memory, plan.storage, plan.model
    assert (m.parameters, m.layer_parameters, m.root_parameters) == (P_7B, LAYER_7B, ROOT_7B)
    assert m.matmul_parameters == m.trainable_matmul_parameters == MATMUL_7B
    assert mem.sharding == "fsdp" and "param_dtype=bf16, reduce_dtype=fp32" in mem.mixed_precision
    assert mem.states_gib == pytest.approx(16 * P_7B / 8 / GIB)
    assert mem.ddp_buckets_gib == 0 and mem.weight_copies_gib == 0  # the weights are bf16 already
    assert mem.fsdp_gathered_gib == pytest.approx(2 * (2 * LAYER_7B + ROOT_7B) / GIB)  # 2 blocks + root, bf16
    assert mem.fsdp_reduce_gib == pytest.approx((2 + 4) * LAYER_7B / GIB)  # bf16 gradients -> fp32 reduce input
    s, b, h = 2048, 4, 4096
    assert mem.activations_checkpointed_gib == pytest.approx((32 * 2 * s * b * h + 34 * s * b * h) / GIB)
    v, tokens = 32_000, s * b  # chunked loss: groups of 4,096 tokens, softmax chunks of 128
    loss = 2 * 4096 * v + 4 * 128 * v + 2 * tokens * h + 4 * v * h + 2 * v * h + 4 * v * h
    assert mem.loss_gib == pytest.approx(loss / GIB)
    parts = 16 * P_7B / 8 + mem.activations_checkpointed_gib * GIB + 2 * (2 * LAYER_7B + ROOT_7B) + 6 * LAYER_7B + loss
    assert mem.total_gib == pytest.approx(parts / GIB)
    # checkpoints: each rank writes its shard of the fp32 weights and AdamW's two moments
    assert st.checkpoint_bytes_per_rank == 12 * P_7B / 8 and st.checkpoint_bytes_total == 12 * P_7B
    assert st.host_init_bytes_per_rank == 4 * P_7B / 8  # meta-device init: only the rank's fp32 shard
    assert st.host_save_bytes_per_rank == 12 * P_7B / 8  # nothing gathered
    assert (st.export_dtype, st.export_bytes) == ("bf16", 2 * P_7B)
    # activation checkpointing runs every block's forward again: 2 FLOPs per block parameter and token,
    # and the forward third of the attention term
    recompute = 2 * 32 * LAYER_7B + 4 * 32 * 4096 * 2048
    assert plan.flops_executed == pytest.approx(plan.flops + recompute * plan.tokens)
    assert (plan.flops_6nd + 2 * 32 * LAYER_7B * plan.tokens) / plan.tokens / P_7B == pytest.approx(8, rel=0.03)
    assert plan.hfu == pytest.approx(plan.mfu * plan.flops_executed / plan.flops)
    without = plan_of("biomed-llama-7b", gpus=8, overrides=["plan.activation_checkpointing=false"])
    assert without.flops_executed == without.flops and without.hfu == without.mfu


def test_llama_7b_on_8_a100_ddp_bf16():
    """DDP: everything replicated, fp32 all-reduce buckets, autocast's bf16 copies; checkpoints deduplicated."""
    plan = plan_of("biomed-llama-7b", gpus=8, sharding="ddp")
    mem, st = plan.memory, plan.storage
    assert mem.states_gib == pytest.approx(16 * P_7B / GIB)
    assert mem.ddp_buckets_gib == pytest.approx(4 * P_7B / GIB)
    assert mem.fsdp_gathered_gib == mem.fsdp_reduce_gib == 0
    # autocast caches the bf16 copies of trainable weights until its context closes after the loss:
    # checkpointing does not drop them
    assert mem.activation_checkpointing and mem.weight_copies_gib == pytest.approx(2 * MATMUL_7B / GIB)
    s, b, h = 2048, 4, 4096
    assert mem.activations_checkpointed_gib == pytest.approx((32 * 4 * s * b * h + 34 * s * b * h) / GIB)
    v, tokens = 32_000, s * b  # ... and the loss casts the fp32 hidden states and output weight to bf16
    loss = 2 * 4096 * v + 4 * 128 * v + 2 * tokens * h + 4 * v * h + 2 * v * h + 4 * v * h + 2 * tokens * h + 2 * v * h
    assert mem.loss_gib == pytest.approx(loss / GIB)
    assert st.checkpoint_bytes_per_rank == 12 * P_7B / 8  # DCP spreads the replicated tensors over the ranks
    assert st.host_init_bytes_per_rank == 4 * P_7B  # every rank builds the whole fp32 model
    assert st.host_save_bytes_per_rank == 12 * P_7B / 8
    staged = plan_of(
        "biomed-llama-7b", gpus=8, sharding="ddp", overrides=["stages.pretrain.checkpoint.async_save=true"]
    )
    assert staged.storage.host_save_bytes_per_rank == 12 * P_7B  # async_save stages the rank's whole state


def test_fp32_run():
    plan = plan_of("biomed-llama-7b", gpus=8, overrides=["stages.pretrain.training.precision=fp32"])
    mem, st = plan.memory, plan.storage
    assert mem.precision == "fp32" and mem.weight_copies_gib == 0
    assert mem.fsdp_gathered_gib == pytest.approx(4 * (2 * LAYER_7B + ROOT_7B) / GIB)
    assert mem.fsdp_reduce_gib == pytest.approx(8 * LAYER_7B / GIB)
    s, b, h = 2048, 4, 4096
    assert mem.activations_gib == pytest.approx(32 * 2 * 34 * s * b * h / GIB)
    assert mem.activations_checkpointed_gib == pytest.approx((32 * 4 * s * b * h + 2 * 34 * s * b * h) / GIB)
    assert (st.export_dtype, st.export_bytes) == ("fp32", 4 * P_7B)
    assert st.checkpoint_bytes_per_rank == 12 * P_7B / 8


def test_loss_buffers():
    model = plan_of("biomedlm-2.7b").model  # tied head: the fused loss reads the embedding matrix
    v, h, tokens = 28_896, 2560, 8 * 1024
    fsdp = engine_for("fsdp", 128, "bf16")
    rows, group = 128, 4608  # 2^22 // 28,896 -> 128; 2^27 // 28,896 // 128 * 128
    expected = 2 * group * v + 4 * rows * v + 2 * tokens * h + 4 * v * h + 2 * v * h + 4 * v * h
    assert loss_bytes(model, 8, fsdp) == expected
    assert loss_bytes(dataclasses.replace(model, loss="plain"), 8, fsdp) == 16 * tokens * v


def test_the_recipe_s_launch_sets_the_gpu_count():
    """Without plan.gpus, the processes `medfoundry run` starts: distributed.nnodes x nproc_per_node."""
    assert launched_processes({"launcher": "slurm", "nnodes": 4, "nproc_per_node": 8}) == 32
    assert launched_processes(SimpleNamespace(nproc_per_node=8, nnodes=1)) == 8
    assert launched_processes({"nproc_per_node": "gpu"}) is None and launched_processes(None) is None
    two = plan_of("quickstart_distributed")  # distributed: {nproc_per_node: 2}, FSDP2, fp32
    assert two.gpus == 2 and two.memory.sharding == "fsdp" and two.memory.precision == "fp32"
    assert two.storage.checkpoint_bytes_per_rank == 12 * two.model.parameters / 2
    launch = [
        "distributed.nnodes=4",
        "distributed.rdzv_endpoint=n0:29500",
        "stages.pretrain.training.micro_batch_size=2",
    ]
    assert plan_of("quickstart_distributed", overrides=launch).gpus == 8
    assert plan_of("quickstart_distributed", gpus=1).memory.sharding == "single"  # --gpus wins


def test_memory_follows_sharding_and_checkpointing():
    fsdp = plan_of("biomed-llama-7b").memory
    ddp = plan_of("biomed-llama-7b", sharding="ddp", overrides=["plan.activation_checkpointing=false"]).memory
    assert ddp.states_gib == pytest.approx(16 * 6_738_415_616 / GIB)
    assert fsdp.states_gib == pytest.approx(ddp.states_gib / 32)
    assert not ddp.fits and fsdp.fits  # 7B with AdamW is 100 GiB of states unsharded
    assert fsdp.activation_checkpointing and not ddp.activation_checkpointing


def test_bf16_weight_copies_are_kept_for_backward():
    """DDP in bf16: autocast's copies of the matmul weights and biases (GPT-2's Conv1D; not the tied
    embedding the fused loss reads)."""
    plan = plan_of("biomedlm-2.7b", sharding="ddp")
    h, layers = 2560, 32
    matmul = layers * (h * 3 * h + 3 * h + h * h + h + 2 * (h * 4 * h) + 4 * h + h)
    assert plan.model.matmul_parameters == matmul
    assert plan.memory.precision == "bf16" and not plan.memory.activation_checkpointing
    assert plan.memory.weight_copies_gib == pytest.approx(2 * matmul / GIB)
    fp32 = plan_of("biomedlm-2.7b", sharding="ddp", overrides=["stages.pretrain.training.precision=fp32"])
    assert fp32.memory.weight_copies_gib == 0
    assert plan_of("biomedlm-2.7b").memory.weight_copies_gib == 0  # FSDP2 gathers bf16 weights instead


def test_bloom_eager_attention_needs_checkpointing():
    plan = plan_of("bloom-560m")
    assert plan.model.attention == "eager"  # BLOOM's own ALiBi attention
    assert plan.memory.activations_gib > 40 > plan.memory.activations_checkpointed_gib
    assert not plan_of("bloom-560m", overrides=["stages.pretrain.training.activation_checkpointing=false"]).memory.fits


def test_flags_override_the_plan_section():
    base = plan_of("biomedlm-2.7b")
    h100 = plan_of("biomedlm-2.7b", gpu="h100-80gb", gpus=64, mfu=0.4)
    assert (h100.gpu, h100.gpus, h100.mfu, h100.memory.memory_gib) == ("h100-80gb", 64, 0.4, 80)
    assert h100.days == pytest.approx(base.days * (128 * 312 * 0.23) / (64 * 989 * 0.4))
    assert h100.gpu_hours == pytest.approx(h100.days * 24 * 64)
    assert h100.energy_kwh == pytest.approx(h100.gpu_hours * 0.7)


def test_scratch_vocabulary_is_the_tokenizer_stage_s():
    plan = plan_of("biomedlm-2.7b", overrides=["stages.tokenizer.vocab_size=32000"])
    assert plan.model.vocab_size == 32_000


def test_a_downloaded_checkpoint_replaces_the_stand_in_preset(tmp_path):
    model_config("llama-tiny", context=2048).save_pretrained(tmp_path / "models" / "llama-7b-hf")
    plan = plan_of("biomed-llama-7b")
    assert plan.model.source == "checkpoint models/llama-7b-hf"
    assert plan.model.hidden_size == 128


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_stage_continues_the_pretrain_stage_s_model():
    plan = plan_of("meditron-7b", stage="finetune")
    assert plan.stage == "finetune" and "pretrain stage's model" in plan.model.source
    assert plan.model.parameters == pytest.approx(6.74e9, rel=0.01)
    assert plan.tokens is None and "training.epochs" in plan.tokens_note and plan.days is None
    steps = plan_of(
        "meditron-7b",
        stage="finetune",
        overrides=["stages.finetune.training.steps=100", "stages.finetune.training.epochs=null"],
    )
    assert steps.tokens == 100 * 128 * 2048 and steps.days > 0


def test_lora_trains_only_the_adapters():
    plan = plan_of("meditron-7b", stage="finetune", overrides=["stages.finetune.lora={r: 16}"])
    assert plan.model.trainable_parameters < 0.01 * plan.model.parameters
    full = plan_of("meditron-7b", stage="finetune").memory
    assert plan.memory.states_gib < full.states_gib / 3
    st, m = plan.storage, plan.model
    assert st.checkpoint_bytes_total == 4 * m.parameters + 8 * m.trainable_parameters  # frozen weights: no moments
    assert st.export_parameters == m.parameters - m.trainable_parameters  # the adapters merged
    ddp = plan_of(
        "meditron-7b",
        stage="finetune",
        sharding="ddp",
        overrides=["stages.finetune.lora={r: 16}", "stages.finetune.training.activation_checkpointing=true"],
    )
    # checkpointing drops the frozen weights' copies; one block's exist while it is recomputed
    assert ddp.memory.weight_copies_gib == pytest.approx(2 * ddp.model.layer_matmul_parameters / GIB)


def _finetune_config(tmp_path, init_from: str) -> str:
    path = tmp_path / "ft.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "runs/ft",
                "model": {"init_from": init_from},
                "data": {
                    "sources": [{"name": "qa", "path": "qa.jsonl"}],
                    "allow_test_overlap": True,
                    "max_length": 512,
                },
                "training": {"epochs": 1, "micro_batch_size": 2, "global_batch_size": 8},
            }
        )
    )
    return str(path)


def test_plain_finetune_config(tmp_path):
    model_config("llama-tiny", context=512).save_pretrained(tmp_path / "base")
    target = load_target(
        _finetune_config(tmp_path, str(tmp_path / "base")), ["training.steps=10", "training.epochs=null"]
    )
    plan = make_plan(with_flags(target, gpu="a100-80gb", gpus=4))
    assert plan.stage == "finetune" and plan.model.context == 512
    assert plan.tokens == 10 * 8 * 512 and "at most" in plan.tokens_note


def test_plain_pretrain_config_on_this_cpu(capsys):
    assert main(["plan", str(REPO / "recipes" / "quickstart_pretrain.yaml"), "--gpu", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"] == "cpu" and plan["peak_tflops"] > 0 and plan["energy_kwh"] is None
    assert plan["memory"]["sharding"] == "single"
    total = plan["storage"]["checkpoint_bytes_total"]
    assert total == plan["storage"]["checkpoint_bytes_per_rank"] == 12 * plan["model"]["parameters"]
    assert plan["tokens"] == 200 * 16 * 256 and plan["model"]["attention"] == "eager"


# ---------------------------------------------------------------------------------------------- errors and CLI


def test_unknown_gpu_names_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"gpu: .*unknown GPU 'a100-80'; did you mean 'a100-80gb'"):
        plan_of("biomedlm-2.7b", gpu="a100-80")


def test_a_batch_the_gpus_cannot_share_is_an_error():
    with pytest.raises(ConfigError, match=r"training.global_batch_size \(1024\).*plan.gpus / --gpus 3"):
        plan_of("biomedlm-2.7b", gpus=3)


def test_a_missing_base_model_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_from: .*missing.* download the base model"):
        make_plan(load_target(_finetune_config(tmp_path, "missing")))


def test_a_context_beyond_the_continued_model_s_positions_is_an_error():
    with pytest.raises(ConfigError, match=r"model.context \(8192\) exceeds the model's 2048 positions"):
        plan_of("biomed-llama-7b", overrides=["stages.pretrain.model.context=8192"])


def test_stage_needs_a_recipe_with_that_stage(tmp_path):
    with pytest.raises(ConfigError, match="--stage finetune: .*has no stages.finetune"):
        plan_of("biomedlm-2.7b", stage="finetune")
    with pytest.raises(ConfigError, match="not a recipe"):
        load_target(str(REPO / "recipes" / "quickstart_pretrain.yaml"), stage="pretrain")


def test_cli_table_and_implied_mfu(capsys):
    assert main(["plan", recipe("biomedlm-2.7b"), "--days", "6.25"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "parameters",
        "300.00B = 286,103 steps",
        "4+4+8 = 16 B/param",
        "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)",
        "fits",
        "per rank x 128",
        "host/rank",
        "GPU-hours",
        "kWh",
        "23.0% (6·N·D alone: 21.7%)",
    ):
        assert expected in out


def test_cli_errors_are_one_clear_line(capsys):
    assert main(["plan", recipe("biomedlm-2.7b"), "--gpus", "3"]) == 2
    assert "plan.gpus / --gpus 3" in capsys.readouterr().err


def test_an_extended_tokenizer_grows_the_embeddings_as_in_training(tmp_path):
    model_config("llama-tiny").save_pretrained(tmp_path / "base")
    extended = tmp_path / "tokenizer"
    extended.mkdir()
    (extended / "tokenizer.json").write_text("{}")  # only vocab_extension.json is read for an extension
    (extended / "vocab_extension.json").write_text(
        json.dumps({"base_vocab_size": 4096, "vocab_size": 4100, "added_ids": [4096, 4097, 4098, 4099]})
    )
    path = tmp_path / "pretrain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "runs/p",
                "model": {"preset": "llama-tiny", "init_from": str(tmp_path / "base"), "context": 128},
                "data": {"tokens_dir": "runs/p/tokens", "tokenizer_dir": str(extended)},
                "training": {"steps": 10, "micro_batch_size": 2, "global_batch_size": 2},
            }
        )
    )
    plan = make_plan(load_target(str(path)))
    assert plan.model.vocab_size == 4100
    assert plan.model.embedding_parameters == 4100 * 128
