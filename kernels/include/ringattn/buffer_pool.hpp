// Large buffers kept between calls. A fresh multi-MiB buffer costs a page fault and a
// kernel page clear per 4 KiB on first touch: measured at about 7 % of a 2-rank ring
// run, whose every step calls the kernel again. Used by the CPU backend (packed K/V
// tiles, split-KV partials; one pool per engine) and by comm::RingExchange (the K/V
// blocks in flight; one process-wide pool). A user takes a buffer into a Lease and the
// Lease gives it back when it ends, so concurrent users never share memory. At most
// `keep` free buffers are kept, the largest ones; all are freed with the pool.
#pragma once

#include <cstddef>
#include <mutex>
#include <vector>

namespace ringattn {

class BufferPool {
 public:
  class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();
    void* data() const { return data_; }
    std::size_t capacity() const { return capacity_; }

   private:
    friend class BufferPool;
    BufferPool* pool_ = nullptr;  // nullptr: owned by the lease (no pool)
    void* data_ = nullptr;
    std::size_t capacity_ = 0;
  };

  explicit BufferPool(std::size_t keep) : keep_(keep) {}
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  ~BufferPool();

  // A 64-byte aligned buffer of at least `bytes` bytes (contents undefined) into
  // `lease`, which must be empty: the smallest free one that fits, else a new one.
  // `pool` may be nullptr (plain allocation, freed by the lease). Returns false, with
  // the lease left empty, when the memory cannot be allocated: the caller reports it.
  static bool take(BufferPool* pool, std::size_t bytes, Lease& lease);

 private:
  struct Free {
    void* data;
    std::size_t capacity;
  };
  void give(void* data, std::size_t capacity);
  std::size_t keep_;
  std::mutex mu_;
  std::vector<Free> free_;
};

}  // namespace ringattn
