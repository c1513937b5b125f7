// Token ownership and paged storage of the sharded KV cache (kv_session.hpp).
#include <algorithm>
#include <memory>

#include "ringattn/error.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn {

const char* cache_layout_name(CacheLayout layout) {
  return layout == CacheLayout::kContiguous ? "contiguous" : "round-robin";
}

CacheLayout parse_cache_layout(std::string_view name) {
  if (name == "contiguous") return CacheLayout::kContiguous;
  if (name == "round-robin") return CacheLayout::kRoundRobin;
  RA_THROW(InvalidArgument,
           "cache layout: unknown layout '" << name << "' (expected contiguous or round-robin)");
}

ShardedKvCache::ShardedKvCache(const SessionConfig& config, int ranks, int rank)
    : config_(config), ranks_(ranks), rank_(rank) {
  const auto b = static_cast<std::size_t>(config.b);
  length_.assign(b, 0);
  prompt_.assign(b, 0);
  prompt_pos_.assign(b, {});
  // Upper bound of any rank's keys of one sequence: a prefill shard holds at most
  // ceil(S0 / P) + 1 prompt tokens (zigzag: two chunks), the appended tokens at most
  // ceil((capacity - S0) / P) rounded up to whole blocks.
  const std::int64_t ps = config.page_size;
  const std::int64_t bound = (config.capacity + ranks - 1) / ranks + 2 * ps + 2;
  pages_per_seq_ = static_cast<int>((bound + ps - 1) / ps);
  const std::size_t pages = b * static_cast<std::size_t>(pages_per_seq_);
  const std::size_t es = dtype_size(config.dtype);
  const auto row_k = static_cast<std::size_t>(config.h_k) * static_cast<std::size_t>(config.d);
  const auto row_v = static_cast<std::size_t>(config.h_k) * static_cast<std::size_t>(config.d_v);
  k_.resize(pages * static_cast<std::size_t>(ps) * row_k * es);
  v_.resize(pages * static_cast<std::size_t>(ps) * row_v * es);
  pages_.resize(pages);
  for (std::size_t i = 0; i < pages; ++i) pages_[i] = static_cast<std::int32_t>(i);
}

std::int64_t ShardedKvCache::count(int s, std::int64_t limit, int rank) const {
  const std::int64_t s0 = prompt_length(s);
  std::int64_t n = 0;
  // Prompt part: the prefill layout's shard.
  const std::int64_t pl = std::min(limit, s0);
  if (pl >= s0) {
    n += shard_length(config_.prefill_layout, s0, ranks_, rank);
  } else if (pl > 0) {
    if (rank == rank_) {
      const auto& pos = prompt_pos_[static_cast<std::size_t>(s)];
      n += std::lower_bound(pos.begin(), pos.end(), pl) - pos.begin();
    } else {
      const auto pos = shard_positions(config_.prefill_layout, s0, ranks_, rank);
      n += std::lower_bound(pos.begin(), pos.end(), pl) - pos.begin();
    }
  }
  // Appended part.
  const std::int64_t a = std::max<std::int64_t>(0, limit - s0);
  if (a == 0) return n;
  if (config_.layout == CacheLayout::kRoundRobin) {
    const std::int64_t ps = config_.page_size;
    const std::int64_t full = a / ps, rem = a % ps;
    n += (full / ranks_ + (rank < full % ranks_ ? 1 : 0)) * ps;
    if (full % ranks_ == rank) n += rem;
  } else {
    const std::int64_t per = (config_.capacity - s0 + ranks_ - 1) / ranks_;
    n += std::clamp<std::int64_t>(a - rank * per, 0, per);
  }
  return n;
}

int ShardedKvCache::owner(int s, std::int64_t pos) const {
  const std::int64_t s0 = prompt_length(s);
  if (pos < s0) {
    for (int r = 0; r < ranks_; ++r)
      if (count(s, pos + 1, r) > count(s, pos, r)) return r;
  }
  const std::int64_t a = pos - s0;
  if (config_.layout == CacheLayout::kRoundRobin)
    return static_cast<int>((a / config_.page_size) % ranks_);
  const std::int64_t per = (config_.capacity - s0 + ranks_ - 1) / ranks_;
  return static_cast<int>(std::min<std::int64_t>(a / std::max<std::int64_t>(per, 1), ranks_ - 1));
}

std::byte* ShardedKvCache::k_row(int s, std::int64_t slot) {
  const std::int64_t row = std::int64_t{s} * local_capacity() + slot;
  return k_.data() +
         static_cast<std::size_t>(row * config_.h_k * config_.d) * dtype_size(config_.dtype);
}

std::byte* ShardedKvCache::v_row(int s, std::int64_t slot) {
  const std::int64_t row = std::int64_t{s} * local_capacity() + slot;
  return v_.data() +
         static_cast<std::size_t>(row * config_.h_k * config_.d_v) * dtype_size(config_.dtype);
}

void ShardedKvCache::check_room(int s, std::int64_t n) const {
  RA_CHECK_ARG(s >= 0 && s < config_.b,
               "session: sequence " << s << " outside [0, " << config_.b << ")");
  RA_CHECK_ARG(length(s) + n <= config_.capacity,
               "session: sequence " << s << " would hold " << length(s) + n << " tokens ("
                                    << length(s) << " cached + " << n
                                    << " new), more than the capacity " << config_.capacity);
}

void ShardedKvCache::begin(int s, std::int64_t len) {
  RA_CHECK_ARG(length(s) == 0, "session: sequence " << s << " already holds " << length(s)
                                                    << " tokens; prefill starts a session");
  check_room(s, len);
  const auto i = static_cast<std::size_t>(s);
  prompt_[i] = len;
  length_[i] = len;
  prompt_pos_[i] = shard_positions(config_.prefill_layout, len, ranks_, rank_);
}

void ShardedKvCache::grow(int s, std::int64_t n) {
  check_room(s, n);
  length_[static_cast<std::size_t>(s)] += n;
  RA_CHECK(local_count(s, length(s)) <= local_capacity(), ResourceError,
           "session: rank " << rank_ << " holds " << local_count(s, length(s))
                            << " keys of sequence " << s << ", more than its " << local_capacity()
                            << " slots");
}

}  // namespace ringattn
