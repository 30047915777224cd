"""lm-evaluation-harness's ``medfoundry`` model: any lm-eval task, scored by medfoundry's shared-prefix scorer.

    lm_eval --model medfoundry --model_args pretrained=DIR,dtype=float32 --tasks ... --batch_size auto

It answers lm-eval's requests exactly as lm-eval's ``hf`` model (``HFLM`` of 0.4.13, causal, default arguments):

* ``loglikelihood``: lm-eval's own :class:`~lm_eval.api.model.TemplateLM` turns each (context, continuation) into
  tokens with :meth:`MedfoundryLM.tok_encode`, HFLM's encoding (the tokenizer's special tokens unless the text
  starts with the BOS text); the pairs go to :func:`medfoundry.eval.loglik.score_token_pairs`, which runs each
  distinct context once, few-shot prefixes shared by many contexts once, and the output layer only where a token
  is scored;
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows (``get_rolling_token_windows`` with
  ``context_len=1``, ``make_disjoint_window``) over the encoded text with the model's ``max_length``, each window
  one pair for the same scorer, summed per document;
* ``generate_until``: medfoundry's generation engine (:class:`medfoundry.eval.generate.Generator`), greedy unless
  the task samples (``do_sample``), stopping at the end-of-sequence token, ``until`` and ``max_gen_toks``; the
  checkpoint's ``generation_config.json`` changes nothing.

``batch_size`` (lm-eval's ``--batch_size``): an integer is the contexts per forward pass, ``auto`` the scorer's own
token budget; neither changes a result. Importing this module registers the model with lm-eval; the
``medfoundry-lm-eval.pth`` startup hook (``medfoundry_lm_eval_hook``) makes lm-eval's own command find it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from medfoundry import __version__
from medfoundry.errors import ConfigError
from medfoundry.extras import require
from medfoundry.generation.config import SamplingConfig

FEATURE = "the lm-eval backend"
lm_eval_model = require("lm_eval.api.model", FEATURE)
# lm-eval's own models are registered first: get_model imports them only while its registry is empty, so a
# registry holding nothing but medfoundry would hide "hf" and the others
require("lm_eval.models", FEATURE)
lm_eval_registry = require("lm_eval.api.registry", FEATURE)
lm_eval_utils = require("lm_eval.utils", FEATURE)
lm_eval_model_utils = require("lm_eval.models.utils", FEATURE)

PRECISION_OF_DTYPE = {"auto": "auto", "float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}
MAX_GEN_TOKS = 256  # HFLM's default when a task names none
SAMPLING_KWARGS = {"temperature", "top_p", "top_k", "repetition_penalty", "seed"}  # passed on to the engine


@lm_eval_registry.register_model("medfoundry")
class MedfoundryLM(lm_eval_model.TemplateLM):
    """A medfoundry-loaded model answering lm-eval's requests (module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        loaded=None,
        **unknown,
    ):
        """``pretrained``: a checkpoint directory or GGUF file, loaded by :func:`medfoundry.model.load.load_model`
        in ``dtype`` (float32, bfloat16 or auto); or ``loaded``, a model already loaded that way."""
        super().__init__()
        if unknown:
            raise ConfigError(
                f"medfoundry model: unknown model_args {', '.join(sorted(unknown))}; it takes pretrained, dtype, "
                "device, max_length, allow_pickle and trust_remote_code (batch_size is lm-eval's --batch_size)"
            )
        if loaded is None:
            loaded = _load(pretrained, dtype, device, allow_pickle, trust_remote_code)
        self.lm = dataclasses.replace(loaded, max_length=int(max_length)) if max_length else loaded
        self.tokenizer = self.lm.tokenizer
        self.scorer_batch = _scorer_batch(batch_size)
        self.batch_size = batch_size  # lm-eval records it in its results
        from medfoundry.eval.generate import Generator

        self._generator = Generator(self.lm, batch_size=self.scorer_batch)  # one engine for every generate_until

    # --- what lm-eval reads ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: the BOS token, or EOS when there is none (what an empty context and a document start after)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def device(self) -> str:
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.lm.model.parameters()),
            "model_dtype": str(next(self.lm.model.parameters()).dtype),
            "model_path": str(self.lm.path),
            "medfoundry_version": __version__,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's ``tok_encode``: the tokenizer's own special tokens unless told, and none for a string that
        already starts with the BOS text."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos_text = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and lm_eval_model_utils.has_bos_prefix(string, bos_text):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # --- requests --------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation) or None, context tokens, continuation tokens)``, as lm-eval's
        ``loglikelihood`` builds them."""
        answers = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (loglik, _) in zip(owners, self._score(windows, disable_tqdm)):
            totals[owner] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings (and the same BOS handling) are generated together."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        bos_text = self.tokenizer.decode(self.prefix_token_id)
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            bare = lm_eval_model_utils.has_bos_prefix(context, bos_text)
            groups.setdefault((json.dumps(gen_kwargs, sort_keys=True, default=str), bare), []).append(i)
        texts: list[str] = [""] * len(requests)
        for (_, bare), members in groups.items():
            gen_kwargs = requests[members[0]].args[1]
            sampling = _sampling(gen_kwargs, eos)
            prompts = [requests[i].args[0] for i in members]
            done = self._generator(prompts, sampling, add_special_tokens=not bare, progress=not disable_tqdm)
            for i, prompt, (text,) in zip(members, prompts, done):
                texts[i] = lm_eval_model_utils.postprocess_generated_text(text, sampling.stop, None)
                self.cache_hook.add_partial("generate_until", (prompt, gen_kwargs), texts[i])
        return texts

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per pair; an empty continuation scores (0, True), as in HFLM."""
        from medfoundry.eval.loglik import score_token_pairs

        scored = [i for i, (_, continuation) in enumerate(pairs) if continuation]
        scores = score_token_pairs(
            self.lm, [pairs[i] for i in scored], batch_size=self.scorer_batch, progress=not disable_tqdm
        )
        answers = [(0.0, True)] * len(pairs)
        for i, score in zip(scored, scores):
            answers[i] = (score.loglik, score.is_greedy)
        return answers


def _load(pretrained, dtype: str, device: str | None, allow_pickle: bool, trust_remote_code: bool):
    from medfoundry.model.load import load_model

    if not pretrained:
        raise ConfigError("medfoundry model: model_args needs pretrained=DIR (a checkpoint directory or .gguf file)")
    precision = PRECISION_OF_DTYPE.get(str(dtype))
    if precision is None:
        raise ConfigError(f"medfoundry model: dtype={dtype} is not one of {', '.join(PRECISION_OF_DTYPE)}")
    return load_model(
        Path(str(pretrained)),
        precision=precision,
        device=_device(device),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )


def _device(device: str | None) -> str:
    """The device to load on, by lm-eval's ``hf`` rule: a GPU that is not there (``cuda:0``, the default of lm-eval's
    command, on a machine without one) counts as no choice, which is medfoundry's ``auto``."""
    import torch

    kind, _, index = (device or "").partition(":")
    if kind == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
        return "auto"
    return device or "auto"


def _scorer_batch(batch_size: int | str) -> int | None:
    """lm-eval's ``batch_size`` as the scorer's: ``auto`` / ``auto:N`` is None (the scorer's token budget)."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return None
    try:
        size = int(batch_size)
    except ValueError:
        raise ConfigError(f"medfoundry model: batch_size={batch_size!r} is not an integer nor auto") from None
    if size < 1:
        raise ConfigError(f"medfoundry model: batch_size must be at least 1, not {size}")
    return size


def _sampling(gen_kwargs: dict, eos: str) -> SamplingConfig:
    """A task's ``generation_kwargs`` as the engine's settings: greedy unless ``do_sample``, lm-eval's stop
    sequences (``until`` plus the end-of-sequence text) and token limit."""
    kwargs = lm_eval_model_utils.normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
    until = lm_eval_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_tokens = kwargs.pop("max_gen_toks")
    do_sample = kwargs.pop("do_sample", False)
    unsupported = set(kwargs) - SAMPLING_KWARGS
    if unsupported:
        raise ConfigError(
            f"medfoundry model: generation_kwargs {', '.join(sorted(unsupported))} are not supported "
            f"(supported: do_sample, until, max_gen_toks, {', '.join(sorted(SAMPLING_KWARGS))})"
        )
    if not do_sample:
        kwargs["temperature"] = 0.0
    return SamplingConfig(max_tokens=max_tokens, stop=until, **kwargs)


def run_tasks(
    loaded,
    tasks: list[str],
    manager,
    *,
    batch_size: int | None,
    limit: int | None,
    num_fewshot: int | None,
    log_samples: bool,
    bootstrap_iters: int,
    fewshot_seed: int,
) -> dict:
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``loaded`` (a :class:`medfoundry.model.load.LoadedModel`), with
    the task index ``manager`` (:func:`task_manager`); lm-eval's results dictionary (``samples`` too when
    ``log_samples``)."""
    evaluator = require("lm_eval.evaluator", FEATURE)
    model = MedfoundryLM(loaded=loaded, batch_size=batch_size or "auto")
    return evaluator.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        fewshot_random_seed=fewshot_seed,
    )


def task_manager(tasks: list[str], include: list[str]):
    """lm-eval's task index: the ``include`` folders alone when they hold every task asked for (indexing lm-eval's
    own ~15,000 task files takes half a minute), else with lm-eval's tasks too. An unknown name is a ConfigError."""
    manager_module = require("lm_eval.tasks", FEATURE)
    for path in include:
        if not Path(path).is_dir():
            raise ConfigError(f"lm_eval_include: {path} is not a folder of lm-eval task YAML files")
    if include:
        manager = manager_module.TaskManager(include_path=include, include_defaults=False)
        if not _missing(manager, tasks):
            return manager
    manager = manager_module.TaskManager(include_path=include or None)
    missing = _missing(manager, tasks)
    if missing:
        where = f" nor in {', '.join(include)}" if include else ""
        raise ConfigError(f"lm_eval_tasks: {', '.join(missing)} not found among lm-eval's tasks{where}")
    return manager


def _missing(manager, tasks: list[str]) -> list[str]:
    return [task for task in tasks if not manager.match_tasks([task])]


def write_results(out: Path, results: dict) -> list[str]:
    """lm-eval's results as its own command writes them: ``results.json`` and, when logged, one
    ``samples_<task>.jsonl`` per task, in ``out``. Returns the file names."""
    from medfoundry.io import atomic_open, write_text

    samples = results.get("samples") or {}
    summary = {key: value for key, value in results.items() if key != "samples"}
    dump = lm_eval_utils.handle_non_serializable
    write_text(out / "results.json", json.dumps(summary, indent=2, default=dump, ensure_ascii=False))
    names = ["results.json"]
    for task, records in samples.items():
        name = f"samples_{task}.jsonl"
        with atomic_open(out / name) as fh:
            for record in records:
                fh.write(json.dumps(record, default=dump, ensure_ascii=False) + "\n")
        names.append(name)
    return names
