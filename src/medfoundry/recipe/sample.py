"""The recipe's ``generate`` stage: a few prompts answered by the run's model, as the serving engine answers them."""

from __future__ import annotations

import json
from pathlib import Path

from medfoundry.errors import ConfigError
from medfoundry.io import atomic_open
from medfoundry.recipe.config import GenerateConfig


def generate_samples(model: str | None, cfg: GenerateConfig, output: Path) -> dict:
    """Answer ``cfg.prompts`` with ``model``; writes JSONL records ``{prompt, completion, finish_reason, ...}``."""
    from medfoundry.serve.engine import Engine
    from medfoundry.serve.sampling import SamplingParams

    if model is None:
        raise ConfigError(
            "stages.generate: the recipe has no model to generate with (no pretrain, finetune or eval models)"
        )
    engine = Engine.load(model)
    chat = bool(engine.tokenizer.chat_template) if cfg.chat is None else cfg.chat
    if chat and not engine.tokenizer.chat_template:
        raise ConfigError(f"stages.generate.chat: the model {model} has no chat template")
    prompts = [engine.chat_prompt([{"role": "user", "content": p}]) if chat else engine.encode(p) for p in cfg.prompts]
    params = SamplingParams(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        seed=cfg.seed,
    )
    done = engine.generate(prompts, params)
    records = [
        {"prompt": p, "completion": c.text, "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids)}
        for p, c in zip(cfg.prompts, done)
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output) as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return {"samples": str(output), "chat": chat, "prompts": len(records)}
