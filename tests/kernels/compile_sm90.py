"""Compile every Triton kernel for sm_90 without a GPU (Triton's bundled ptxas; no libcuda).

Run as a script in a process without TRITON_INTERPRET (test_compile.py does that): the interpreter
never lowers a kernel, so type or lowering errors would otherwise only show on a GPU machine.
Prints one line per variant and exits 1 if any fails.
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fuyou.kernels import act_quant, fp4_quant, fp8_gemm, hadamard, weight_quant  # noqa: E402


def _jit_fn(kernel):
    """The JITFunction under the autotune/heuristics wrappers."""
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _signature(kernel, pointers: dict, consts: dict) -> dict:
    """Pointers as given, constexprs from `consts`, every other argument an i32."""
    names = _jit_fn(kernel).arg_names
    return {n: pointers.get(n, "constexpr" if n in consts else "i32") for n in names}


def _variants():
    yield "act_quant", act_quant._act_quant_kernel, \
        {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, {"POW2": True, "GROUP": 128, "BLOCK_M": 32}
    yield "weight_quant", weight_quant._weight_quant_kernel, \
        {"w_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, {"POW2": False, "TILE": 128}
    gemm_ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "sa_ptr": "*fp32", "sb_ptr": "*fp32"}
    for b_group, imprecise, even_k in ((128, 128, True), (1, 0, False)):
        yield f"fp8_gemm b_group={b_group} imprecise={imprecise} even_k={even_k}", fp8_gemm._fp8_gemm_kernel, gemm_ptrs, \
            {"B_GROUP": b_group, "BLOCK_K": 128, "IMPRECISE_ACC": imprecise, "BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8,
             "EVEN_K": even_k}
    yield "hadamard", hadamard._hadamard_kernel, \
        {"x_ptr": "*bf16", "h_ptr": "*fp32", "sign_ptr": "*fp32", "y_ptr": "*fp32"}, {"B": 16, "BLOCK_R": 64}
    fp4_ptrs = {"x_ptr": "*bf16", "y_ptr": "*fp32", "mask_ptr": "*i1", "noise_ptr": "*fp32", "ts_ptr": "*fp32"}
    for group, rows, rule, stochastic, noise in ((32, 1, 0, False, False), (32, 1, 1, True, False), (16, 16, 2, True, True)):
        yield f"fp4_quant rule={rule} rows={rows}", fp4_quant._fp4_quant_kernel, fp4_ptrs, \
            {"GROUP": group, "BLOCK_ROWS": rows, "RULE": rule, "STOCHASTIC": stochastic, "HAS_NOISE": noise,
             "HAS_MASK": rule == 0, "TILE_R": 64}


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for name, kernel, pointers, consts in _variants():
        try:
            triton_compile(ASTSource(_jit_fn(kernel), _signature(kernel, pointers, consts), consts), target=target)
            print(f"ok   {name}")
        except Exception as exc:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
