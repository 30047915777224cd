"""Answering a list of prompts with the engine and writing one JSONL record per prompt: ``medfoundry generate`` and
the recipe's ``generate`` stage both run :func:`generate`, so they write the same records::

    {...the prompt file's other fields, "prompt": ..., "completion": ..., "finish_reason": "stop" | "length",
     "prompt_tokens": ..., "completion_tokens": ...}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medfoundry.errors import ConfigError, InputError
from medfoundry.generation.config import GenerateConfig


def generate(cfg: GenerateConfig, *, progress: bool = False) -> dict:
    """Answer ``cfg``'s prompts (continuously batched) and write the records to ``cfg.output`` (default: standard
    output). Returns a summary: where the records are, whether the chat template was used, the counts."""
    records = read_prompts(cfg)
    engine = cfg.load_engine()
    template = cfg.template()
    has_template = bool(template or engine.tokenizer.chat_template)
    chat = has_template if cfg.chat is None else cfg.chat
    if chat and not has_template:
        raise ConfigError(f"{cfg.model} has no chat template: pass one with chat_template (--chat-template FILE)")
    prompts = []
    for number, record in enumerate(records, 1):
        try:
            ids = (
                engine.chat_prompt([{"role": "user", "content": record["prompt"]}], template)
                if chat
                else engine.encode(record["prompt"])
            )
            engine.check_prompt(ids)
        except ValueError as exc:
            raise ConfigError(f"prompt {number}: {exc}") from None
        prompts.append(ids)
    done = engine.generate(prompts, cfg.sampling, progress=progress and len(prompts) > 1)
    lines = [
        json.dumps(
            {
                **record,
                "completion": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": len(c.token_ids),
            },
            ensure_ascii=False,
        )
        + "\n"
        for record, c in zip(records, done, strict=True)
    ]
    if cfg.output:
        from medfoundry.io import atomic_open

        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cfg.output) as fh:
            fh.writelines(lines)
    else:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    return {
        "samples": cfg.output,
        "chat": chat,
        "prompts": len(lines),
        "completion_tokens": sum(len(c.token_ids) for c in done),
    }


def read_prompts(cfg: GenerateConfig) -> list[dict]:
    """Records with a 'prompt' field: ``cfg.prompts``, then those of ``cfg.prompts_file``."""
    records = [{"prompt": p} for p in cfg.prompts]
    if cfg.prompts_file:
        records += _prompts_from_file(Path(cfg.prompts_file))
    if not records:
        raise ConfigError(f"no prompts: {cfg.prompts_file} holds none")
    return records


def _prompts_from_file(path: Path) -> list[dict]:
    from medfoundry.io import iter_lines

    if not path.is_file():
        raise InputError(str(path), "prompt file not found")
    records = []
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            records.append({"prompt": line.rstrip("\r\n")})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(str(path), f"not JSON ({exc.msg})", line_no) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(str(path), "expected an object with a string field 'prompt'", line_no)
        records.append(record)
    return records
