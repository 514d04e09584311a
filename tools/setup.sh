#!/usr/bin/env bash
# Sets up fuyou on a fresh Debian/Ubuntu machine: system packages, a venv in .venv, torch, the
# project (builds csrc/), and the test tools. Safe to run again.
#   bash tools/setup.sh            # then: .venv/bin/fuyou finetune
set -euo pipefail
cd "$(dirname "$0")/.."

# liburing-dev: the io_uring path of the C++ I/O engine; libaio-dev: DeepSpeed's aio op (benchmark
# peer); fio: the disk limit the I/O benchmark compares against. All optional: without them fuyou
# builds the thread-pool engine and the benchmarks skip what they cannot run.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq liburing-dev libaio-dev fio >/dev/null 2>&1 || echo "setup: could not install liburing-dev/libaio-dev/fio; continuing without them" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch: on a machine without an NVIDIA driver take the CPU build (2.13.0 lies on local disk on the
# dev/CI machines); with a driver, the default CUDA build from PyPI.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch>=2.4"
  else
    .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  fi
fi
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import fuyou, torch; print('fuyou', fuyou.__version__, 'torch', torch.__version__)"
