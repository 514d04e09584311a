"""Every Triton kernel lowers to sm_90 machine code (compiled here, without a GPU)."""
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas to compile with")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("compile_sm90.py"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok   ") == 8, proc.stdout
