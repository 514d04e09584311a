// Python binding of the fused AdamW: buffer addresses arrive as ints (the caller keeps the
// tensors alive and checks dtypes/contiguity); the GIL is released for the whole update.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "adam.h"

namespace py = pybind11;
using namespace fuyou_adam;

namespace {

template <typename T>
T* ptr(const py::handle& h) {
  return reinterpret_cast<T*>(h.cast<uintptr_t>());
}

MomentBuf moment_from(const py::tuple& t) {
  if (t.size() != 4) throw std::invalid_argument("moment must be (codec, values, absmax, k16)");
  MomentBuf b;
  b.codec = t[0].cast<int>();
  if (b.codec < kStateFp32 || b.codec > kStateLog8) throw std::invalid_argument("unknown moment codec id");
  b.values = ptr<void>(t[1]);
  b.scale = ptr<float>(t[2]);
  b.k16 = ptr<uint8_t>(t[3]);
  return b;
}

void adamw(int64_t numel, uintptr_t grad, py::tuple master, py::tuple m, py::tuple v, py::tuple weights,
           py::tuple hyper, py::tuple tables, int threads, int isa, int phase, uintptr_t root, int sqrt_kind,
           uintptr_t torch_sqrt, bool bf16_insn) {
  AdamArgs a;
  a.numel = numel;
  if (phase < kFull || phase > kApply) throw std::invalid_argument("adamw: phase must be 0 (full), 1 (moments) or 2 (apply)");
  a.phase = phase;
  a.root = reinterpret_cast<const float*>(root);
  if (phase == kApply && root == 0) throw std::invalid_argument("adamw: the apply phase needs root = sqrt(v)");
  a.grad = reinterpret_cast<const float*>(grad);
  if (master.size() != 3 || weights.size() != 2 || hyper.size() != 8 || tables.size() != 5)
    throw std::invalid_argument("adamw: master (codec, hi, lo), weights (codec, ptr), 8 hyper values, 5 tables");
  a.master_codec = master[0].cast<int>();
  a.master_hi = ptr<void>(master[1]);
  a.master_lo = ptr<void>(master[2]);
  a.m = moment_from(m);
  a.v = moment_from(v);
  a.weights_codec = weights[0].cast<int>();
  a.weights = ptr<void>(weights[1]);
  a.h.decay = float(hyper[0].cast<double>());
  a.h.lerp_w = float(hyper[1].cast<double>());
  a.h.beta2 = float(hyper[2].cast<double>());
  a.h.one_minus_beta2 = float(hyper[3].cast<double>());
  a.h.bc2_sqrt = float(hyper[4].cast<double>());
  a.h.eps = float(hyper[5].cast<double>());
  a.h.neg_step_size = float(hyper[6].cast<double>());
  const double gs = hyper[7].cast<double>();
  a.h.grad_scale = float(gs);
  a.h.scale_grad = gs != 1.0;
  a.t.fp8_root = ptr<const float>(tables[0]);
  a.t.de8_signed_map = ptr<const float>(tables[1]);
  a.t.de8_unsigned_map = ptr<const float>(tables[2]);
  a.t.de8_signed_bucket = ptr<const uint32_t>(tables[3]);
  a.t.de8_unsigned_bucket = ptr<const uint32_t>(tables[4]);
  a.sqrt_kind = sqrt_kind;
  a.bf16_insn = bf16_insn;
  a.torch_sqrt = reinterpret_cast<VmlSqrtFn>(torch_sqrt);
  const bool fp32 = a.master_codec == kMasterFp32 && a.m.codec == kStateFp32 && a.v.codec == kStateFp32;
  if (phase != kFull && !fp32) throw std::invalid_argument("adamw: the moments/apply phases need fp32 master and moments");
  if (sqrt_kind < kSqrtIeee || sqrt_kind > kSqrtVmlEx) throw std::invalid_argument("adamw: sqrt_kind must be 0, 1 or 2");
  if (sqrt_kind != kSqrtIeee && (phase != kFull || !fp32))
    throw std::invalid_argument("adamw: torch's sqrt is for the whole update of fp32 master and moments");
  if (sqrt_kind == kSqrtVmlCall && torch_sqrt == 0) throw std::invalid_argument("adamw: sqrt_kind 1 needs the torch_sqrt function");
  if (numel > (int64_t(1) << 40)) throw std::invalid_argument("adamw: numel out of range");
  py::gil_scoped_release release;
  fused_adamw(a, threads, isa);
}

}  // namespace

PYBIND11_MODULE(_adam, mod) {
  mod.doc() = "fuyou fused CPU AdamW over compressed optimizer state";
  mod.def("adamw", &adamw, py::arg("numel"), py::arg("grad"), py::arg("master"), py::arg("m"), py::arg("v"),
          py::arg("weights"), py::arg("hyper"), py::arg("tables"), py::arg("threads"), py::arg("isa") = -1,
          py::arg("phase") = int(kFull), py::arg("root") = uintptr_t(0), py::arg("sqrt_kind") = int(kSqrtIeee),
          py::arg("torch_sqrt") = uintptr_t(0), py::arg("bf16_insn") = true);
  mod.def(
      "fp8_tiles_decode",
      [](uintptr_t codes, uintptr_t scales, int64_t n, int64_t k, uintptr_t table, uintptr_t out) {
        if (n < 0 || k < 0 || n * k > (int64_t(1) << 40)) throw std::invalid_argument("fp8_tiles_decode: shape out of range");
        py::gil_scoped_release release;
        fp8_tiles_decode(reinterpret_cast<const uint8_t*>(codes), reinterpret_cast<const float*>(scales), n, k,
                         reinterpret_cast<const float*>(table), reinterpret_cast<float*>(out));
      },
      py::arg("codes"), py::arg("scales"), py::arg("n"), py::arg("k"), py::arg("table"), py::arg("out"),
      "fp32 values of fp8 weight tiles [n, k]: table[code] * the tile's scale (addresses as ints; GIL released)");
  mod.def("has_avx512bf16", [] { __builtin_cpu_init(); return bool(__builtin_cpu_supports("avx512bf16")); },
          "whether this CPU has AVX512-BF16 (the AVX-512 build then converts to bf16 with it)");
  mod.def(
      "vml_ex_sqrt",
      [](uintptr_t x, uintptr_t y, int64_t n, int isa) {
        py::gil_scoped_release release;
        vml_ex_sqrt(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y), n, isa);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("isa") = -1,
      "vmsSqrt's generic x86 path recomputed (adam.h kSqrtVmlEx) on n fp32 values");
  mod.def("best_isa", &best_isa, "the best build this CPU runs: 0 portable, 1 AVX2/FMA, 2 AVX-512");
}
