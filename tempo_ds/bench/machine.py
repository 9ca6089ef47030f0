"""The header every benchmark prints and stores: what ran, where, from which commit."""
import os
import platform
import subprocess

import torch


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info():
    info = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }
    for name, module in (("deepspeed", "deepspeed"), ("megatron_core", "megatron.core")):
        try:
            info[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # optional for the ops benchmark
            info[name] = None
    return info


def synchronize(device):
    """Wait for the device's queued work (a no-op on CPU), before reading a clock or a counter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def header(info):
    where = f"GPU {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else \
        f"CPU {info['cpu']} x{info['cpu_threads']} threads (no GPU: times are ratios, not speeds)"
    return (f"{where} | torch {info['torch']} | deepspeed {info.get('deepspeed')} | "
            f"megatron-core {info.get('megatron_core')} | git {info['git_sha']}")
