"""The Hugging Face Trainer with DeepSpeed and "tempo" in its ds_config, launch/train_hf.py, and
`python -m tempo_ds.bench train --framework hf` (issue 19), on CPU with tiny models.

The runs that initialise a process group (the Trainer with DeepSpeed, the benchmark) run in a
subprocess each, so no process group or accelerate state outlives them in the test process.
"""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "ds_config_hf.json")


def _env(tmp_path):
    return dict(os.environ, TEMPO_DS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))


def _run(cmd, tmp_path, timeout=600):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2"])
def test_tempo_false_swaps_nothing(name, tmp_path):
    """"tempo": false in the Trainer's ds_config: tempo_ds.hf.apply leaves every module and the
    attention implementation as they were, and says so."""
    import tempo_ds.hf
    from tempo_ds.hf.trainer import build_model

    config = json.load(open(CONFIG))
    config["tempo"] = False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    model, _ = build_model(name, size="tiny", seq_length=32, vocab_size=300)
    before = [(n, type(m)) for n, m in model.named_modules()]
    report = tempo_ds.hf.apply(model, str(path), log=False)
    assert report.swapped == {}
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert model.config._attn_implementation == "sdpa"
    # the control: the same model with "tempo": true does swap (so the check above can fail)
    config["tempo"] = True
    path.write_text(json.dumps(config))
    assert tempo_ds.hf.apply(model, str(path), log=False, build_ops=False).swapped.get("layernorm")


def test_accelerate_refuses_auto_in_tempo_and_deepspeed_config_drops_it():
    """DeepSpeed and the Trainer ignore the "tempo" key; accelerate walks every key of the config
    and refuses an "auto" it cannot fill, "tempo.attention": "auto" included (docs/hf.md).
    tempo_ds.hf.trainer.deepspeed_config drops the "auto" fields of "tempo" (their default), and
    accelerate then accepts the config with "tempo" in it."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from tempo_ds.deepspeed.config import TempoConfigError, tempo_entry
    from tempo_ds.hf.trainer import deepspeed_config

    def accelerate_accepts(config):
        plugin = DeepSpeedPlugin(hf_ds_config=HfDeepSpeedConfig(config))
        plugin.deepspeed_config_process(must_match=False, train_micro_batch_size_per_gpu=2)
        return plugin.deepspeed_config

    base = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    assert accelerate_accepts(dict(base, tempo=True))["tempo"] is True
    asked = dict(base, tempo={"attention": "auto", "gelu": False})
    with pytest.raises(ValueError, match="tempo.attention"):
        accelerate_accepts(dict(asked))
    cleaned = deepspeed_config(asked)
    assert cleaned["tempo"] == {"gelu": False}
    assert tempo_entry(cleaned) == tempo_entry(asked)
    assert accelerate_accepts(cleaned)["tempo"] == {"gelu": False}
    with pytest.raises(TempoConfigError, match="attention"):
        deepspeed_config(dict(base, tempo={"attention": "fast"}))


def test_hf_dataset_names_and_labels():
    """The embedded corpus in transformers' names: MLM labels are -100 except at the masked
    positions; CLM labels are the inputs (the model shifts them); RoBERTa gets no token types."""
    from tempo_ds.hf.trainer import corpus_dataset

    mlm, tok = corpus_dataset("mlm", 32, 8, 1, vocab_size=300, token_types=False)
    item = mlm[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    picked = item["labels"] != -100
    assert 0 < int(picked.sum()) < int(item["attention_mask"].sum())
    assert int(item["labels"][picked].max()) < 256  # only text bytes are targets, never specials
    clm, _ = corpus_dataset("clm", 32, 8, 1, vocab_size=300)
    item = clm[3]
    assert set(item) == {"input_ids", "labels"} and item["input_ids"].shape == (32,)
    assert bool((item["labels"] == item["input_ids"]).all())


def test_launch_train_hf_trainer_zero2_tiny_cpu(tmp_path):
    """launch/train_hf.py end to end: a tiny BERT through transformers' Trainer with DeepSpeed
    ZeRO-2 from configs/ds_config_hf.json ("tempo": true kept in the config the Trainer reads),
    converted by tempo_ds.hf.apply: the engine is DeepSpeed's at stage 2, Tempo swapped the norms,
    GELUs, dropouts and attention, and the loss is finite and falls."""
    out = tmp_path / "run.json"
    proc = _run([sys.executable, "launch/train_hf.py", "--model", "bert", "--tiny", "--seq-length", "32",
                 "--micro-batch", "4", "--steps", "6", "--log-interval", "1", "--lr", "3e-3", "--warmup-steps", "0",
                 "--output-dir", str(tmp_path / "out"), "--json-out", str(out)], tmp_path)
    run = json.loads(out.read_text())
    assert run["engine"] == "DeepSpeedEngine" and run["zero_stage"] == 2, run
    assert run["tempo"]["enabled"] and run["steps"] == 6
    for kind in ("layernorm", "gelu", "dropout", "attention"):
        assert run["swapped"].get(kind), (kind, run["swapped"], run["left"])
    losses = [r["loss"] for r in run["records"]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 for r in run["records"])
    assert "swap report:" in proc.stdout and "tokens/s" in proc.stdout


def test_bench_train_hf_tiny_cpu(tmp_path):
    """`python -m tempo_ds.bench train --framework hf` on CPU: a tiny GPT-2, stock SDPA and Tempo,
    says it is CPU-sized, writes its report, and Tempo's ledger keeps less per sample than SDPA's."""
    out = tmp_path / "bench"
    proc = _run([sys.executable, "-m", "tempo_ds.bench", "train", "--framework", "hf", "--model", "gpt2",
                 "--variants", "sdpa", "tempo", "--isolation", "none", "--steps", "1", "--warmup-steps", "0",
                 "--max-micro-batch", "2", "--seq-length", "32", "--vocab-size", "300", "--no-plots",
                 "--out", str(out)], tmp_path)
    assert "CPU-sized configuration" in proc.stderr + proc.stdout
    report = json.loads((out / "train_hf_gpt2_tiny_s32_cpu.json").read_text())
    assert report["config"]["framework"] == "hf"
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"sdpa", "tempo"} and not any(r["error"] for r in rows.values())
    assert rows["tempo"]["attention_asked"] == "tempo" and rows["sdpa"]["attention_asked"] == "sdpa"
    for r in rows.values():
        assert r["largest_micro_batch"] == 2 and math.isfinite(r["common"]["losses"][0])
        assert r["ledger"]["layers_bytes"] > 0
    assert rows["tempo"]["activation_per_sample_ledger_bytes"] < rows["sdpa"]["activation_per_sample_ledger_bytes"]
