// The ring's mask algebra (block_mask.hpp, classify_block in ring_attention.hpp).
#include "ring/block_mask.hpp"

#include <algorithm>
#include <climits>

namespace ringattn {

namespace detail {

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return -floor_div(-a, b); }

namespace {

// Local key range [lo, hi] of chunk `ck` visible from a query at position qp
// (lo > hi: none), for the global window (wl, wr), -1 = unbounded.
void visible_range(std::int64_t qp, const Chunk& ck, int wl, int wr, std::int64_t* lo,
                   std::int64_t* hi) {
  *hi = ck.count - 1;
  *lo = 0;
  if (wr >= 0) *hi = std::min(*hi, floor_div(qp + wr - ck.first, ck.stride));
  if (wl >= 0) *lo = std::max(*lo, ceil_div(qp - wl - ck.first, ck.stride));
}
}  // namespace

bool combine_mask(std::int64_t q0, std::int64_t qs, std::int64_t nq, const Chunk* chunks, int n,
                  int wl, int wr, BlockMask* out) {
  if (n == 1) {
    *out = classify_block(q0, nq, chunks[0].first, chunks[0].count, qs, wl, wr);
    return chunks[0].stride == qs;
  }
  std::int64_t total = 0;
  for (int c = 0; c < n; ++c) total += chunks[c].count;
  // Pass 1: per-row combined range, contiguity, candidate U / Lo.
  bool has_u = false, has_lo = false, all_full = true;
  std::int64_t u = 0, lo_off = 0;
  const auto row_range = [&](std::int64_t i, std::int64_t* rlo, std::int64_t* rhi) {
    const std::int64_t qp = q0 + i * qs;
    *rlo = 1;
    *rhi = 0;  // empty
    std::int64_t base = 0;
    for (int c = 0; c < n; ++c) {
      std::int64_t a, b;
      visible_range(qp, chunks[c], wl, wr, &a, &b);
      if (a <= b) {
        if (*rlo > *rhi) {
          *rlo = base + a;
        } else if (*rhi + 1 != base + a) {
          return false;  // a gap
        }
        *rhi = base + b;
      }
      base += chunks[c].count;
    }
    return true;
  };
  for (std::int64_t i = 0; i < nq; ++i) {
    std::int64_t a, b;
    if (!row_range(i, &a, &b)) return false;
    if (a > b) {
      all_full = false;
      continue;
    }
    if (b < total - 1) {
      all_full = false;
      if (!has_u) has_u = true, u = b - i;
    }
    if (a > 0) {
      all_full = false;
      if (!has_lo) has_lo = true, lo_off = a - i;
    }
  }
  if (all_full) {
    out->kind = BlockMask::kFull;
    return true;
  }
  if (!has_u && !has_lo) return false;  // only empty rows besides full ones
  // Pass 2: the kernel rule with (U, Lo) must reproduce every row exactly.
  for (std::int64_t i = 0; i < nq; ++i) {
    std::int64_t a, b;
    row_range(i, &a, &b);
    const std::int64_t eb = has_u ? std::min(total - 1, i + u) : total - 1;
    const std::int64_t ea = has_lo ? std::max<std::int64_t>(0, i + lo_off) : 0;
    const bool empty = a > b, eempty = ea > eb;
    if (empty != eempty || (!empty && (a != ea || b != eb))) return false;
  }
  out->kind = BlockMask::kPartial;
  if (has_u) {
    if (has_lo && (u - lo_off < 0 || u - lo_off > INT_MAX)) return false;
    out->shift = u;
    out->window_right = 0;
    out->window_left = has_lo ? static_cast<int>(u - lo_off) : -1;
  } else {
    out->shift = lo_off;
    out->window_right = -1;
    out->window_left = 0;
  }
  return true;
}

KeySpan visible_key_span(std::int64_t q0, std::int64_t nq, std::int64_t k0, std::int64_t nk,
                         std::int64_t st, int wl, int wr, int chunk) {
  KeySpan span;
  if (nq <= 0 || nk <= 0) return span;
  if (chunk <= 0) {
    if (classify_block(q0, nq, k0, nk, st, wl, wr).kind == BlockMask::kHidden) return span;
    // The first query's lowest and the last query's highest visible key bound the rest.
    span.lo = wl >= 0 ? std::max<std::int64_t>(0, ceil_div(q0 - wl - k0, st)) : 0;
    span.hi = wr >= 0 ? std::min(nk - 1, floor_div(q0 + (nq - 1) * st + wr - k0, st)) : nk - 1;
    return span;
  }
  // Chunks that hold both a query and a key of the block; in chunk c the queries
  // i in [ia, ib] and the keys j in [ja, jb] (positions in [c*C, c*C + C)).
  const std::int64_t q_last = q0 + (nq - 1) * st, k_last = k0 + (nk - 1) * st;
  const std::int64_t c_first = std::max(floor_div(q0, chunk), floor_div(k0, chunk));
  const std::int64_t c_last = std::min(floor_div(q_last, chunk), floor_div(k_last, chunk));
  for (std::int64_t c = c_first; c <= c_last; ++c) {
    const std::int64_t lo = c * chunk, hi = lo + chunk;  // positions [lo, hi)
    const std::int64_t ia = std::max<std::int64_t>(0, ceil_div(lo - q0, st));
    const std::int64_t ib = std::min(nq - 1, ceil_div(hi - q0, st) - 1);
    const std::int64_t ja = std::max<std::int64_t>(0, ceil_div(lo - k0, st));
    const std::int64_t jb = std::min(nk - 1, ceil_div(hi - k0, st) - 1);
    if (ia > ib || ja > jb) continue;
    const KeySpan sub =
        visible_key_span(q0 + ia * st, ib - ia + 1, k0 + ja * st, jb - ja + 1, st, wl, wr, 0);
    if (sub.empty()) continue;
    if (span.empty()) {
      span = KeySpan{ja + sub.lo, ja + sub.hi};
    } else {
      span.lo = std::min(span.lo, ja + sub.lo);
      span.hi = std::max(span.hi, ja + sub.hi);
    }
  }
  return span;
}

}  // namespace detail

BlockMask classify_block(std::int64_t q0, std::int64_t nq, std::int64_t k0, std::int64_t nk,
                         std::int64_t stride, int window_left, int window_right) {
  // Global rule: key position kp visible from query position qp iff
  //   kp <= qp + wr  and  kp >= qp - wl.
  // With qp = q0 + i*st and kp = k0 + j*st this is, for local indices,
  //   j <= i + U,  U  = floor((q0 - k0 + wr) / st)
  //   j >= i + Lo, Lo = ceil ((q0 - k0 - wl) / st)
  const bool has_u = window_right >= 0;
  const bool has_lo = window_left >= 0;
  const std::int64_t u = has_u ? detail::floor_div(q0 - k0 + window_right, stride) : 0;
  const std::int64_t lo = has_lo ? detail::ceil_div(q0 - k0 - window_left, stride) : 0;
  BlockMask m;
  if ((has_u && nq - 1 + u < 0) || (has_lo && lo > nk - 1) || (has_u && has_lo && lo > u)) {
    m.kind = BlockMask::kHidden;
    return m;
  }
  if ((!has_lo || nq - 1 + lo <= 0) && (!has_u || nk - 1 <= u)) {
    m.kind = BlockMask::kFull;
    return m;
  }
  m.kind = BlockMask::kPartial;
  if (has_u) {
    m.shift = u;
    m.window_right = 0;
    m.window_left = has_lo ? static_cast<int>(u - lo) : -1;
  } else {
    m.shift = lo;
    m.window_right = -1;
    m.window_left = 0;
  }
  return m;
}

}  // namespace ringattn
