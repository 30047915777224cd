"""prepare + SFTData: the on-disk artifact, its cache, the mixture and per-source validation split, length
handling, the resumable sharded reader, the refusal of test data, and a few training steps through the
contract the fine-tuning loop uses."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared
from medfoundry.config import validate
from medfoundry.errors import ConfigError, InputError, MedfoundryError
from medfoundry.sft.batch import IGNORE, masked_token_loss, model_inputs, target_count
from medfoundry.sft.config import SFTDataConfig
from medfoundry.sft.dataset import SFTData, prepare, validation_passes
from test_sft_templates import make_tokenizer

TERMS = ["anemia", "fever", "sepsis", "asthma", "gout", "angina", "stroke", "nephritis", "hepatitis", "rickets"]
FILLER = [
    "the",
    "patient",
    "blood",
    "pressure",
    "heart",
    "rate",
    "dose",
    "daily",
    "oral",
    "therapy",
    "chronic",
    "acute",
    "symptoms",
    "treatment",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def _sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(FILLER, size=int(rng.integers(low, high)))) + "."


def write_sources(root: Path) -> dict[str, Path]:
    """300 Alpaca definitions and 100 two-turn ShareGPT dialogues of varied lengths."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    defs = [
        {
            "instruction": f"Define {TERMS[i % 10]} (case {i}).",
            "input": _sentence(rng, 2, 30),
            "output": _sentence(rng, 3, 25),
        }
        for i in range(300)
    ]
    dialogues = [
        {
            "conversations": [
                {"from": "human", "value": f"Tell me about {TERMS[i % 10]} {i}."},
                {"from": "gpt", "value": _sentence(rng, 2, 15)},
                {"from": "human", "value": "And the treatment?"},
                {"from": "gpt", "value": _sentence(rng, 2, 15)},
            ]
        }
        for i in range(100)
    ]
    paths = {"defs": root / "defs.jsonl", "dialogues": root / "dialogues.jsonl"}
    for name, records in (("defs", defs), ("dialogues", dialogues)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def config(tokenizer: Path, paths: dict[str, Path], **changes) -> SFTDataConfig:
    tree = {
        "tokenizer": str(tokenizer),
        "max_length": 256,
        "allow_test_overlap": True,
        "seed": 1,
        "sources": [
            {"name": "defs", "path": str(paths["defs"]), "weight": 0.6},
            {"name": "dialogues", "path": str(paths["dialogues"]), "weight": 0.4},
        ],
        "mixture": {"total": 500},
        "validation": {"fraction": 0.1},
    }
    return validate(SFTDataConfig, {**tree, **changes})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("sft_inputs")
    return make_tokenizer(root / "tok"), write_sources(root / "data")


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sft_prepared") / "data"
    return out, prepare(config(*inputs), out)


def test_manifest_counts_mixture_and_per_source_validation(prepared):
    out, manifest = prepared
    stats, mixture = manifest.details["source_stats"], manifest.details["mixture"]
    for name, total in (("defs", 300), ("dialogues", 100)):
        assert stats[name]["records"] == total == stats[name]["train_records"] + stats[name]["val_records"]
        assert 0.04 * total <= stats[name]["val_records"] <= 0.18 * total
    assert {n: s["examples"] for n, s in mixture["sources"].items()} == {"defs": 300, "dialogues": 200}
    assert mixture["sources"]["dialogues"]["epochs"] == pytest.approx(200 / stats["dialogues"]["train_records"])
    train = manifest.details["splits"]["train"]
    assert (
        train["examples"] == 500 == manifest.counts["train_examples"]
        and train["fill"] > 0.9
        and train["response_tokens"] == mixture["response_tokens"]
    )
    assert manifest.details["tokenizer"]["added_ids"] and manifest.details["overlap"] == {"checked": False}
    report = (out / "report.md").read_text()
    assert "| defs | 60.0% | 60.0% | 300 |" in report and "⟦" in report


def test_stored_examples_are_what_the_saved_chat_template_renders(prepared, inputs):
    from transformers import AutoTokenizer

    from medfoundry.sft.formats import read_conversations
    from medfoundry.sft.templates import Renderer

    out, manifest = prepared
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    renderer = Renderer(tokenizer, SFTDataConfig.model_validate(manifest.config).template)
    rendered = {tuple(renderer(c).ids.tolist()) for c in read_conversations(inputs[1]["dialogues"])}
    split = SFTData(out).split("train")
    stored = [tuple(ids.tolist()) for r in range(split.n_rows) for ids, _ in split.row(r)]
    from_dialogues = [s for s in stored if s in rendered]
    assert len(from_dialogues) == 200  # every sampled dialogue is byte-identical to apply_chat_template's ids
    assert all(
        tokenizer.apply_chat_template(renderer.messages(c))["input_ids"] == list(renderer(c).ids)
        for c in list(read_conversations(inputs[1]["defs"]))[:5]
    )


def test_prepare_is_cached_by_content_and_redone_when_an_input_changes(prepared, inputs, tmp_path):
    out, manifest = prepared
    before = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(config(*inputs), out) == manifest and (out / "manifest.json").stat().st_mtime_ns == before
    tokenizer, paths = inputs
    copy = {**paths, "defs": tmp_path / "defs.jsonl"}
    copy["defs"].write_text(paths["defs"].read_text())
    first = prepare(config(tokenizer, copy), tmp_path / "a")
    copy["defs"].write_text(paths["defs"].read_text().replace("case 0)", "case zero)"))
    assert prepare(config(tokenizer, copy), tmp_path / "a").key != first.key


def test_reader_resumes_exactly_across_epochs(prepared):
    data = SFTData(prepared[0])
    reader = data.reader(8, seed=3)
    steps = int(reader.batches_per_epoch) + 3  # run past an epoch boundary
    for _ in range(steps - 2):
        next(reader)
    state = reader.state_dict()
    expected = [next(reader) for _ in range(4)]
    resumed = data.reader(8, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states travel through checkpoints as JSON
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert resumed.epoch >= 1
    with pytest.raises(MedfoundryError, match="seed is 3 in the state but 4 here"):
        data.reader(8, seed=4).load_state_dict(state)


def test_ranks_split_each_epoch_between_them(prepared):
    data = SFTData(prepared[0])
    split = data.split("train")
    key = lambda batch: tuple(batch["input_ids"][0].tolist())  # noqa: E731 (one row per batch: no padding)
    everything = Counter(key(split.batch([r])) for r in range(split.n_rows))
    readers = [data.reader(1, rank=r, world_size=2, seed=5) for r in (0, 1)]
    seen = []
    while len(seen) < split.n_rows:
        for reader in readers:  # alternating ranks visit global positions 0, 1, 2, ...
            seen.append(key(next(reader)))
    assert Counter(seen[: split.n_rows]) == everything


def test_validation_rows_belong_to_one_source_each(prepared):
    out, manifest = prepared
    val = SFTData(out).split("val")
    for name in ("defs", "dialogues"):
        rows = val.rows_for(name)
        examples = sum(len(val.row(int(r))) for r in rows)
        assert examples == manifest.details["source_stats"][name]["val_records"]
        batches = [b for rank in (0, 1) for b in val.batches(2, rank=rank, world_size=2, source=name)]
        assert sum(len(b["input_ids"]) for b in batches) == len(rows)
        assert validation_passes(val, 2, 2, name) == max(
            sum(1 for _ in val.batches(2, rank=r, world_size=2, source=name)) for r in (0, 1)
        )
    with pytest.raises(MedfoundryError, match="unknown source 'pubmed'"):
        val.rows_for("pubmed")


def test_without_packing_each_row_is_one_example_with_a_2d_mask(inputs, tmp_path):
    manifest = prepare(config(*inputs, packing=False), tmp_path / "data")
    assert manifest.counts["train_rows"] == 500
    batch = next(SFTData(tmp_path / "data").reader(4))
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert (batch["position_ids"][:, 0] == 0).all() and (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def _long_record(tmp_path: Path, inputs) -> dict[str, Path]:
    _, paths = inputs
    lines = paths["defs"].read_text().splitlines()
    lines[6] = json.dumps({"instruction": "Summarize: " + "the patient had fever " * 120, "output": "Fever."})
    lines[9] = json.dumps({"instruction": "List everything.", "output": "fever and anemia " * 120})
    path = tmp_path / "defs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return {**paths, "defs": path}


def test_over_long_examples_error_with_their_location_by_default(inputs, tmp_path):
    paths = _long_record(tmp_path, inputs)
    with pytest.raises(
        InputError,
        match=r"defs.jsonl:7: example is [\d,]+ tokens, longer than max_length 256: raise "
        r"max_length, or set truncation: left_prompt",
    ):
        prepare(config(inputs[0], paths, validation={"fraction": 0}), tmp_path / "data")


def test_left_prompt_truncation_keeps_whole_responses_and_reports_drops(inputs, tmp_path):
    paths = _long_record(tmp_path, inputs)
    manifest = prepare(
        config(inputs[0], paths, truncation="left_prompt", validation={"fraction": 0}), tmp_path / "data"
    )
    stats = manifest.details["source_stats"]["defs"]
    assert stats["truncated"] == 1 and stats["dropped_too_long"] == 1  # the long response is never cut
    assert stats["dropped_locations"] == [f"{paths['defs']}:10"]
    data = SFTData(tmp_path / "data")
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    split = data.split("train")
    responses = [tokenizer.decode(ids[loss].tolist()) for r in range(split.n_rows) for ids, loss in split.row(r)]
    assert "Fever.<|im_end|>" in responses
    dropped = prepare(config(inputs[0], paths, truncation="drop", validation={"fraction": 0}), tmp_path / "dropped")
    assert (
        dropped.details["source_stats"]["defs"]["dropped_too_long"] == 2
        and dropped.details["source_stats"]["defs"]["truncated"] == 0
    )


def test_reader_state_from_other_data_is_refused(prepared, inputs, tmp_path):
    other = tmp_path / "other"
    prepare(config(*inputs, seed=2), other)
    state = SFTData(other).reader(4).state_dict()
    with pytest.raises(MedfoundryError, match="reader state does not fit this reader: (n_rows|fingerprint)"):
        SFTData(prepared[0]).reader(4).load_state_dict(state)


def test_medmcqa_dev_is_refused_for_training_unless_dropped_or_allowed(inputs, tmp_path):
    benchmarks = shared("benchmarks")
    tree = {
        "tokenizer": str(inputs[0]),
        "overlap": {"benchmarks_dir": str(benchmarks)},
        "max_length": 4096,
        "truncation": "drop",
        "sources": [
            {
                "name": "medmcqa",
                "converter": "medmcqa",
                "path": str(benchmarks / "medmcqa" / "dev.jsonl"),
                "reasoning": True,
                "max_examples": 40,
                "weight": 0.5,
            },
            {
                "name": "pqa",
                "converter": "pubmedqa",
                "path": str(benchmarks / "pubmedqa" / "ori_pqal.json"),
                "max_examples": 40,
                "weight": 0.5,
            },
        ],
    }
    with pytest.raises(
        MedfoundryError,
        match=r"(?s)^4183 of 4683 training records overlap evaluation test splits "
        r"\(medmcqa: 4183\):\n  .*dev.jsonl:1: medmcqa test item",
    ):
        prepare(validate(SFTDataConfig, tree), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing half-written
    allowed = prepare(validate(SFTDataConfig, {**tree, "allow_test_overlap": True}), tmp_path / "allowed")
    assert (
        allowed.details["overlap"]["overlapping"] == 4183
        and allowed.details["overlap"]["action"] == "kept (allow_test_overlap)"
    )
    with pytest.raises(ConfigError, match="source 'medmcqa' has no training examples left"):
        prepare(validate(SFTDataConfig, {**tree, "drop_test_overlap": True}), tmp_path / "emptied")
    tree["sources"][0] = {"name": "mmlu", "converter": "mmlu", "path": str(benchmarks / "mmlu" / "dev"), "weight": 0.5}
    dropped = prepare(validate(SFTDataConfig, {**tree, "drop_test_overlap": True}), tmp_path / "dropped")
    stats = dropped.details["source_stats"]["mmlu"]
    assert stats["test_overlap"] == 5 and stats["train_records"] + stats["val_records"] == 25
    assert dropped.details["overlap"]["action"] == "dropped" and len(dropped.details["overlap"]["first"]) == 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"allow_test_overlap": False}, "overlap.benchmarks_dir is required"),
        ({"drop_test_overlap": True}, "allow_test_overlap and drop_test_overlap exclude each other"),
        (
            {"mixture": {"total": 10}, "sources": [{"name": "a", "path": "a.jsonl", "weight": 0.5}]},
            "when every source has a weight they must sum to 1",
        ),
        (
            {"sources": [{"name": "a", "path": "a.jsonl", "converter": "medqa", "format": "alpaca"}]},
            "format applies to file sources",
        ),
        (
            {"sources": [{"name": "a", "path": "a.jsonl", "converter": "medqa", "reasoning": True}]},
            "'reasoning' applies to the pubmedqa and medmcqa converter",
        ),
        ({"template": {"name": "vicuna"}}, "template.name"),
    ],
)
def test_config_errors_say_what_to_fix(inputs, change, message, monkeypatch):
    monkeypatch.delenv("MEDFOUNDRY_BENCHMARKS", raising=False)  # else overlap.benchmarks_dir defaults to it
    tree = {"tokenizer": "t", "allow_test_overlap": True, "sources": [{"name": "a", "path": "a.jsonl"}], **change}
    with pytest.raises(ConfigError, match=message):
        validate(SFTDataConfig, tree)


def test_a_few_training_steps_through_the_loop_contract(prepared):
    """Grow the model for the ChatML tokens, then train on reader batches with the masked loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from medfoundry.model.resize import resize_for_tokenizer

    out, manifest = prepared
    data = SFTData(out)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=manifest.details["tokenizer"]["added_ids"][0],
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    assert resize_for_tokenizer(model, data.tokenizer_dir)["vocab_size"] == manifest.details["tokenizer"]["vocab_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reader, losses = data.reader(8, seed=0), []
    for _ in range(25):
        batch = next(reader)
        loss_sum, count = masked_token_loss(model(**model_inputs(batch)).logits, batch["labels"]), target_count(batch)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum.item() / count)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    # exported with the prepared tokenizer, the model carries its chat template and stops at <|im_end|>
    from transformers import AutoTokenizer, GenerationConfig

    from medfoundry.model.export import export_hf

    export_hf(model, data.tokenizer_dir, out.parent / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(out.parent / "model"))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(out.parent / "model")).eos_token_id == end == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Define fever."}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nDefine fever.<|im_end|>\n<|im_start|>assistant\n"
