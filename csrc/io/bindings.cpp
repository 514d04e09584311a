// Python bindings of the direct-I/O engine (the only file of csrc/io that sees Python).
// Addresses and sizes cross as integers; the GIL is released while submitting and waiting.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "crc32c.h"
#include "engine.h"

namespace py = pybind11;
using fuyou::io::Engine;
using fuyou::io::EngineConfig;
using fuyou::io::Op;
using fuyou::io::Outcome;
using fuyou::io::RequestPtr;

namespace {

Op parse_op(const std::string& op) {
  if (op == "read") return Op::Read;
  if (op == "write") return Op::Write;
  throw py::value_error("op must be 'read' or 'write', not '" + op + "'");
}

struct PyEngine {
  std::unique_ptr<Engine> engine;
  std::string kind;
  EngineConfig cfg;
  Engine& get() {
    if (!engine) throw std::runtime_error("I/O engine abandoned after fork; create a new one");
    return *engine;
  }
};

}  // namespace

PYBIND11_MODULE(_io, m) {
  m.doc() = "fuyou direct-I/O engine: io_uring or a pread/pwrite thread pool, O_DIRECT into caller buffers";
  m.def("uring_compiled", &fuyou::io::uring_compiled, "True when built with liburing");
  m.def(
      "crc32c",
      [](uintptr_t addr, size_t nbytes, uint32_t start) {
        py::gil_scoped_release nogil;
        return fuyou::io::crc32c(start, reinterpret_cast<const void*>(addr), nbytes);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("start") = 0u,
      "CRC-32C of nbytes at address addr, continuing start (as zlib.crc32 continues its value); releases the GIL");
  m.def(
      "crc32c_portable",
      [](py::bytes data, uint32_t start) {
        const std::string s = data;
        return fuyou::io::crc32c_portable(start, s.data(), s.size());
      },
      py::arg("data"), py::arg("start") = 0u, "the table-driven CRC-32C, for tests of the hardware one");
  m.def("crc32c_hardware", &fuyou::io::crc32c_hardware, "True when CRC-32C runs on the CPU's CRC32 instructions");

  py::class_<fuyou::io::Request, RequestPtr>(m, "Handle")
      .def("done", &fuyou::io::Request::done, "True once every chunk of the request has finished")
      .def(
          "wait",
          [](fuyou::io::Request& r) {
            Outcome o;
            {
              py::gil_scoped_release nogil;
              o = r.wait();
            }
            return std::make_tuple(o.bytes, o.err, o.err_offset, o.short_end);
          },
          "Wait; returns (bytes, errno, error_offset, short_end); errno 0 = success");

  py::class_<PyEngine>(m, "Engine")
      .def(py::init([](const std::string& kind, int queue_depth, size_t chunk_bytes) {
             if (chunk_bytes == 0 || chunk_bytes > (size_t(1) << 30) || chunk_bytes % 4096)
               throw py::value_error("chunk_bytes must be a positive multiple of 4096 up to 1 GiB");
             if (queue_depth < 1 || queue_depth > 4096) throw py::value_error("queue_depth must be in 1..4096");
             EngineConfig cfg;
             cfg.queue_depth = queue_depth;
             cfg.chunk_bytes = chunk_bytes;
             auto e = std::make_unique<PyEngine>();
             e->engine = fuyou::io::make_engine(kind, cfg);  // runtime_error: io_uring cannot run here
             e->kind = e->engine->name();
             e->cfg = cfg;
             return e;
           }),
           py::arg("kind") = "auto", py::arg("queue_depth") = 8, py::arg("chunk_bytes") = size_t(8) << 20)
      .def_property_readonly("name", [](const PyEngine& e) { return e.kind; })
      .def_property_readonly("fixed_transfers", [](PyEngine& e) { return e.get().fixed_transfers(); },
                             "transfers issued on registered buffers so far")
      .def_property_readonly("abandoned", [](const PyEngine& e) { return !e.engine; })
      .def_property_readonly("queue_depth", [](const PyEngine& e) { return e.cfg.queue_depth; })
      .def_property_readonly("chunk_bytes", [](const PyEngine& e) { return e.cfg.chunk_bytes; })
      .def(
          "submit",
          [](PyEngine& e, const std::string& op, int fd, uintptr_t ptr, size_t nbytes, int64_t offset) {
            Op o = parse_op(op);
            Engine& eng = e.get();
            py::gil_scoped_release nogil;
            return eng.submit(o, fd, reinterpret_cast<void*>(ptr), nbytes, offset);
          },
          py::arg("op"), py::arg("fd"), py::arg("ptr"), py::arg("nbytes"), py::arg("offset"),
          "Start reading/writing nbytes at address ptr from/to file offset; returns a Handle")
      .def(
          "set_fault",
          [](PyEngine& e, int64_t nth, int err, int64_t short_bytes) { e.get().set_fault(nth, err, short_bytes); },
          py::arg("nth"), py::arg("err") = 0, py::arg("short_bytes") = 0,
          "Test hook: the nth chunk transfer from now fails with errno err, or moves only short_bytes; nth=0 clears")
      .def(
          "abandon",
          [](PyEngine& e) { (void)e.engine.release(); },
          "After fork(): drop the inherited engine without running its destructor (its threads "
          "exist only in the parent); the engine is unusable afterwards")
      .def(
          "register_buffers",
          [](PyEngine& e, const std::vector<std::pair<uintptr_t, size_t>>& bufs) {
            std::vector<const void*> ptrs;
            std::vector<size_t> sizes;
            for (auto& b : bufs) {
              ptrs.push_back(reinterpret_cast<const void*>(b.first));
              sizes.push_back(b.second);
            }
            Engine& eng = e.get();
            py::gil_scoped_release nogil;
            return eng.register_buffers(ptrs.data(), sizes.data(), int(ptrs.size()));
          },
          py::arg("buffers"),
          "Register (address, size) buffers as io_uring fixed buffers (replaces earlier ones; [] clears). "
          "Call with no I/O in flight; returns False where unused or refused");
}
