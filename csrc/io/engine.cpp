// Request bookkeeping, chunking, and the thread-pool pread/pwrite engine.
#include "engine.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fuyou {
namespace io {

Outcome Request::wait() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
  return out_;
}

void Request::finish_chunk(int64_t n, int err, int64_t err_offset, int64_t short_end) {
  std::lock_guard<std::mutex> lk(mu_);
  out_.bytes += n;
  // Keep the error at the lowest file offset: chunks finish in any order, the report must not.
  if (err != 0 && (out_.err == 0 || err_offset < out_.err_offset)) {
    out_.err = err;
    out_.err_offset = err_offset;
    out_.short_end = short_end;
  }
  if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) cv_.notify_all();
}

RequestPtr Engine::submit(Op op, int fd, void* buf, size_t nbytes, int64_t offset) {
  const size_t chunk = std::max<size_t>(cfg_.chunk_bytes, 1);
  const int n = int((nbytes + chunk - 1) / chunk);
  auto req = std::make_shared<Request>(n);
  if (n == 0) return req;
  std::vector<Chunk*> chunks;
  chunks.reserve(n);
  for (size_t start = 0; start < nbytes; start += chunk) {
    auto* c = new Chunk{req, op, fd, static_cast<char*>(buf) + start, std::min(chunk, nbytes - start),
                        offset + int64_t(start)};
    chunks.push_back(c);
  }
  enqueue(chunks.data(), n);
  return req;
}

int64_t Engine::transfer_bytes(Chunk* c) {
  int64_t want = int64_t(c->len - c->done);
  if (fault_.fire()) {
    int e = fault_.err.load();
    if (e != 0) return -e;
    int64_t s = fault_.short_bytes.load();
    if (s > 0 && s < want) want = s;
  }
  return want;
}

bool Engine::advance(Chunk* c, int64_t res) {
  const int64_t at = c->offset + int64_t(c->done);
  if (res == -EAGAIN || res == -EINTR) return true;  // transient: ask again
  if (res < 0) {
    c->req->finish_chunk(int64_t(c->done), int(-res), at, 0);
  } else if (res == 0) {
    // A read of 0 bytes before the end of the chunk: the file is shorter than the request.
    c->req->finish_chunk(int64_t(c->done), EIO, at, c->end());
  } else {
    c->done += size_t(res);
    if (c->done < c->len) return true;  // short transfer: the rest goes out again
    c->req->finish_chunk(int64_t(c->done), 0, 0, 0);
  }
  delete c;
  return false;
}

namespace {

// Each worker takes a chunk and runs it to the end with blocking pread/pwrite; `queue_depth`
// workers = `queue_depth` chunks in flight.
class ThreadEngine final : public Engine {
 public:
  explicit ThreadEngine(const EngineConfig& cfg) : Engine(cfg) {
    const int n = std::max(1, cfg.queue_depth);
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~ThreadEngine() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;  // workers drain the queue first: no chunk may outlive its engine unfinished
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  const char* name() const override { return "threads"; }

 protected:
  void enqueue(Chunk* const* chunks, int n) override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.insert(queue_.end(), chunks, chunks + n);
    }
    if (n == 1)
      cv_.notify_one();
    else
      cv_.notify_all();
  }

 private:
  void loop() {
    for (;;) {
      Chunk* c;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        c = queue_.front();
        queue_.pop_front();
      }
      run(c);
    }
  }

  void run(Chunk* c) {
    for (;;) {
      int64_t want = transfer_bytes(c);
      int64_t res = want;
      if (want > 0) {
        char* p = c->buf + c->done;
        off_t off = off_t(c->offset + int64_t(c->done));
        ssize_t r = c->op == Op::Read ? ::pread(c->fd, p, size_t(want), off) : ::pwrite(c->fd, p, size_t(want), off);
        res = r < 0 ? -int64_t(errno) : int64_t(r);
      }
      if (!advance(c, res)) return;
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk*> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Engine> make_thread_engine(const EngineConfig& cfg) {
  return std::unique_ptr<Engine>(new ThreadEngine(cfg));
}

std::unique_ptr<Engine> make_engine(const std::string& kind, const EngineConfig& cfg) {
  if (cfg.queue_depth < 1 || cfg.queue_depth > 4096)
    throw std::invalid_argument("queue_depth must be in 1..4096");
  if (cfg.chunk_bytes == 0) throw std::invalid_argument("chunk_bytes must be positive");
  if (kind == "threads") return make_thread_engine(cfg);
  if (kind == "uring") return make_uring_engine(cfg);
  if (kind == "auto") {
    try {
      return make_uring_engine(cfg);
    } catch (const std::runtime_error&) {
      return make_thread_engine(cfg);
    }
  }
  throw std::invalid_argument("engine kind must be 'uring', 'threads' or 'auto', not '" + kind + "'");
}

}  // namespace io
}  // namespace fuyou
