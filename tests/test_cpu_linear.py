"""The few-row CPU linear kernel: equal to ``F.linear`` for fp32 and bf16 weights and inputs, 1-8 rows, widths with
and without a remainder of the kernel's 16-column step (and of the 32 columns of its AVX-512 BF16 path, which bf16
inputs with bf16 weights take on a CPU that has it), with and without bias; other calls fall back to torch;
the engine runs its decode steps (and only those) through it, with greedy tokens equal to ``model.generate``'s on
SmolLM2-135M (compiled: ``test_engine_compile``)."""

from __future__ import annotations

import pytest
import torch

from ci_skips import skip_machine
from medfoundry.generation import cpu_linear
from medfoundry.generation.config import SamplingConfig
from medfoundry.generation.engine import Engine
from test_serve_engine import hf_greedy


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """The kernel must build and load wherever the CPU can run it (g++ and ninja are the project's to install)."""
    reason = cpu_linear.unsupported_reason()
    if reason:
        skip_machine(reason)
    assert cpu_linear.load_kernel()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [576, 1001, 7])
def test_kernel_equals_linear(weight_dtype, x_dtype, width):
    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(37, width, generator=gen).to(weight_dtype)
    for rows in range(1, cpu_linear.MAX_ROWS + 1):
        x = torch.randn(rows, width, generator=gen).to(x_dtype)
        out = torch.ops.medfoundry.few_row_linear(x, weight)
        assert out.dtype == x_dtype and out.shape == (rows, 37)
        exact = x.double() @ weight.double().t()
        # fp32 sums in another order: a few ulps of the largest partial sums; bf16 output: one rounding
        tolerance = 1e-5 * width**0.5 if x_dtype == torch.float32 else 2**-7
        scale = x.double().abs() @ weight.double().abs().t()
        assert ((out.double() - exact).abs() <= tolerance * scale + 1e-6).all(), rows


def test_module_forward_and_fallbacks():
    linear = torch.nn.Linear(40, 24)
    few = torch.nn.Linear(40, 24)
    few.load_state_dict(linear.state_dict())
    few.__class__ = cpu_linear.FewRowLinear
    for shape in [(1, 40), (2, 1, 40), (8, 40)]:
        x = torch.randn(shape)
        torch.testing.assert_close(few(x), linear(x))
    many = torch.randn(9, 40)  # more rows than the kernel takes: torch's own, bit for bit
    assert torch.equal(few(many), linear(many))
    strided = torch.nn.Linear(24, 40, bias=False)
    strided.weight = torch.nn.Parameter(torch.randn(40, 24).t())  # (24, 40) non-contiguous
    assert not cpu_linear.fits(torch.randn(1, 40), strided.weight)
    assert not cpu_linear.fits(torch.randn(1, 40, dtype=torch.float16), torch.randn(24, 40, dtype=torch.float16))


def test_decode_linears_swap_back_even_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    linears = cpu_linear.few_row_linears(model, torch.device("cpu"))
    assert len(linears) == 2
    with pytest.raises(RuntimeError, match="boom"), cpu_linear.decode_linears(linears):
        assert all(type(m) is cpu_linear.FewRowLinear for m in linears)
        raise RuntimeError("boom")
    assert all(type(m) is torch.nn.Linear for m in linears)
    assert cpu_linear.few_row_linears(model, torch.device("meta")) == []


@pytest.fixture(scope="module")
def smollm2(smollm2_hf) -> Engine:
    return Engine.load(smollm2_hf, precision="fp32", device="cpu", max_batch=4, compile="off")


def test_engine_decodes_through_the_kernel_only(smollm2):
    """Prefill runs torch's linears, every decode step the kernel's; the model is plain transformers after."""
    seen = []
    lm_head = smollm2.model.get_output_embeddings()
    hook = lm_head.register_forward_pre_hook(lambda module, args: seen.append((type(module), args[0].shape[-2])))
    try:
        smollm2.generate(["The patient presented with"], SamplingConfig(max_tokens=3, temperature=0))
    finally:
        hook.remove()
    assert seen[0][0] is torch.nn.Linear  # the prefill
    assert [kind for kind, _ in seen[1:]] == [cpu_linear.FewRowLinear] * 2  # the two decode steps
    assert len(smollm2.kernel_linears) == sum(type(m) is torch.nn.Linear for m in smollm2.model.modules()) == 211


def test_engine_greedy_equals_generate_on_smollm2(smollm2):
    """fp32 greedy decoding through the kernel, three requests batched (rows finishing at different steps): the
    tokens of ``model.generate``."""
    prompts = [smollm2.encode(p) for p in ["The patient presented with", "Aspirin inhibits", "Sepsis is"]]
    budgets = [12, 5, 9]
    params = [SamplingConfig(max_tokens=n, temperature=0, ignore_eos=True) for n in budgets]
    done = smollm2.generate(prompts, params)
    with torch.no_grad():
        expected = [hf_greedy(smollm2.model, [ids], n)[0] for ids, n in zip(prompts, budgets)]
    assert [d.token_ids for d in done] == expected
