"""Text generation for chain-of-thought evaluation and self-consistency, on the generation engine.

``n`` completions of each prompt come from one continuously batched :meth:`Engine.generate
<medfoundry.generation.engine.Engine.generate>` call, the one the ``generate`` command and the server use.
What it guarantees:

* a completion depends on its prompt and the seed only, never on its batch mates: each request samples with
  its own generator, seeded from (seed, sample number, prompt text), and the engine computes every row at its
  own positions, so batch size, ``limit`` and order change nothing;
* greedy decoding when the sampling is greedy; ``n`` greedy samples are one completion repeated;
* completions stop at the end-of-sequence token, at ``max_tokens`` or at the first stop sequence, which is cut
  off; every sampling choice is the :class:`~medfoundry.generation.config.SamplingConfig`'s, so a checkpoint's
  ``generation_config.json`` (its temperature, penalties, length) changes nothing but the end-of-sequence
  tokens it names.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from medfoundry.generation.config import SamplingConfig

DEFAULT_BATCH = 8


def row_seed(seed: int, sample: int, prompt: str) -> int:
    return xxhash.xxh64_intdigest(f"{seed}\0{sample}\0{prompt}".encode()) & (2**63 - 1)


def generate(
    lm,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    *,
    n: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> list[list[str]]:
    """``n`` completions of each prompt (``lm``: a :class:`medfoundry.model.load.LoadedModel`); ``sampling.seed``,
    when set, replaces ``seed``. A prompt too long for the model is cut from the left so that it and
    ``sampling.max_tokens`` new tokens fit."""
    from medfoundry.generation.engine import Engine, sequence_limit

    draws = 1 if sampling.greedy else n
    seed = sampling.seed if sampling.seed is not None else seed
    limit = sequence_limit(lm.model, lm.tokenizer)
    keep = max(1, limit - sampling.max_tokens)
    ids = [row[-keep:] for row in lm.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    longest = max(map(len, ids), default=1)
    engine = Engine(
        lm.model,
        lm.tokenizer,
        max_batch=batch_size or DEFAULT_BATCH,
        max_seq_len=max(2, min(limit, longest + sampling.max_tokens)),
        name=lm.name,
        precision=lm.precision,
    )
    rows = [(i, j) for i in range(len(prompts)) for j in range(draws)]
    params = [sampling.model_copy(update={"seed": row_seed(seed, j, prompts[i])}) for i, j in rows]
    with lm.autocast():
        done = engine.generate([ids[i] for i, _ in rows], params, progress=progress)
    texts = {row: c.text for row, c in zip(rows, done, strict=True)}
    return [[texts[(i, j if draws > 1 else 0)] for j in range(n)] for i in range(len(prompts))]
