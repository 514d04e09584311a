"""The rates a plan is made with: `fuyou probe`'s measurements saved with the machine they were
measured on, read back by `fuyou plan`, `fuyou profile` and `--plan auto`; conservative defaults
when nothing was probed.

The file is rates.json in the user's config dir ($FUYOU_CONFIG_DIR, else $XDG_CONFIG_HOME/fuyou,
else ~/.config/fuyou).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Dict, Optional, Tuple

import psutil
import torch

from scheduler.costmodel import Rates

RATES_FILE = "rates.json"
# Rates used when `fuyou probe` has not been run: deliberately low (so a plan errs slow), from
# the 2-vCPU EPYC dev box's measured figures for the CPU and one PCIe 4 x16 NVMe-less H100 host for CUDA.
DEFAULT_RATES = {
    "cpu": Rates(read_Bps=1.0e9, write_Bps=0.8e9, h2d_Bps=5e9, d2h_Bps=5e9, compute_flops=40e9, optim_params_per_s=300e6,
                 latency_s={"read": 2e-3, "write": 10e-3}),
    "cuda": Rates(read_Bps=2.0e9, write_Bps=1.5e9, h2d_Bps=12e9, d2h_Bps=12e9, compute_flops=200e12, optim_params_per_s=500e6,
                  latency_s={"read": 1e-3, "write": 5e-3, "compute": 1e-3}),
}


def config_dir() -> str:
    d = os.environ.get("FUYOU_CONFIG_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fuyou")


def rates_path() -> str:
    return os.path.join(config_dir(), RATES_FILE)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_rates(rates: Rates, details: dict, device: torch.device, path: Optional[str] = None) -> str:
    path = path or rates_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"format": "fuyou-rates", "version": 1, "machine": machine_info(device), "rates": rates.to_json(), "details": details}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def read_rates_file(path: str) -> Tuple[Rates, dict]:
    """Rates from a probe file or a plain JSON object of Rates fields; (rates, machine info)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read rates file {path} ({exc}); run `fuyou probe` again or fix the file") from None
    if not isinstance(doc, dict):
        raise ValueError(f"rates file {path} is not a JSON object; run `fuyou probe` again")
    body = doc.get("rates", doc)
    try:
        return Rates.from_json(body), doc.get("machine", {})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rates file {path}: {exc}") from None


def load_rates(device: str, path: Optional[str] = None) -> Tuple[Rates, str]:
    """Saved probe rates for this device kind, else the planner's conservative defaults; with a
    sentence saying which."""
    path = path or rates_path()
    if os.path.isfile(path):
        rates, machine = read_rates_file(path)
        if machine.get("device", device) == device:
            return rates, f"probed {machine.get('date', '?')} on {machine.get('cpu', '?')}" + (f" / {machine['gpu']}" if "gpu" in machine else "") + f" ({path})"
    return DEFAULT_RATES[device], f"conservative defaults for {device} (no `fuyou probe` result for this device at {path})"


def rates_table(rates: Rates) -> Dict[str, str]:
    lat = rates.latency_s
    return {
        "storage read": f"{rates.read_Bps / 1e9:.2f} GB/s" + (f" + {lat['read'] * 1e3:.1f} ms/task" if lat.get("read") else ""),
        "storage write": f"{rates.write_Bps / 1e9:.2f} GB/s" + (f" + {lat['write'] * 1e3:.1f} ms/task" if lat.get("write") else ""),
        "h2d / d2h": f"{rates.h2d_Bps / 1e9:.2f} / {rates.d2h_Bps / 1e9:.2f} GB/s",
        "compute": f"{rates.compute_flops / 1e12:.3f} TFLOP/s (model FLOPs)" + (f" + {rates.compute_call_s * 1e3:.2f} ms/call" if rates.compute_call_s else ""),
        "optimizer": f"{rates.optim_params_per_s / 1e6:.0f} M params/s (fp32)"
        + "".join(f", {v / 1e6:.0f} ({k})" for k, v in rates.optim_by_codec.items()),
        "host copy": f"{rates.copy_Bps / 1e9:.2f} GB/s",
        "between ranks": f"{rates.collective_Bps / 1e9:.2f} GB/s per rank" + (f" + {lat['collective'] * 1e3:.1f} ms/collective"
                                                                           if lat.get("collective") else ""),
    }
