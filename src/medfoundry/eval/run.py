"""Running an evaluation: every task on every model, each (model, task) result cached so a killed run resumes.

Tasks are prepared once, before any model is loaded, so that every configuration mistake (unknown
task, missing data file, k-shot without demonstrations, a template naming a missing field) is
reported at once. The cache key of a (model, task) result is a hash of the model's files, the
device and precision, and the exact requests sent to the model (every context and continuation, or
every prompt and the generation settings), so anything that changes what the model is asked
invalidates it, and batch size, which changes nothing, does not. Metrics are recomputed from the
cached model outputs on every run (bootstrap settings can change freely).

A chat prompt style's requests are messages, rendered with the model's own chat template only when
the model runs; its cached results stay valid because the template is one of the model's files.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from medfoundry import __version__
from medfoundry.errors import ConfigError
from medfoundry.eval import results as result_files
from medfoundry.eval.config import EvalConfig
from medfoundry.eval.data import HubLoader, load_split
from medfoundry.eval.fewshot import fewshot_pool
from medfoundry.eval.prompts import PromptBuilder, chat_prompt
from medfoundry.eval.tasks import BUILTIN_DIR, PerplexityTask, Plan, Task, TaskRegistry
from medfoundry.io import write_json
from medfoundry.manifest import Manifest, content_key, inputs_fingerprint

LM_EVAL_DIR = "lm_eval"  # lm-eval's own results for lm_eval_tasks, in each model's folder


@dataclass
class Prepared:
    """A task ready to run: its questions rendered into requests (nothing model-specific yet)."""

    task: Task
    kind: str  # loglik | cot | perplexity
    total: int = 0  # documents in the test split, before `limit`
    doc_ids: list[str] = field(default_factory=list)
    contexts: list[str | list[dict]] = field(default_factory=list)  # chat: the messages the chat template renders
    choices: list[list[str]] = field(default_factory=list)
    continuations: list[list[str]] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    options: list[list[str] | None] = field(default_factory=list)
    num_fewshot: int = 0
    fewshot_source: str | None = None
    fewshot_sampler: str | None = None
    notes: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    chat: bool = False  # contexts are messages, rendered with the model's chat template when it runs

    @property
    def name(self) -> str:
        return self.task.task

    def requests_digest(self) -> str:
        """Hash of everything the model will be asked."""
        h = xxhash.xxh3_128()
        if isinstance(self.task, PerplexityTask):
            h.update(
                json.dumps(
                    [self.task.perplexity.model_dump(), inputs_fingerprint(self.task.perplexity.path, by="stat")]
                ).encode()
            )
        for context, continuations in zip(self.contexts, self.continuations):
            h.update(json.dumps([context, continuations]).encode())
        h.update(json.dumps([self.kind, self.stop]).encode())
        return h.hexdigest()


def prepare(task: Task, cfg: EvalConfig, registry: TaskRegistry, hub_loader: HubLoader | None = None) -> Prepared:
    if isinstance(task, PerplexityTask):
        if not Path(task.perplexity.path).exists():
            raise ConfigError(f"task {task.task} ({task.source}): perplexity.path {task.perplexity.path} not found")
        return Prepared(task, "perplexity")
    kind = cfg.mode or task.mode
    builder = PromptBuilder(task, cfg.prompt_style)
    docs = load_split(task, task.test_split, cfg.benchmarks_path(), hub_loader)
    if not docs:
        raise ConfigError(f"task {task.task} ({task.source}): its {task.test_split!r} split has no documents")
    pool = fewshot_pool(
        task,
        cfg.num_fewshot,
        style=cfg.prompt_style,
        source=cfg.fewshot_source,
        get_task=registry.get,
        benchmarks_dir=cfg.benchmarks_path(),
        hub_loader=hub_loader,
        sampler=cfg.fewshot_sampler,
    )
    if pool and pool.builder.spec.chat != builder.spec.chat:
        raise ConfigError(
            f"task {task.task}: prompt style {cfg.prompt_style!r} is a chat style in only one of "
            f"{task.task} and {pool.source}, so its demonstrations cannot be put in its prompts"
        )
    prepared = Prepared(
        task,
        kind,
        total=len(docs),
        num_fewshot=cfg.num_fewshot,
        fewshot_source=pool.source if pool else None,
        fewshot_sampler=pool.sampler if pool else None,
        notes=[pool.note] if pool and pool.note else [],
        stop=list(cfg.generation.stop if cfg.generation.stop is not None else task.generation.stop),
        chat=builder.spec.chat,
    )
    for doc in docs[: cfg.limit]:
        demos = (
            pool.demonstrations(cfg.num_fewshot, seed=cfg.fewshot_seed, task=task.task, doc_id=doc.id) if pool else []
        )
        prepared.doc_ids.append(doc.id)
        prepared.contexts.append(builder.context(doc, demos, cot=kind == "cot"))
        prepared.choices.append(builder.choices(doc))
        prepared.continuations.append(builder.continuations(doc) if kind == "loglik" else [])
        prepared.targets.append(builder.target(doc))
        prepared.options.append(builder.options(doc))
    return prepared


def registry_for(cfg: EvalConfig) -> TaskRegistry:
    return TaskRegistry([BUILTIN_DIR, *(Path(d) for d in cfg.task_dirs)])


def evaluate(cfg: EvalConfig, *, progress: bool = False, hub_loader: HubLoader | None = None) -> dict:
    """Evaluate every model on every task; write each model's results and the comparison report.

    Writes ``OUTPUT/<model>/{results.json, samples.jsonl, results.md}``, the comparison ``OUTPUT/results.md``
    and ``OUTPUT/manifest.json`` (config, model hashes, version, time). Returns
    ``{"models": [{"name", "path", "dir", "results"}], "report": the comparison's path,
    "table": {"header", "rows"}}`` (the comparison table, one row per model).
    """
    start = time.perf_counter()
    registry = registry_for(cfg)
    plan = registry.plan(cfg.tasks)
    prepared = [prepare(task, cfg, registry, hub_loader) for task in plan.tasks]
    lm_eval_tasks = _lm_eval_tasks(cfg)
    out = Path(cfg.output_dir)
    evaluated = []
    for name, path in _model_names(cfg.models, allow_pickle=cfg.allow_pickle):
        results = _evaluate_model(cfg, plan, prepared, lm_eval_tasks, name, path, out / name, progress)
        evaluated.append({"name": name, "path": str(path), "dir": str(out / name), "results": results})
    header, rows = result_files.comparison_rows(plan, evaluated)
    report = out / "results.md"
    result_files.write_comparison(report, header, rows, [m["name"] for m in evaluated])
    Manifest(
        stage="eval",
        config=cfg.model_dump(mode="json"),
        inputs={m["path"]: m["results"]["config"]["model_files_hash"] for m in evaluated},
        outputs={"report": "results.md", **{m["name"]: m["name"] for m in evaluated}},
        counts={"models": len(evaluated), "tasks": len(plan.tasks)},
        timings={"total_s": round(time.perf_counter() - start, 2)},
        details={
            "tasks": plan.requested,
            "models": {
                m["name"]: {"path": m["path"], "model_files_hash": m["results"]["config"]["model_files_hash"]}
                for m in evaluated
            },
            "table": {"header": header, "rows": rows},
            **(
                {"lm_eval": {m["name"]: m["results"]["lm_eval"]["results"] for m in evaluated}}
                if cfg.lm_eval_tasks
                else {}
            ),
        },
    ).write(out)
    return {"models": evaluated, "report": str(report), "table": {"header": header, "rows": rows}}


def _model_names(models: list[str], *, allow_pickle: bool = False) -> list[tuple[str, Path]]:
    """A short unique name per model (its folder, GGUF file or Hub repository name, numbered on clashes) and its
    local path (a Hub id's snapshot, downloaded when needed)."""
    named, seen = [], {}
    from medfoundry.model.load import check_reference, model_name

    for model in models:
        path = check_reference(model, "model", allow_pickle=allow_pickle)
        base = model_name(model)
        seen[base] = seen.get(base, 0) + 1
        named.append((base if seen[base] == 1 else f"{base}-{seen[base]}", path))
    return named


def model_files_hash(path: Path) -> str:
    """Content fingerprint of a model: every file of its directory (hidden ones and the README.md model card
    skipped: they change no output), or its GGUF file."""
    return inputs_fingerprint(path, skip=lambda name: name == "README.md")


def _evaluate_model(
    cfg: EvalConfig,
    plan: Plan,
    prepared: list[Prepared],
    lm_eval_tasks,
    name: str,
    path: Path,
    out: Path,
    progress: bool,
) -> dict:
    from medfoundry.runtime import resolve_device_precision

    start = time.perf_counter()
    device, precision = resolve_device_precision(cfg.device, cfg.precision)
    identity = {"model_files_hash": model_files_hash(path), "device": device, "precision": precision}
    runner = _Runner(cfg, path, progress)
    scored = {}
    try:
        for p in prepared:
            cache = out / "cache" / f"{p.name}.json"
            key = content_key(identity, p.requests_digest(), _settings(cfg, p))
            outputs = _cached(cache, key)
            _log(progress, f"eval: {name}: {p.name} ({_describe(p)}){': cached' if outputs is not None else ''}")
            if outputs is None:
                outputs = runner.run(p)
                write_json(cache, {"key": key, "outputs": outputs})
            scored[p.name] = result_files.score(p, outputs, cfg)
        lm_eval = _run_lm_eval(cfg, lm_eval_tasks, runner, out / LM_EVAL_DIR, name, progress) if lm_eval_tasks else None
    finally:
        runner.close()
    info = {
        "model": "medfoundry",
        "model_args": f"pretrained={path}",
        "model_name": name,
        "model_path": str(path),
        **identity,
        "medfoundry_version": __version__,
    }
    results = result_files.results_json(plan, prepared, scored, info, cfg)
    if lm_eval is not None:
        results["lm_eval"] = lm_eval
    results["total_evaluation_time_seconds"] = str(
        round(time.perf_counter() - start, 2)
    )  # a string, as lm-eval writes it
    result_files.write_model_outputs(out, results, prepared, scored, name)
    return results


def _lm_eval_tasks(cfg: EvalConfig):
    """lm-eval's task index for ``lm_eval_tasks`` (None without them), built before any model loads so that an
    unknown name is reported at once."""
    if not cfg.lm_eval_tasks:
        return None
    from medfoundry.eval.lm_eval_backend import task_manager

    return task_manager(cfg.lm_eval_tasks, cfg.lm_eval_include)


def _run_lm_eval(cfg: EvalConfig, tasks, runner: _Runner, out: Path, name: str, progress: bool) -> dict:
    """lm-eval's own tasks (``lm_eval_tasks``, indexed in ``tasks``) run by ``lm_eval.simple_evaluate`` on the
    loaded model, through the lm-eval backend; lm-eval's ``results.json`` (and ``samples_<task>.jsonl``) in
    ``out``. A ``num_fewshot`` of 0 leaves each lm-eval task its own default. Returns what the model's
    results.json records of it."""
    from medfoundry.eval.lm_eval_backend import run_tasks, write_results

    _log(progress, f"eval: {name}: lm-eval tasks {', '.join(cfg.lm_eval_tasks)}")
    results = run_tasks(
        runner.lm,
        cfg.lm_eval_tasks,
        tasks,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot or None,
        log_samples=cfg.lm_eval_log_samples,
        bootstrap_iters=cfg.bootstrap_iters,
        fewshot_seed=cfg.fewshot_seed,
    )
    files = write_results(out, results)
    return {"tasks": cfg.lm_eval_tasks, "results": results["results"], "files": [f"{LM_EVAL_DIR}/{f}" for f in files]}


def _describe(p: Prepared) -> str:
    if p.kind == "perplexity":
        return f"perplexity on {p.task.perplexity.path}"
    return f"{len(p.doc_ids)} of {p.total} questions, {p.num_fewshot}-shot, {p.kind}"


def _settings(cfg: EvalConfig, p: Prepared) -> dict:
    """Run settings that change what a task's model outputs are (besides the requests themselves)."""
    if p.kind == "cot":
        return {
            "generation": cfg.generation.model_dump(),
            "chat_template": cfg.chat_template,
            "seed": cfg.seed,
            "compile": cfg.compile,  # a compiled step rounds differently: a sampled token may differ
        }
    if p.kind == "perplexity":
        return {"limit": cfg.limit}
    return {}


def _cached(path: Path, key: str):
    """A task's model outputs from an earlier run with the same key, else None."""
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached["outputs"]
    return None


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


class _Runner:
    """Runs prepared tasks on one model, loading it only when some task is not cached."""

    def __init__(self, cfg: EvalConfig, path: Path, progress: bool):
        self.cfg, self.path, self.progress, self._lm, self._generator = cfg, path, progress, None, None

    @property
    def lm(self):
        if self._lm is None:
            from medfoundry.model.load import load_model

            self._lm = load_model(
                self.path,
                precision=self.cfg.precision,
                device=self.cfg.device,
                threads=self.cfg.threads,
                allow_pickle=self.cfg.allow_pickle,
            )
        return self._lm

    @property
    def generator(self):
        """The model's generator, one for every chain-of-thought task of the run (one engine, compiled once)."""
        if self._generator is None:
            from medfoundry.eval.generate import Generator

            self._generator = Generator(self.lm, batch_size=self.cfg.batch_size, compile=self.cfg.compile)
        return self._generator

    def close(self) -> None:
        self._lm = self._generator = None
        gc.collect()

    def run(self, p: Prepared):
        return {"loglik": self._loglik, "cot": self._cot, "perplexity": self._perplexity}[p.kind](p)

    def _loglik(self, p: Prepared) -> list:
        from medfoundry.eval.loglik import LoglikRequest, score_requests

        lm, contexts = self.lm, p.contexts
        if p.chat:
            lm, contexts = dataclasses.replace(lm, tokenizer=VerbatimTokenizer(lm.tokenizer)), self._chat_contexts(p)
        requests = [LoglikRequest(c, tuple(conts)) for c, conts in zip(contexts, p.continuations)]
        scores = score_requests(lm, requests, batch_size=self.cfg.batch_size, progress=self.progress)
        return [[[s.loglik, s.is_greedy, s.tokens] for s in doc] for doc in scores]

    def _chat_contexts(self, p: Prepared) -> list[str]:
        """A chat style's contexts rendered with the evaluated model's own chat template."""
        import jinja2

        tokenizer = self.lm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"model {self.path}: its tokenizer has no chat template, but task {p.name} uses the chat "
                f"prompt style {self.cfg.prompt_style!r}; evaluate this model with prompt_style lm_eval"
            )
        try:
            return [chat_prompt(tokenizer, messages) for messages in p.contexts]
        except jinja2.TemplateError as exc:
            raise ConfigError(
                f"model {self.path}: its chat template cannot render the prompts of task {p.name} "
                f"(prompt style {self.cfg.prompt_style!r}): {exc}"
            ) from None

    def _cot(self, p: Prepared) -> list:
        gen, tokenizer = self.cfg.generation, self.lm.tokenizer
        templated = self.cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        prompts = (
            [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True
                )
                for c in p.contexts
            ]
            if templated
            else p.contexts
        )
        completions = self.generator(
            prompts,
            gen.model_copy(update={"stop": p.stop}),
            n=gen.samples,
            seed=self.cfg.seed,
            add_special_tokens=not templated,
            progress=self.progress,
        )
        return [{"prompt": prompt, "completions": texts} for prompt, texts in zip(prompts, completions)]

    def _perplexity(self, p: Prepared) -> dict:
        from medfoundry.eval.perplexity import iter_eval_texts, shard_perplexity, text_perplexity

        spec, lm = p.task.perplexity, self.lm
        path = Path(spec.path)
        shards = path / spec.split if (path / spec.split / "index.json").is_file() else path
        common = {
            "max_length": spec.max_length or lm.max_length,
            "stride": spec.stride,
            "batch_size": self.cfg.batch_size or 8,
            "precision": lm.precision,
            "progress": self.progress,
        }
        if (shards / "index.json").is_file():
            if spec.sources:
                raise ConfigError(
                    f"task {p.name}: perplexity.sources filters corpus or JSONL documents; token shards "
                    f"({shards}) do not record sources"
                )
            result = shard_perplexity(
                lm.model, shards, limit_tokens=spec.limit_tokens, tokenizer=lm.tokenizer, **common
            )
        else:
            texts = iter_eval_texts(
                path, split=spec.split, text_field=spec.text_field, limit=self.cfg.limit, sources=spec.sources
            )
            result = text_perplexity(lm.model, lm.tokenizer, texts, **common)
        return result.to_dict()


class VerbatimTokenizer:
    """A tokenizer that encodes text as written, adding no special tokens; everything else is ``tokenizer``'s.

    A chat-rendered prompt already holds every special token its template writes (a BOS among them, if
    any), and it is encoded without adding more by SFT training (``medfoundry.sft.templates.Renderer``),
    by ``apply_chat_template(tokenize=True)`` and by the chain-of-thought path here. The scorer's own rule
    (lm-eval's HFLM: the tokenizer's default special tokens unless the text starts with the BOS) agrees when
    the template writes the BOS, but would add one the model never saw in training where the template
    writes none and the tokenizer adds it by default (ChatML on a LLaMA tokenizer).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        return self._tokenizer(text, **{**kwargs, "add_special_tokens": False})
