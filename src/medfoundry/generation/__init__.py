"""Generation: the KV-cache engine with continuous batching (:mod:`.engine`), token sampling (:mod:`.sampling`),
the one :class:`~medfoundry.generation.config.SamplingConfig`, and answering prompts into JSONL records
(:func:`medfoundry.generation.run.generate`).

Used by ``medfoundry generate`` and ``chat``, the recipe's ``generate`` stage, eval's chain-of-thought and the
HTTP server (:mod:`medfoundry.serve`).
"""
