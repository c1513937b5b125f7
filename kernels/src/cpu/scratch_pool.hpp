// Large per-call buffers of the CPU kernels (packed K/V tiles, split-KV partials)
// kept between calls by the backend that owns the pool. A fresh multi-MiB buffer
// costs a page fault and a kernel page clear per 4 KiB on first touch: measured at
// about 7 % of a 2-rank ring run, whose every step calls the kernel again. A call
// takes a buffer (Lease) and gives it back when it ends, so concurrent calls on one
// engine never share memory. At most kKeep free buffers are kept (freed with the pool).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace ringattn::detail::cpu {

class ScratchPool {
 public:
  static constexpr std::size_t kKeep = 4;

  class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();
    void* data() const { return data_; }

   private:
    friend class ScratchPool;
    ScratchPool* pool_ = nullptr;  // nullptr: owned by the lease (no pool)
    void* data_ = nullptr;
    std::size_t capacity_ = 0;
  };

  ScratchPool() = default;
  ScratchPool(const ScratchPool&) = delete;
  ScratchPool& operator=(const ScratchPool&) = delete;
  ~ScratchPool();

  // A 64-byte aligned buffer of at least `bytes` bytes (contents undefined) into
  // `lease`, which must be empty; `pool` may be nullptr (plain allocation).
  // Throws ResourceError when the memory cannot be allocated.
  static void take(ScratchPool* pool, std::size_t bytes, Lease& lease);

 private:
  struct Free {
    void* data;
    std::size_t capacity;
  };
  void give(void* data, std::size_t capacity);
  std::mutex mu_;
  std::vector<Free> free_;  // newest first
};

}  // namespace ringattn::detail::cpu
