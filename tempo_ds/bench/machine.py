"""The header every benchmark prints and stores: what ran, where, from which commit."""
import math
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


def json_safe(obj):
    """obj with every non-finite float replaced by None: json writes NaN and Infinity as bare
    words, which are not JSON, and a json.dump default= never sees floats."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def header(info, device="cuda"):
    """One line naming what ran: the GPU when `device` (the device type the figures come from) is
    cuda and the machine has one, else the CPU, whose times are ratios, not speeds."""
    where = f"GPU {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] and device == "cuda" else \
        f"CPU {info['cpu']} x{info['cpu_threads']} threads (times are ratios, not speeds)"
    return (f"{where} | torch {info['torch']} | deepspeed {info.get('deepspeed')} | "
            f"megatron-core {info.get('megatron_core')} | git {info['git_sha']}")
