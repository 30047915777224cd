"""Supervised fine-tuning data: instruction formats, benchmark converters, chat templates with prompt-loss
masks, a test-overlap guard, source mixtures, packing without cross-example attention, and a resumable
reader for the training loop (``dataset.prepare`` / ``dataset.SFTData``; losses in ``batch``)."""
