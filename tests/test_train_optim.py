"""Optimizer parameter groups, learning-rate schedules and gradient clipping."""

from __future__ import annotations

import itertools
import math

import pydantic
import pytest
import torch
from torch import nn

from medfoundry.errors import ConfigError
from medfoundry.train.optim import OptimConfig, adamw_kernel, build_optimizer, clip_grads, grad_norm, param_groups
from medfoundry.train.schedules import ScheduleConfig, build_scheduler, lr_at


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )


def split(model, weight_decay=0.1) -> tuple[set[str], set[str], list[str]]:
    groups = param_groups(model, weight_decay)
    decay = [g for g in groups if g["weight_decay"] == weight_decay]
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(decay) == len(no_decay) == 1
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
    everything = [n for g in groups for n in g["param_names"]]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # each parameter exactly once
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())
    return set(decay[0]["param_names"]), set(no_decay[0]["param_names"]), everything


def test_gpt2_groups_conv1d_decayed_tied_embedding_once():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    decay, no_decay, _ = split(model)
    assert decay == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert no_decay == (
        {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
        | {
            f"transformer.h.{i}.{m}.bias"
            for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        }
        | {f"transformer.h.{i}.{ln}.{w}" for i in range(2) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}
    )


def test_llama_groups_rmsnorm_not_decayed_untied_head_decayed():
    model = tiny_llama()
    decay, no_decay, _ = split(model)
    assert no_decay == (
        {"model.embed_tokens.weight", "model.norm.weight"}
        | {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    )
    assert decay == (
        {"lm_head.weight"}
        | {
            f"model.layers.{i}.{m}.weight"
            for i in range(2)
            for m in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        }
    )


def test_tied_head_listed_before_embedding_is_still_not_decayed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.proj = nn.Linear(4, 4)
            self.emb = nn.Embedding(10, 4)
            self.head.weight = self.emb.weight

    decay, no_decay, _ = split(Tied())
    assert decay == {"proj.weight"} and no_decay == {"head.weight", "proj.bias"}


def test_build_optimizer_groups_and_defaults():
    model = tiny_gpt2()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)  # auto: torch has fused AdamW on CPU
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    for impl, fused, foreach in (("foreach", None, True), ("loop", None, False), ("fused", True, False)):
        chosen = build_optimizer(model, OptimConfig(implementation=impl)).defaults
        assert (chosen["fused"], chosen["foreach"]) == (fused, foreach)
    assert adamw_kernel("auto", [torch.zeros(2, dtype=torch.int64)]) == "foreach"  # not floating point: no fused kernel
    with pytest.raises(pydantic.ValidationError):
        OptimConfig(lr=1e-3, momentum=0.9)  # unknown field


def test_one_norm_serves_the_finiteness_check_and_clipping():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = grad_norm([a, b])
    assert norm.item() == pytest.approx(5.0)
    clip_grads([a, b], 0, norm)  # disabled: untouched
    assert a.grad[0].item() == 3.0
    clip_grads([a, b], 1.0, norm)
    assert torch.cat([a.grad, b.grad.flatten()]).norm().item() == pytest.approx(1.0, rel=1e-5)
    norm = grad_norm([a, b])
    clip_grads([a, b], 10.0, norm)  # below the max: unchanged
    assert norm.item() == pytest.approx(1.0, rel=1e-5) and a.grad[0].item() == pytest.approx(0.6, rel=1e-5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        b.grad[0, 0] = bad
        assert not math.isfinite(grad_norm([a, b]).item())
    assert grad_norm([nn.Parameter(torch.zeros(1))]).item() == 0.0  # no gradient at all


def sched(kind, warmup=10, **kw) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr_ratio=0.1, **kw)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedule_warmup_and_end(kind):
    cfg, base, total = sched(kind), 1.0, 100
    assert lr_at(0, base, total, cfg) == pytest.approx(0.1)  # base * 1 / warmup
    assert lr_at(9, base, total, cfg) == pytest.approx(1.0)  # last warmup step at the peak
    assert lr_at(10, base, total, cfg) == pytest.approx(1.0)  # decay starts at the peak
    lrs = [lr_at(s, base, total, cfg) for s in range(total + 20)]
    assert all(x <= y for x, y in itertools.pairwise(lrs[:10]))  # warmup increases
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(lrs[10:]))  # then never increases
    end = 1.0 if kind == "constant" else 0.1
    assert lrs[total - 1] == pytest.approx(end) and all(x == pytest.approx(end) for x in lrs[total:])


def test_schedule_shapes_midpoints():
    total, base = 110, 2.0
    mid = 10 + 99 // 2  # decay spans steps 10..109
    assert lr_at(mid, base, total, sched("cosine")) == pytest.approx(
        0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_at(mid, base, total, sched("linear")) == pytest.approx(0.2 + 1.8 * (1 - 49 / 99))
    wsd = sched("wsd", decay_fraction=0.2)  # decays over the last 22 steps: 88..109
    assert [lr_at(s, base, total, wsd) for s in (10, 60, 88)] == [2.0, 2.0, 2.0]
    assert lr_at(89, base, total, wsd) < 2.0
    assert lr_at(88 + 21 // 2, base, total, sched("wsd", decay_fraction=0.2, decay_shape="linear")) == pytest.approx(
        0.2 + 1.8 * (1 - 10 / 21)
    )
    assert lr_at(88 + 21 // 2, base, total, sched("wsd", decay_fraction=0.2, decay_shape="1-sqrt")) == pytest.approx(
        0.2 + 1.8 * (1 - math.sqrt(10 / 21))
    )
    assert lr_at(0, base, total, sched("cosine", warmup=0)) == pytest.approx(base)


def test_scheduler_drives_optimizer_and_round_trips():
    cfg, total = sched("cosine", warmup=3), 20

    def make():
        opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))], lr=0.5)
        return opt, build_scheduler(opt, total, cfg)

    opt, scheduler = make()
    seen = []
    for step in range(total):
        seen.append(opt.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(lr_at(step, 0.5, total, cfg))
        opt.step()
        scheduler.step()
        if step == 7:
            saved_opt, saved_sched = opt.state_dict(), scheduler.state_dict()
    opt2, scheduler2 = make()
    opt2.load_state_dict(saved_opt)
    scheduler2.load_state_dict(saved_sched)
    resumed = []
    for _ in range(8, total):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        scheduler2.step()
    assert resumed == seen[8:]  # exactly the same floats
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_scheduler(opt, 3, cfg)


def test_fused_adamw_on_fsdp2_shards_steps_like_plain_fused(tmp_path):
    """auto picks the fused kernel for FSDP2's DTensor parameters too (torch dispatches it shard by
    shard), and the sharded update equals the plain one."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from medfoundry.train.distributed import transformer_blocks

    def run(shard: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_gpt2()
        if shard:
            for block in transformer_blocks(model):
                fully_shard(block)
            fully_shard(model)
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        assert opt.defaults["fused"] and not opt.defaults["foreach"]
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model.eval()  # no dropout: the two runs draw different random numbers
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded = run(True)
    finally:
        dist.destroy_process_group()
    plain = run(False)
    assert all(torch.equal(a, b) for a, b in zip(plain, sharded))
