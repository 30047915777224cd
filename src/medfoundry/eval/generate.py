"""Text generation for chain-of-thought evaluation and self-consistency, on the generation engine.

``n`` completions of each prompt come from one continuously batched :meth:`Engine.generate
<medfoundry.generation.engine.Engine.generate>` call, the one the ``generate`` command and the server use, on
one engine per model for the whole evaluation (:class:`Generator`). What it guarantees:

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


class Generator:
    """Completions of one model (``lm``: a :class:`medfoundry.model.load.LoadedModel`) for a whole evaluation.

    Its engine is built at the first call and kept for the next ones, so that a compiled decode step is compiled
    once per run, not once per task (a second engine in one process would compile its own step again, and
    slower: dynamo keeps the first one's graphs). It is rebuilt only when a call needs longer rows than it holds,
    or a compiled step it lacks. ``compile`` (``auto``, ``on``, ``off``): ``auto`` compiles on a GPU, and on a
    CPU for a call long enough to earn the compile
    (:func:`medfoundry.generation.compiled.compile_pays_on_cpu`)."""

    def __init__(self, lm, *, batch_size: int | None = None, compile: str = "auto"):
        from medfoundry.generation.engine import sequence_limit

        self.lm, self.max_batch, self.compile = lm, batch_size or DEFAULT_BATCH, compile
        self.limit = sequence_limit(lm.model, lm.tokenizer)  # tokens per row (prompt + new) the model takes
        self.parameters = sum(p.numel() for p in lm.model.parameters())
        self.engine = None

    def __call__(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        *,
        n: int = 1,
        seed: int = 0,
        add_special_tokens: bool = True,
        progress: bool = False,
    ) -> list[list[str]]:
        """``n`` completions of each prompt; ``sampling.seed``, when set, replaces ``seed``. A prompt too long for
        the model is cut from the left so that it and ``sampling.max_tokens`` new tokens fit."""
        lm = self.lm
        draws = 1 if sampling.greedy else n
        seed = sampling.seed if sampling.seed is not None else seed
        keep = max(1, self.limit - sampling.max_tokens)
        ids = [row[-keep:] for row in lm.tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
        rows = [(i, j) for i in range(len(prompts)) for j in range(draws)]
        longest = max(map(len, ids), default=1)
        engine = self._engine(min(self.limit, longest + sampling.max_tokens), len(rows) * sampling.max_tokens)
        params = [sampling.model_copy(update={"seed": row_seed(seed, j, prompts[i])}) for i, j in rows]
        with lm.autocast():
            done = engine.generate([ids[i] for i, _ in rows], params, progress=progress)
        texts = {row: c.text for row, c in zip(rows, done, strict=True)}
        return [[texts[(i, j if draws > 1 else 0)] for j in range(n)] for i in range(len(prompts))]

    def _engine(self, row_tokens: int, new_tokens: int):
        """The engine for a call whose rows hold up to ``row_tokens`` tokens and which generates up to
        ``new_tokens`` in all: the kept one when it fits, else a new one with rows of at least the engine's
        default length (so that later tasks fit too)."""
        from medfoundry.generation.compiled import compile_pays_on_cpu, should_compile
        from medfoundry.generation.engine import DEFAULT_MAX_SEQ_LEN, Engine

        lm, kept = self.lm, self.engine
        device = next(lm.model.parameters()).device
        compiled = should_compile(self.compile, device, long_lived=compile_pays_on_cpu(self.parameters, new_tokens))
        if kept is not None and kept.max_seq_len >= row_tokens and (kept.compiled or not compiled):
            return kept
        self.engine = None  # its cache is freed before the next one is allocated
        self.engine = Engine(
            lm.model,
            lm.tokenizer,
            max_batch=self.max_batch,
            max_seq_len=max(2, row_tokens, min(self.limit, DEFAULT_MAX_SEQ_LEN)),
            name=lm.name,
            precision=lm.precision,
            compile="on" if compiled else "off",
        )
        return self.engine
