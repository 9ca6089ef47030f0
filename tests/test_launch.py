"""The launch scripts: `deepspeed launch/train_gpt2.sh` typed literally runs the trainer.

The DeepSpeed launcher runs its script argument with `python -u`; the script is a bash/Python
polyglot (docs/launch.md), so this must train, not fail with a SyntaxError.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tempo_ds.megatron.parallel import free_local_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="no deepspeed launcher on PATH")
def test_deepspeed_launch_script_literally(tmp_path):
    config = json.load(open(os.path.join(ROOT, "configs", "ds_config_gpt2.json")))
    config["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, TEMPO_DS_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--master_port", str(free_local_port()), "launch/train_gpt2.sh", "--size", "tiny",
           "--seq-length", "32", "--steps", "2", "--config", str(path), "--save", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "SyntaxError" not in out
    assert "Tempo ON (tempo spec)" in out
    assert "step      2/2 | loss" in out
    assert "activations saved for backward" in out
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step2"


def test_launch_scripts_are_valid_python():
    import ast
    for name in ("train_gpt2.sh", "train_bert.sh"):
        source = open(os.path.join(ROOT, "launch", name)).read()
        assert source.startswith("#!/usr/bin/env bash\n")
        ast.parse(source)


def test_trainer_help():
    proc = subprocess.run([sys.executable, "-m", "tempo_ds.training.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--data-path" in proc.stdout
