#include "ringattn/buffer_pool.hpp"

#include <algorithm>
#include <cstdlib>

namespace ringattn {

BufferPool::Lease::~Lease() {
  if (!data_) return;
  if (pool_) {
    pool_->give(data_, capacity_);
  } else {
    std::free(data_);
  }
}

BufferPool::~BufferPool() {
  for (const Free& f : free_) std::free(f.data);
}

bool BufferPool::take(BufferPool* pool, std::size_t bytes, Lease& lease) {
  const std::size_t want = (std::max<std::size_t>(bytes, 1) + 63) / 64 * 64;
  lease.pool_ = pool;
  if (pool) {
    // Smallest free buffer that fits, so a small call leaves the big ones alone.
    std::lock_guard<std::mutex> lock(pool->mu_);
    std::size_t best = pool->free_.size();
    for (std::size_t i = 0; i < pool->free_.size(); ++i)
      if (pool->free_[i].capacity >= want &&
          (best == pool->free_.size() || pool->free_[i].capacity < pool->free_[best].capacity))
        best = i;
    if (best < pool->free_.size()) {
      lease.data_ = pool->free_[best].data;
      lease.capacity_ = pool->free_[best].capacity;
      pool->free_.erase(pool->free_.begin() + static_cast<std::ptrdiff_t>(best));
      return true;
    }
  }
  lease.data_ = std::aligned_alloc(64, want);
  lease.capacity_ = lease.data_ ? want : 0;
  return lease.data_ != nullptr;
}

void BufferPool::give(void* data, std::size_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.insert(free_.begin(), Free{data, capacity});
  if (free_.size() > keep_) {
    // Drop the smallest: the large buffers are the ones worth keeping.
    std::size_t smallest = 0;
    for (std::size_t i = 1; i < free_.size(); ++i)
      if (free_[i].capacity < free_[smallest].capacity) smallest = i;
    std::free(free_[smallest].data);
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(smallest));
  }
}

}  // namespace ringattn
