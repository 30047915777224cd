"""Next-token cross-entropy, optionally with the output layer fused into it (``training.loss``).

``plain``: the model's logits, then an fp32 cross-entropy. With a 2,048-token batch and BioMedLM's
28,896-token vocabulary that makes the logits in bf16, again in fp32, the fp32 log-probabilities kept
for backward, a dense fp32 gradient of the loss and the fp32 gradient of the logits: several full
[tokens x vocabulary] tensors (237 MB each in fp32) and as many trips through main memory.

``chunked``: the model runs without its output layer (:class:`medfoundry.train.accel.HiddenStatesLM`
returns the final hidden states), and :class:`LinearCrossEntropy` does layer and loss together, computing the
gradients during the forward pass (as Liger-Kernel does). The logits of a group of tokens (the whole
batch unless it exceeds :data:`GROUP_ELEMENTS`) come from one matmul into one buffer in the compute
dtype (bf16 under autocast); then, a few hundred tokens at a time (:data:`CHUNK_ELEMENTS`: fp32
temporaries that stay in the CPU's last-level cache), one softmax kernel and one cast turn them, in
place, into the gradient of the logits (the plain path's log-softmax forward and backward compute
every exp twice), which two more whole-group matmuls turn into the gradients of the hidden states
and of the weight. These are the three products of autocast's ``lm_head`` at the same sizes: products
split into small chunks run slower on CPU. That buffer is the only [tokens x vocabulary] tensor; the
losses and gradients equal the plain path's (in fp32 to rounding; under bf16 autocast the matmuls run
in bf16, as ``lm_head``'s do, and the softmax in fp32). Measured time and memory: docs/training-speed.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22  # logits per softmax chunk: 4 M (16 MB in fp32, cache-resident; 128 tokens x 28,896)
GROUP_ELEMENTS = 1 << 27  # logits per group of tokens sharing one matmul: 128 M (256 MB in bf16)
_TINY = 1e-30  # p(target) below this: the token's loss is recomputed with log-softmax


def chunk_rows(vocab: int) -> int:
    """Tokens per softmax chunk: the largest power of two whose logits fit :data:`CHUNK_ELEMENTS`."""
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return 1 << (rows.bit_length() - 1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` in fp32, without fp32 logits.

    ``hidden`` is [tokens, hidden size], ``weight`` the output layer's [vocabulary, hidden size] (no bias),
    ``targets`` [tokens]. Under autocast the matmuls run in the autocast dtype, as the output layer's
    would; otherwise in ``weight``'s dtype.
    """
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return LinearCrossEntropy.apply(hidden, weight, targets, compute)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``; gradients are computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute: torch.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.detach().to(compute), weight.detach().to(compute)
            loss, grad_h, grad_w = _loss_and_grads(h, w, targets, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = None if grad_h is None else (grad_h * grad_loss).to(hidden_dtype)
        grad_weight = None if grad_w is None else (grad_w * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None


def _loss_and_grads(h, w, targets, want_h: bool, want_w: bool):
    """Loss (fp32), gradient of the hidden states (compute dtype) and of the weight (fp32); a gradient
    not wanted is None (neither: validation, the loss alone)."""
    n, vocab = h.shape[0], w.shape[0]
    rows = chunk_rows(vocab)
    group = max(rows, GROUP_ELEMENTS // vocab // rows * rows)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None
    grad_w = None
    for g0 in range(0, n, group):
        hg, tg = h[g0 : g0 + group], targets[g0 : g0 + group]
        logits = torch.mm(hg, w.t())
        for c0 in range(0, hg.shape[0], rows):
            chunk = slice(c0, c0 + rows)
            loss += _logits_grad_(logits[chunk], tg[chunk], grad=want_h or want_w)
        if want_h:
            torch.mm(logits, w, out=grad_h[g0 : g0 + group])
        if want_w:
            part = torch.mm(logits.t(), hg).float()
            grad_w = part if grad_w is None else grad_w.add_(part)
    return loss, grad_h, grad_w


def _logits_grad_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """Summed cross-entropy of one chunk; with ``grad``, overwrites ``logits`` with d(loss)/d(logits) =
    softmax - one-hot.

    One softmax kernel (fp32 out whatever the input dtype: one exp per logit, where log-softmax then
    exp takes two; on CPU the exps are most of the cost) gives the probabilities; the loss of a token
    is -log p(target), exact in fp32 while p(target) is a normal float. A token whose p(target) falls
    below :data:`_TINY` (a loss above 69 nats: a diverging run) takes instead ``z_max - z_target -
    log p_max`` (``z``: its logits; p_max >= 1 / vocabulary never underflows): the same -log p(target),
    exact, chosen per token on the device with no host sync. The target entries are set from fp32
    values, so ``p - 1`` near 1 loses nothing to a bf16 ``logits``."""
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    index = targets[:, None]
    picked = probs.gather(1, index)
    top, top_index = logits.max(dim=1, keepdim=True)
    far = (top.float() - logits.gather(1, index).float()) - probs.gather(1, top_index).log()
    losses = torch.where(picked < _TINY, far, -picked.log())
    if grad:
        logits.copy_(probs.scatter_(1, index, picked - 1))
    return losses.sum()


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: summed fp32 cross-entropy of full logits."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")


class NextTokenLoss:
    """Summed next-token cross-entropy of a batch of windows through the (possibly DDP/FSDP/compile-wrapped)
    model, and the number of targets.

    With ``head`` (the output layer of the LM inside a :class:`medfoundry.train.accel.HiddenStatesLM`)
    the model called returns the final hidden states and the loss is :func:`linear_cross_entropy` on
    ``head.weight``. The weight is looked up at every call: under FSDP2 it is the all-gathered parameter
    the root module's forward has just put in place (the root keeps its parameters gathered until
    backward, whose final callback reduce-scatters their gradients). Without ``head``, the model called
    is the LM itself and the loss the plain fp32 cross-entropy of its logits.
    """

    def __init__(self, head: torch.nn.Linear | None, precision: str, device: str):
        self.head, self.precision, self.device = head, precision, device

    def _autocast(self):
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with self._autocast():
            if self.head is not None:
                hidden = model(input_ids=inputs)
                return linear_cross_entropy(hidden.flatten(0, 1), self.head.weight, targets.flatten()), targets.numel()
            logits = model(input_ids=inputs, use_cache=False).logits
        return plain_cross_entropy(logits, targets), targets.numel()

    def text_and_special(
        self, model: torch.nn.Module, batch: torch.Tensor, special: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss of the batch's text targets and of its special-token targets (``special``: bool, shaped
        like ``batch[:, 1:]``), from one forward pass, the output layer once per target: validation's bits per
        byte (:mod:`medfoundry.model.bits_per_byte`) counts the first only, its loss both."""
        inputs, targets, special = batch[:, :-1], batch[:, 1:].flatten(), special.flatten()
        parts = (~special).nonzero().squeeze(1), special.nonzero().squeeze(1)
        with self._autocast():
            if self.head is not None:
                hidden = model(input_ids=inputs).flatten(0, 1)
                text, other = (
                    linear_cross_entropy(hidden.index_select(0, i), self.head.weight, targets.index_select(0, i))
                    for i in parts
                )
                return text, other
            logits = model(input_ids=inputs, use_cache=False).logits.flatten(0, 1)
        text, other = (plain_cross_entropy(logits.index_select(0, i), targets.index_select(0, i)) for i in parts)
        return text, other
