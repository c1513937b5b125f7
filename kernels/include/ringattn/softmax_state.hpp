// The online-softmax state, shared by every place that combines partial attention
// results: the kernels' inner loop over key tiles, split-KV reduction, the ring
// merge across MPI ranks and the distributed-decode allreduce (docs/semantics.md section 5).
//
// All LSE values crossing an API are NATURAL-log sums: lse = log(sum_j exp(score_j)).
// An empty state (no visible key) has lse = -inf and output 0. +inf on input is
// read as empty too (FlashMLA / FA2 write +inf for empty rows).
//
// A partial result over a key set K is (o, lse) with o = sum_{j in K} p_j v_j / sum p_j
// (normalised). Inside a kernel the same quantity is kept unnormalised as
// (acc, m, d): acc = sum exp(s_j - m) v_j, d = sum exp(s_j - m), m = running max.
#pragma once

#include <cmath>
#include <limits>

namespace ringattn {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Maps the "+inf means empty" convention onto ours (-inf), and leaves NaN alone
// so it is never silently hidden.
inline float canonical_lse(float lse) {
  return lse == std::numeric_limits<float>::infinity() ? kNegInf : lse;
}

// Running max m and running sum d of exp(score - m).
struct SoftmaxState {
  float m = kNegInf;  // running max of the scores seen (natural-log domain)
  float d = 0.0f;     // sum of exp(score - m) over the keys seen

  bool empty() const { return !(d > 0.0f); }

  // Natural-log sum-exp of the scores seen, -inf when empty.
  float lse() const { return empty() ? kNegInf : m + std::log(d); }

  // State of a normalised partial (o, lse): m = lse, d = 1.
  static SoftmaxState from_lse(float lse) {
    lse = canonical_lse(lse);
    SoftmaxState s;
    if (lse != kNegInf) {
      s.m = lse;
      s.d = 1.0f;
    }
    return s;
  }

  // Scale factors produced by a merge: new_acc = acc_self * self + acc_other * other.
  struct Scales {
    float self;
    float other;
  };

  // Merges `other` into this state and returns the factors that rescale the two
  // accumulators onto the new max. Two empty states stay empty with factors (0, 0)
  // so that the accumulators become 0, never NaN.
  Scales merge(const SoftmaxState& other) {
    if (other.empty()) return {empty() ? 0.0f : 1.0f, 0.0f};
    if (empty()) {
      *this = other;
      return {0.0f, 1.0f};
    }
    const float m_new = m > other.m ? m : other.m;
    const Scales s{std::exp(m - m_new), std::exp(other.m - m_new)};
    d = d * s.self + other.d * s.other;
    m = m_new;
    return s;
  }

  // Factor that turns the accumulator into the normalised output (0 when empty).
  float inv_sum() const { return empty() ? 0.0f : 1.0f / d; }
};

// Attention sink (docs/semantics.md section 5): the factor
//   exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse))
// by which the FINAL normalised output row is multiplied, once, after every merge;
// the LSE itself stays without the sink, so partial states merge exactly. sink = -inf
// gives 1, +inf gives 0; an empty row (lse -inf) keeps output 0 (factor 0).
inline float sink_scale(float lse, float sink) {
  lse = canonical_lse(lse);
  if (lse == kNegInf) return 0.0f;
  return 1.0f / (1.0f + std::exp(sink - lse));
}

}  // namespace ringattn
