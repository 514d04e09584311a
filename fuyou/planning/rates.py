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


def other_machine(saved: dict, device: str) -> Optional[str]:
    """What differs between the machine a probe was saved on and this one (None: the same machine)."""
    here = machine_info(torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu"))
    for key in ("cpu", "cores", "gpu"):
        if key in saved and saved.get(key) != here.get(key):
            return f"{key} {saved.get(key)} there, {here.get(key)} here"
    ram = saved.get("ram_bytes")
    if ram and abs(ram - here["ram_bytes"]) > 0.05 * here["ram_bytes"]:
        return f"{ram / 2**30:.1f} GiB RAM there, {here['ram_bytes'] / 2**30:.1f} GiB here"
    return None


def load_rates(device: str, path: Optional[str] = None) -> Tuple[Rates, str]:
    """Saved probe rates for this device kind measured on this machine, else the planner's
    conservative defaults; with a sentence saying which (and why a saved probe was not used)."""
    path = path or rates_path()
    if os.path.isfile(path):
        rates, machine = read_rates_file(path)
        if machine.get("device", device) == device:
            elsewhere = other_machine(machine, device)
            if elsewhere is None:
                return rates, f"probed {machine.get('date', '?')} on {machine.get('cpu', '?')}" + (f" / {machine['gpu']}" if "gpu" in machine else "") + f" ({path})"
            return DEFAULT_RATES[device], (f"conservative defaults for {device} (the probe in {path} is of another machine: {elsewhere}; "
                                           "run `fuyou probe` here, or pass it with --rates to plan for that machine)")
    return DEFAULT_RATES[device], f"conservative defaults for {device} (no `fuyou probe` result for this device at {path})"


def saved_details(path: str) -> dict:
    """The `details` a saved probe holds ({} when it cannot be read): its spread, and with
    `fuyou probe --model M` the model whose blocks it timed in steps (`calibrated_on`) or why it
    could not (`not_calibrated`: {"model", "why"})."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    details = doc.get("details") if isinstance(doc, dict) else None
    return details if isinstance(details, dict) else {}


def load_spread(path: str) -> dict:
    """The spread a saved probe measured for each rate ({} when it has none): {field: [slow, fast]}."""
    spread = saved_details(path).get("spread")
    return spread if isinstance(spread, dict) else {}


def rate_bounds(rates: Rates, spread: dict) -> Tuple[Rates, Rates]:
    """(slow, fast): `rates` with every rate the spread gives at its slow end, and at its fast end."""
    def at(end: int) -> Rates:
        changes = {k: float(v[end]) for k, v in spread.items() if k != "optim_by_codec" and isinstance(v, list) and len(v) == 2 and v[end] > 0}
        codecs = spread.get("optim_by_codec", {})
        by_codec = {k: float(codecs[k][end]) if k in codecs else v for k, v in rates.optim_by_codec.items()}
        return rates.replace(**changes, optim_by_codec=by_codec)

    return at(0), at(1)


def rates_table(rates: Rates) -> Dict[str, str]:
    lat = rates.latency_s
    return {
        "storage read": f"{rates.read_Bps / 1e9:.2f} GB/s" + (f" + {lat['read'] * 1e3:.1f} ms/task" if lat.get("read") else ""),
        "storage write": f"{rates.write_Bps / 1e9:.2f} GB/s" + (f" + {lat['write'] * 1e3:.1f} ms/task" if lat.get("write") else ""),
        "h2d / d2h": f"{rates.h2d_Bps / 1e9:.2f} / {rates.d2h_Bps / 1e9:.2f} GB/s"
        + "".join(f", h2d of {k} weights {v / 1e9:.2f}" for k, v in rates.h2d_by_codec.items()),
        "compute": f"{rates.compute_flops / 1e12:.3f} TFLOP/s (model FLOPs)" + (f" + {rates.compute_call_s * 1e3:.2f} ms/call" if rates.compute_call_s else ""),
        "optimizer": f"{rates.optim_params_per_s / 1e6:.0f} M params/s (fp32)"
        + "".join(f", {v / 1e6:.0f} ({k})" for k, v in rates.optim_by_codec.items()),
        "host copy": f"{rates.copy_Bps / 1e9:.2f} GB/s",
        **({"compute per kind of work": ", ".join(f"{k} {v[0] / 1e9:.0f} GFLOP/s + {v[1] * 1e3:.1f} ms/call" if v[0] > 1 else f"{k} {v[1] * 1e3:.1f} ms/call"
                                                  for k, v in sorted(rates.compute_by_work.items()))} if rates.compute_by_work else {}),
        "between ranks": f"{rates.collective_Bps / 1e9:.2f} GB/s per rank" + (f" + {lat['collective'] * 1e3:.1f} ms/collective"
                                                                           if lat.get("collective") else ""),
    }
