"""The chunked output-layer + cross-entropy equals the plain path: loss and every gradient, for tied
(GPT-2), untied (LLaMA) and BLOOM heads, in fp32 and under bf16 autocast, in one chunk or many, with or
without gradients, and through DDP and FSDP2 wrappers."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from medfoundry.model.presets import model_config
from medfoundry.train import losses
from medfoundry.train.accel import HiddenStatesLM, fused_head
from medfoundry.train.losses import NextTokenLoss, chunk_rows, linear_cross_entropy, plain_cross_entropy

PRESETS = ["gpt2-tiny", "llama-tiny", "bloom-tiny"]


def tiny(preset: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    overrides = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if preset.startswith("gpt2") else {}
    return AutoModelForCausalLM.from_config(model_config(preset, vocab_size=300, context=32, overrides=overrides))


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (3, 25), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, loss_fn: NextTokenLoss, wrapped=None) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the gradients of ``model``'s parameters, called as ``wrapped`` (by default, with the
    fused loss, inside the HiddenStatesLM that returns its hidden states)."""
    if wrapped is None:
        wrapped = model if loss_fn.head is None else HiddenStatesLM(model)
    loss, n = loss_fn(wrapped, batch())
    assert n == 3 * 24
    (loss / n).backward()
    grads = {
        name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        for name, p in model.named_parameters()
    }
    return loss.item(), grads


def plain_and_chunked(preset: str, precision: str = "fp32"):
    plain = tiny(preset)
    chunked = tiny(preset)
    head = fused_head(chunked, "chunked")
    return (plain, NextTokenLoss(None, precision, "cpu")), (chunked, NextTokenLoss(head, precision, "cpu"))


def assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float) -> None:
    assert a[0] == pytest.approx(b[0], rel=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(b[1][name], a[1][name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_equals_plain_fp32(preset):
    (plain, plain_loss), (chunked, chunked_loss) = plain_and_chunked(preset)
    if preset != "llama-tiny":
        assert chunked.get_output_embeddings().weight is chunked.get_input_embeddings().weight  # tied
    assert_same(loss_and_grads(plain, plain_loss), loss_and_grads(chunked, chunked_loss), 1e-5)


def test_many_chunks_and_groups_equal_one(monkeypatch):
    """8 tokens per chunk, 24 per gradient group: 72 targets take 9 chunks in 3 groups."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 8 * 300)
    monkeypatch.setattr(losses, "GROUP_ELEMENTS", 24 * 300)
    assert chunk_rows(300) == 8
    (plain, plain_loss), (chunked, chunked_loss) = plain_and_chunked("gpt2-tiny")
    assert_same(loss_and_grads(plain, plain_loss), loss_and_grads(chunked, chunked_loss), 1e-5)
    with torch.no_grad():  # validation: the loss only
        assert chunked_loss(HiddenStatesLM(chunked), batch(2))[0].item() == pytest.approx(
            plain_loss(plain, batch(2))[0].item(), rel=1e-6
        )


def test_direct_call_and_partial_gradients():
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16), torch.randn(50, 16) * 0.3
    targets = torch.randint(0, 50, (40,))
    for wants in ((True, True), (True, False), (False, True)):
        h, w = hidden.clone().requires_grad_(wants[0]), weight.clone().requires_grad_(wants[1])
        rh, rw = hidden.clone().requires_grad_(wants[0]), weight.clone().requires_grad_(wants[1])
        (linear_cross_entropy(h, w, targets) * 0.5).backward()
        (plain_cross_entropy(rh @ rw.T, targets) * 0.5).backward()
        for got, want in ((h, rh), (w, rw)):
            assert (got.grad is None) == (want.grad is None)
            if want.grad is not None:
                torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-5)


def test_hopeless_tokens_keep_an_exact_loss():
    """Logits so large that p(target) underflows to 0 for most tokens: losses of hundreds of nats, exact."""
    torch.manual_seed(0)
    hidden, weight = (torch.randn(40, 16) * 30).requires_grad_(), (torch.randn(50, 16) * 3).requires_grad_()
    targets = torch.randint(0, 50, (40,))
    logits = hidden @ weight.T
    assert (torch.softmax(logits, 1).gather(1, targets[:, None]) == 0).sum() > 10
    expected = plain_cross_entropy(logits, targets)
    got = linear_cross_entropy(hidden, weight, targets)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 40 * 100
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(expected, hidden)[0])


@pytest.mark.parametrize("preset", PRESETS)
def test_chunked_under_bf16_autocast_matches_autocast_lm_head(preset):
    """Both run the output layer's matmuls in bf16 and the softmax in fp32: equal to bf16 rounding."""
    (plain, plain_loss), (chunked, chunked_loss) = plain_and_chunked(preset, "bf16")
    a, b = loss_and_grads(plain, plain_loss), loss_and_grads(chunked, chunked_loss)
    assert a[0] == pytest.approx(b[0], rel=1e-3)
    for name in a[1]:
        torch.testing.assert_close(b[1][name], a[1][name], atol=2e-3, rtol=0.02, msg=name)


@pytest.fixture
def one_process_group():
    with tempfile.NamedTemporaryFile() as store_file:
        dist.init_process_group("gloo", store=dist.FileStore(store_file.name, 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")  # as distributed.wrap_model does
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_chunked_through_ddp_and_fsdp2(preset, one_process_group):
    """The loss reads the head's weight beside the wrapper's forward: DDP must still reduce its gradient,
    and under FSDP2 it must be the gathered weight, whose gradient the root's backward reduce-scatters."""
    from torch.distributed.fsdp import fully_shard

    from medfoundry.train.distributed import transformer_blocks

    (plain, plain_loss), (chunked, chunked_loss) = plain_and_chunked(preset)
    reference = loss_and_grads(plain, plain_loss)
    ddp = torch.nn.parallel.DistributedDataParallel(HiddenStatesLM(chunked))
    assert_same(reference, loss_and_grads(chunked, chunked_loss, wrapped=ddp), 1e-5)

    (_, _), (sharded, sharded_loss) = plain_and_chunked(preset)
    root = HiddenStatesLM(sharded)  # the root FSDP2 module, as distributed.wrap_model makes it
    for block in transformer_blocks(root):
        fully_shard(block)
    fully_shard(root)
    assert_same(reference, loss_and_grads(sharded, sharded_loss, wrapped=root), 1e-5)
