// Direct-I/O engine: O_DIRECT reads and writes of (fd, address, size, offset) into caller-owned
// aligned buffers. Two engines behind one interface: io_uring (liburing; built when
// FUYOU_HAVE_URING is defined) and a thread pool of pread/pwrite (always built).
//
// A request is split into chunks of `chunk_bytes`, kept `queue_depth` in flight together. Its
// completion is a shared Request handle: wait() blocks until every chunk has finished (so no chunk
// still touches the caller's buffer), then reports bytes done or the first error by file offset.
// Raw pointers and sizes only: this file never sees Python.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace fuyou {
namespace io {

enum class Op : int { Read = 0, Write = 1 };

struct EngineConfig {
  // In-flight chunks: io_uring submission depth, or the number of pread/pwrite threads.
  int queue_depth = 8;
  // Chunk size of a request (a multiple of 4096 for O_DIRECT files).
  size_t chunk_bytes = size_t(8) << 20;
};

// Outcome of a finished request. err == 0: all `bytes` done. Otherwise `err` is the errno of the
// failing chunk with the lowest file offset, `err_offset` the file offset where it failed, and
// `short_end` > 0 when the failure is a short transfer (the file ends before `short_end`).
struct Outcome {
  int64_t bytes = 0;
  int err = 0;
  int64_t err_offset = -1;
  int64_t short_end = 0;
};

// Completion state of one submitted request (all its chunks).
class Request {
 public:
  explicit Request(int chunks) : pending_(chunks) {}
  bool done() const { return pending_.load(std::memory_order_acquire) == 0; }
  Outcome wait();
  // Called once per chunk. n: bytes the chunk moved; err != 0 for a failed chunk.
  void finish_chunk(int64_t n, int err, int64_t err_offset, int64_t short_end);

 private:
  std::atomic<int> pending_;
  std::mutex mu_;
  std::condition_variable cv_;
  Outcome out_;
};

using RequestPtr = std::shared_ptr<Request>;

// One piece of a request in flight; `done` grows on short transfers until `len`.
struct Chunk {
  RequestPtr req;
  Op op;
  int fd;
  char* buf;
  size_t len;
  int64_t offset;
  size_t done = 0;
  int64_t end() const { return offset + int64_t(len); }
};

// Test hook: the `nth` chunk started after set_fault (1-based) fails with errno `err`, or, with
// `short_bytes` > 0, transfers only that many bytes (the engine must finish the rest).
struct Fault {
  std::atomic<int64_t> countdown{0};
  std::atomic<int> err{0};
  std::atomic<int64_t> short_bytes{0};
  void set(int64_t nth, int e, int64_t short_n) {
    err.store(e);
    short_bytes.store(short_n);
    countdown.store(nth);
  }
  // True when this chunk is the faulty one (then err/short_bytes say how).
  bool fire() {
    if (countdown.load(std::memory_order_relaxed) <= 0) return false;
    return countdown.fetch_sub(1) == 1;
  }
};

class Engine {
 public:
  explicit Engine(const EngineConfig& cfg) : cfg_(cfg) {}
  virtual ~Engine() = default;
  virtual const char* name() const = 0;
  // Start a request; never blocks on I/O. nbytes == 0 gives a finished request.
  RequestPtr submit(Op op, int fd, void* buf, size_t nbytes, int64_t offset);
  const EngineConfig& config() const { return cfg_; }
  void set_fault(int64_t nth, int err, int64_t short_bytes) { fault_.set(nth, err, short_bytes); }
  // Optional: pin buffers once (io_uring fixed buffers); chunks inside one skip per-I/O pinning.
  // Returns false where the engine does not use them. Call with no I/O in flight.
  // Transfers issued on registered (fixed) buffers so far: shows the registration is in use.
  int64_t fixed_transfers() const { return fixed_transfers_.load(std::memory_order_relaxed); }
  virtual bool register_buffers(const void* const* ptrs, const size_t* sizes, int n) {
    (void)ptrs, (void)sizes, (void)n;
    return false;
  }

 protected:
  virtual void enqueue(Chunk* const* chunks, int n) = 0;
  // Account one transfer of chunk `c` (res: bytes moved, or -errno). Returns true when the chunk
  // needs another transfer (short transfer, EAGAIN/EINTR); otherwise reports it and frees it.
  bool advance(Chunk* c, int64_t res);
  // The fault hook for the next transfer of `c`: returns -errno to fail it without I/O, else the
  // number of bytes to ask for (the rest of the chunk, or fewer for an injected short transfer).
  int64_t transfer_bytes(Chunk* c);
  EngineConfig cfg_;
  Fault fault_;
  std::atomic<int64_t> fixed_transfers_{0};
};

// Thread pool of blocking pread/pwrite: always available.
std::unique_ptr<Engine> make_thread_engine(const EngineConfig& cfg);
// io_uring engine; throws std::runtime_error (with the reason) when io_uring cannot run here.
std::unique_ptr<Engine> make_uring_engine(const EngineConfig& cfg);
// "uring", "threads", or "auto" (io_uring, else threads).
std::unique_ptr<Engine> make_engine(const std::string& kind, const EngineConfig& cfg);
bool uring_compiled();

}  // namespace io
}  // namespace fuyou
