// Public softmax-state merge (docs/semantics.md section 5), written on top of SoftmaxState so
// that the kernels, split-KV reduction, the ring merge and the decode allreduce all
// share one set of rules:
//   lse = m + log(exp(lse_a - m) + exp(lse_b - m)),  m = max(lse_a, lse_b)
//   o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)
// An empty state (lse -inf, or +inf on input) is the identity; two empty states give
// output 0 and lse -inf, never NaN.
#include "ringattn/merge_state.hpp"

#include <cstdint>

#include "ringattn/softmax_state.hpp"

namespace ringattn {

void merge_state(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                 float* o, float* lse, std::int64_t n, int d_v) {
  for (std::int64_t r = 0; r < n; ++r) {
    // Each input is normalised, so its state is (m = lse, d = 1); after the merge
    // the accumulator acc = o_a * s.self + o_b * s.other carries the sum d.
    SoftmaxState st = SoftmaxState::from_lse(lse_a[r]);
    const SoftmaxState::Scales s = st.merge(SoftmaxState::from_lse(lse_b[r]));
    const float inv = st.inv_sum();
    const float wa = s.self * inv;
    const float wb = s.other * inv;
    const float* a = o_a + r * d_v;
    const float* b = o_b + r * d_v;
    float* dst = o + r * d_v;
    for (int c = 0; c < d_v; ++c) {
      // Skip a zero-weighted side so that garbage (or inf) in an empty partial's
      // output never turns into NaN through 0 * inf.
      float v = 0.0f;
      if (wa != 0.0f) v += a[c] * wa;
      if (wb != 0.0f) v += b[c] * wb;
      dst[c] = v;
    }
    lse[r] = st.lse();
  }
}

void merge_state_inplace(float* o_a, float* lse_a, const float* o_b, const float* lse_b,
                         std::int64_t n, int d_v) {
  merge_state(o_a, lse_a, o_b, lse_b, o_a, lse_a, n, d_v);
}

void merge_states(const float* o_parts, const float* lse_parts, float* o, float* lse,
                  std::int64_t n, int num_states, int d_v) {
  for (std::int64_t r = 0; r < n; ++r) {
    const float* lp = lse_parts + r * num_states;
    const float* op = o_parts + r * num_states * static_cast<std::int64_t>(d_v);
    // Pass 1: combined state over all partials (max first, then the sum), so each
    // partial is rescaled exactly once.
    float m = kNegInf;
    for (int s = 0; s < num_states; ++s) {
      const float l = canonical_lse(lp[s]);
      if (l > m) m = l;
    }
    float* dst = o + r * d_v;
    for (int c = 0; c < d_v; ++c) dst[c] = 0.0f;
    if (m == kNegInf) {
      if (lse) lse[r] = kNegInf;
      continue;
    }
    float sum = 0.0f;
    for (int s = 0; s < num_states; ++s) {
      const float l = canonical_lse(lp[s]);
      if (l != kNegInf) sum += std::exp(l - m);
    }
    SoftmaxState st;
    st.m = m;
    st.d = sum;
    const float total = st.lse();
    // Pass 2: o = sum_s o_s * exp(lse_s - lse).
    for (int s = 0; s < num_states; ++s) {
      const float l = canonical_lse(lp[s]);
      if (l == kNegInf) continue;
      const float w = std::exp(l - total);
      const float* src = op + static_cast<std::int64_t>(s) * d_v;
      for (int c = 0; c < d_v; ++c) dst[c] += src[c] * w;
    }
    if (lse) lse[r] = total;
  }
}

void apply_sinks(float* o, std::int64_t o_row_stride, const float* lse, std::int64_t lse_stride,
                 const float* sinks, std::int64_t n, int h, int d_v) {
  if (sinks == nullptr) return;
  for (std::int64_t r = 0; r < n; ++r) {
    const float f = sink_scale(lse[r * lse_stride], sinks[r % h]);
    float* row = o + r * o_row_stride;
    for (int c = 0; c < d_v; ++c) row[c] *= f;
  }
}

}  // namespace ringattn
