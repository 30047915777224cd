"""Batches for the training loop: padded token rows, labels, per-example positions and attention masks.

Labels follow the Hugging Face convention (same positions as ``input_ids``; ``logits[:, i]``
predicts ``labels[:, i + 1]``; -100 = no loss), so ``model(**batch)`` computes the right loss too.
A token gets a label only when it carries loss and is not the first token of its example: in a
packed row the position before an example's first token belongs to the previous example.

In a packed row each example restarts its ``position_ids`` at 0 and may attend only to earlier
tokens of its own example: :func:`block_causal_mask` builds that 4D mask. Hugging Face models take
it as ``attention_mask`` unchanged; as an additive float mask (0 / most negative) it works with
both ``eager`` and ``sdpa`` attention, whereas a boolean mask is right for ``sdpa`` only (eager
attention adds the mask to the scores: True would add 1, not allow). Padding positions attend to
themselves so that no softmax row is empty (NaN) and carry no loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(batch, 1, L, L)`` mask from ``(batch, L)`` segment ids (1, 2, ... per example; 0 = padding).

    ``dtype=torch.bool`` gives True where attention is allowed; a float dtype gives an additive mask.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def collate(
    rows: list[list[tuple[np.ndarray, np.ndarray]]],
    pad_id: int,
    *,
    packed: bool,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A batch from rows of ``(ids, loss)`` examples, right-padded to the longest row; ``tokens`` counts
    the examples' tokens (padding excluded), ``target_index`` locates the predictions that carry loss.

    ``packed``: a 4D block-causal ``attention_mask``; otherwise (one example per row) the usual 2D
    padding mask.
    """
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    shape = (len(rows), length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segments = np.zeros(shape, dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for s, (ids, loss) in enumerate(row, 1):
            end = start + len(ids)
            input_ids[r, start:end] = ids
            labels[r, start:end] = np.where(loss, ids, IGNORE)
            labels[r, start] = IGNORE
            positions[r, start:end] = np.arange(len(ids))
            segments[r, start:end] = s
            start = end
    segment_ids = torch.from_numpy(segments)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "tokens": (segment_ids > 0).sum(),
        # flat indices of the predictions that carry loss (into labels[:, 1:]): computed here, on the host,
        # so the loss selects them on the device without a host sync (a boolean mask would need one)
        "target_index": torch.from_numpy(np.flatnonzero(labels[:, 1:] != IGNORE)),
    }
    batch["attention_mask"] = block_causal_mask(segment_ids, mask_dtype) if packed else (segment_ids > 0).long()
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward pass (not the labels, nor the count of ``tokens``)."""
    return {k: batch[k] for k in MODEL_INPUTS}


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies over labelled positions (in fp32).

    Summed rather than averaged so the loop can normalize over all targets of an accumulated global
    batch, whose micro-batches hold different numbers of response tokens (:func:`target_count`,
    counted on the host before the batch goes to the device).
    """
    targets = labels[:, 1:]
    scores = logits[:, :-1].float()
    return F.cross_entropy(
        scores.reshape(-1, scores.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Number of loss-carrying predictions in a batch (before the forward pass, for loss normalization)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
