// io_uring engine (liburing). One worker thread owns the ring: it moves queued chunks into the
// submission queue up to `queue_depth` in flight, waits for completions, and resubmits the rest of
// short transfers. Callers wake it through an eventfd whose read is always pending in the ring, so
// the worker sleeps in one io_uring_enter for either a new request or a finished chunk.
#include "engine.h"

#include <stdexcept>
#include <string>

#ifdef FUYOU_HAVE_URING
#include <errno.h>
#include <liburing.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <deque>
#include <thread>
#include <vector>
#endif

namespace fuyou {
namespace io {

#ifdef FUYOU_HAVE_URING
namespace {

constexpr uint64_t kWakeTag = 0;  // user_data of the eventfd read (chunks carry their pointer)

class UringEngine final : public Engine {
 public:
  explicit UringEngine(const EngineConfig& cfg) : Engine(cfg) {
    // One extra entry for the eventfd read; completions of a full queue always fit the CQ (2x).
    int rc = io_uring_queue_init(unsigned(cfg.queue_depth) + 1, &ring_, 0);
    if (rc < 0) throw std::runtime_error(std::string("io_uring_queue_init failed: ") + strerror(-rc));
    efd_ = eventfd(0, EFD_CLOEXEC);
    if (efd_ < 0) {
      int e = errno;
      io_uring_queue_exit(&ring_);
      throw std::runtime_error(std::string("eventfd failed: ") + strerror(e));
    }
    worker_ = std::thread([this] { loop(); });
  }

  ~UringEngine() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;  // the worker finishes every queued and in-flight chunk before it exits
    }
    wake();
    worker_.join();
    io_uring_queue_exit(&ring_);
    close(efd_);
  }

  const char* name() const override { return "uring"; }

  bool register_buffers(const void* const* ptrs, const size_t* sizes, int n) override {
    std::vector<iovec> iov(size_t(std::max(n, 0)));
    for (int i = 0; i < n; ++i) iov[size_t(i)] = iovec{const_cast<void*>(ptrs[i]), sizes[i]};
    std::unique_lock<std::mutex> lk(mu_);
    reg_request_ = std::move(iov);
    reg_pending_ = true;
    wake();
    reg_cv_.wait(lk, [this] { return !reg_pending_; });
    return reg_ok_;
  }

 protected:
  void enqueue(Chunk* const* chunks, int n) override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.insert(queue_.end(), chunks, chunks + n);
    }
    wake();
  }

 private:
  void wake() {
    uint64_t one = 1;
    ssize_t r;
    do r = write(efd_, &one, sizeof one);
    while (r < 0 && errno == EINTR);
  }

  void loop() {
    bool wake_armed = false;
    for (;;) {
      bool stop;
      {
        std::lock_guard<std::mutex> lk(mu_);
        ready_.insert(ready_.end(), queue_.begin(), queue_.end());
        queue_.clear();
        stop = stop_;
        if (reg_pending_) do_register();
      }
      if (!wake_armed) wake_armed = arm_wake();
      fill();
      if (stop && inflight_ == 0 && ready_.empty()) return;
      int rc = io_uring_submit_and_wait(&ring_, 1);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) fail_all(-rc);
      reap(&wake_armed);
    }
  }

  bool arm_wake() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return false;
    io_uring_prep_read(sqe, efd_, &wake_buf_, sizeof wake_buf_, 0);
    io_uring_sqe_set_data64(sqe, kWakeTag);
    return true;
  }

  // Move ready chunks into the submission queue while fewer than queue_depth are in flight.
  void fill() {
    while (inflight_ < cfg_.queue_depth && !ready_.empty()) {
      Chunk* c = ready_.front();
      int64_t want = transfer_bytes(c);
      if (want < 0) {  // injected fault: fails without I/O
        ready_.pop_front();
        if (advance(c, want)) ready_.push_front(c);
        continue;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (!sqe) break;
      ready_.pop_front();
      char* p = c->buf + c->done;
      const uint64_t off = uint64_t(c->offset) + c->done;
      const int idx = fixed_index(p, size_t(want));
      if (idx >= 0) fixed_transfers_.fetch_add(1, std::memory_order_relaxed);
      if (c->op == Op::Read) {
        if (idx >= 0)
          io_uring_prep_read_fixed(sqe, c->fd, p, unsigned(want), off, idx);
        else
          io_uring_prep_read(sqe, c->fd, p, unsigned(want), off);
      } else {
        if (idx >= 0)
          io_uring_prep_write_fixed(sqe, c->fd, p, unsigned(want), off, idx);
        else
          io_uring_prep_write(sqe, c->fd, p, unsigned(want), off);
      }
      io_uring_sqe_set_data(sqe, c);
      ++inflight_;
    }
  }

  void reap(bool* wake_armed) {
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      if (cqe->user_data == kWakeTag) {
        *wake_armed = false;  // re-armed at the top of the loop
        continue;
      }
      auto* c = reinterpret_cast<Chunk*>(cqe->user_data);
      --inflight_;
      if (advance(c, cqe->res)) ready_.push_front(c);  // rest of a short transfer goes first
    }
    io_uring_cq_advance(&ring_, seen);
  }

  // The ring itself failed (should not happen): fail what waits, so no caller hangs.
  void fail_all(int err) {
    while (!ready_.empty()) {
      Chunk* c = ready_.front();
      ready_.pop_front();
      advance(c, -(err == EAGAIN || err == EINTR ? EIO : err));
    }
  }

  int fixed_index(const char* p, size_t n) const {
    for (size_t i = 0; i < fixed_.size(); ++i) {
      const char* b = static_cast<const char*>(fixed_[i].iov_base);
      if (p >= b && p + n <= b + fixed_[i].iov_len) return int(i);
    }
    return -1;
  }

  // Runs on the worker with mu_ held, so no chunk is being prepared meanwhile.
  void do_register() {
    reg_ok_ = false;
    if (inflight_ == 0 && ready_.empty()) {
      if (!fixed_.empty()) io_uring_unregister_buffers(&ring_);
      fixed_.clear();
      if (reg_request_.empty()) {
        reg_ok_ = true;
      } else if (io_uring_register_buffers(&ring_, reg_request_.data(), unsigned(reg_request_.size())) == 0) {
        fixed_ = reg_request_;
        reg_ok_ = true;
      }
    }
    reg_pending_ = false;
    reg_cv_.notify_all();
  }

  io_uring ring_{};
  int efd_ = -1;
  uint64_t wake_buf_ = 0;
  std::thread worker_;
  std::mutex mu_;
  std::deque<Chunk*> queue_;  // filled by callers (mu_)
  bool stop_ = false;         // (mu_)
  std::deque<Chunk*> ready_;  // worker only
  int inflight_ = 0;          // worker only
  std::vector<iovec> fixed_;  // worker only (registered buffers)
  std::vector<iovec> reg_request_;
  bool reg_pending_ = false, reg_ok_ = false;
  std::condition_variable reg_cv_;
};

}  // namespace

std::unique_ptr<Engine> make_uring_engine(const EngineConfig& cfg) {
  return std::unique_ptr<Engine>(new UringEngine(cfg));
}
bool uring_compiled() { return true; }

#else  // !FUYOU_HAVE_URING

std::unique_ptr<Engine> make_uring_engine(const EngineConfig&) {
  throw std::runtime_error("fuyou._io was built without liburing (install liburing-dev and rebuild)");
}
bool uring_compiled() { return false; }

#endif

}  // namespace io
}  // namespace fuyou
