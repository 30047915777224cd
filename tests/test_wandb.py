"""`log.wandb`: a tiny pretraining run logged to Weights & Biases offline. Read back from the run's `.wandb`
file (W&B's LevelDB-style log of protobuf records), the scalars equal metrics.jsonl's at the same steps, the
config and the summary are there, and a resumed run continues the same W&B run id; a run without `log.wandb`
never imports wandb, and a missing wandb is one line naming the extra."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from medfoundry.config import validate
from medfoundry.extras import MissingExtra
from medfoundry.train.config import PretrainConfig
from medfoundry.train.loop import pretrain
from medfoundry.train.metrics import TENSORBOARD_TAGS, MetricsLog
from test_pretrain import _records, _tree, tokens  # noqa: F401  (tokens: the module's fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB log blocks, 7-byte file and record headers
FULL, LAST = 1, 4


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never the network, whatever the config says."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run file, reassembled from their FULL / FIRST..LAST fragments."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _offline_run(path: Path) -> dict:
    """run id, config, history {tag: [(step, value)]}, summary and exit code of one offline run file."""
    run = {"history": {}, "summary": {}, "exit_code": None}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] = {_key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            items = {_key(i): json.loads(i.value_json) for i in record.history.item}
            for tag, value in items.items():
                if not tag.startswith("_"):
                    run["history"].setdefault(tag, []).append((record.history.step.num, value))
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _offline_runs(out: Path) -> list[dict]:
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    return [_offline_run(f) for f in files]


def _expected(records: list[dict], after: int = -1) -> dict:
    return {
        tag: [(r["step"], r[key]) for r in records if key in r and r["step"] > after]
        for key, tag in TENSORBOARD_TAGS.items()
    }


def test_scalars_config_and_summary_match_the_run_and_a_resume_continues_it(tokens, tmp_path):
    out = tmp_path / "wb"
    tree = _tree(tokens, out, steps=4)
    tree.update(
        log={"every": 2, "wandb": {"project": "medfoundry-tests", "name": "tiny", "mode": "offline"}},
        eval={"every": 4, "batches": 1},
        checkpoint={"every": 2, "keep_last": 2},
    )
    summary = pretrain(validate(PretrainConfig, tree))
    (run,) = _offline_runs(out)
    assert run["id"] == json.loads((out / "wandb.json").read_text())["id"]
    records = _records(out)
    assert run["history"] == _expected(records)
    assert [s for s, _ in run["history"]["train/loss"]] == [1, 2, 4]
    config = {k: v for k, v in run["config"].items() if k != "_wandb"}
    assert config == validate(PretrainConfig, tree).model_dump(mode="json")
    assert {k: run["summary"][k] for k in summary} == summary
    assert run["exit_code"] == 0

    # as after a crash past step 2: the run resumes from step 2 and logs into the same W&B run
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "model")
    pretrain(validate(PretrainConfig, tree))
    _, resumed = _offline_runs(out)
    assert resumed["id"] == run["id"]
    assert resumed["history"] == {t: v for t, v in _expected(_records(out), after=2).items() if v}
    assert [s for s, _ in resumed["history"]["train/loss"]] == [4]
    assert resumed["exit_code"] == 0


def test_a_run_started_over_is_a_new_wandb_run(tmp_path):
    from medfoundry.train.metrics import _wandb_run_id

    first = _wandb_run_id(tmp_path, resume_step=0)
    assert _wandb_run_id(tmp_path, resume_step=4) == first  # resumed from a checkpoint
    assert _wandb_run_id(tmp_path, resume_step=0) != first  # no checkpoint: training starts over


def test_without_log_wandb_wandb_is_never_imported(tokens, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb fails
    log = MetricsLog(tmp_path / "plain" / "metrics.jsonl", enabled=True, config={"log": {"wandb": None}})
    log.eval(0, {"val_loss": 1.0, "val_ppl": 2.7})
    log.close()
    assert log.wandb is None and not (tmp_path / "plain" / "wandb.json").exists()

    tree = _tree(tokens, tmp_path / "no_wandb", steps=2)
    tree["log"] = {"wandb": {"project": "p"}}
    with pytest.raises(
        MissingExtra, match=r"^log.wandb needs wandb, which is not installed: pip install 'medfoundry\["
    ):
        pretrain(validate(PretrainConfig, tree))
    assert not (tmp_path / "no_wandb" / "metrics.jsonl").exists()


def test_log_wandb_is_runtime_only_in_both_training_stages():
    from medfoundry.sft.config import FinetuneConfig
    from medfoundry.stages import RUNTIME_ONLY, STAGES

    tree = _tree({"tokens_dir": "t", "tokenizer_dir": "k"}, Path("out"), steps=2)
    plain = validate(PretrainConfig, tree)
    logged = validate(PretrainConfig, {**tree, "log": {"every": 1, "wandb": {"project": "p", "entity": "e"}}})
    assert STAGES["pretrain"].key_config(plain) == STAGES["pretrain"].key_config(logged)
    assert "log.wandb" in RUNTIME_ONLY["finetune"]
    assert FinetuneConfig.model_fields["log"].annotation is PretrainConfig.model_fields["log"].annotation
