// Shared helpers of the libFuzzer targets: a byte-stream decoder, strided test
// tensors whose padding is poisoned with NaN, and the failure report.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "ringattn/dtype.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define RA_FUZZ_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define RA_FUZZ_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#endif
#endif
#ifndef RA_FUZZ_POISON
#define RA_FUZZ_POISON(p, n) ((void)(p), (void)(n))
#define RA_FUZZ_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace ringattn::fuzz {

// Prints what went wrong and aborts, which libFuzzer records as a crash with the
// input that caused it.
[[noreturn]] inline void fail(const char* target, const char* what) {
  std::fprintf(stderr, "%s: INVARIANT VIOLATED: %s\n", target, what);
  std::abort();
}

// Decodes the fuzz input as a stream of small decisions. Past the end every read
// yields 0, so short inputs still decode to a complete (mostly default) case.
class FuzzBytes {
 public:
  FuzzBytes(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::uint8_t u8() { return pos_ < size_ ? data_[pos_++] : 0; }
  std::uint32_t u32() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = (v << 8) | u8();
    return v;
  }
  bool flag() { return (u8() & 1u) != 0; }
  // Uniform-ish integer in [lo, hi].
  int range(int lo, int hi) {
    const auto span = static_cast<std::uint32_t>(hi - lo + 1);
    return lo + static_cast<int>((span <= 256 ? u8() : u32()) % span);
  }
  template <typename T, std::size_t N>
  T pick(const std::array<T, N>& options) {
    return options[u8() % N];
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

// Small deterministic generator for tensor contents (xorshift64*).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  std::uint64_t next() {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 2685821657736338717ull;
  }
  // Uniform in [-1, 1).
  float uniform() { return static_cast<float>(next() >> 40) / 8388608.0f - 1.0f; }

 private:
  std::uint64_t s_;
};

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Storage bytes of a quiet NaN in each dtype (fp8 e4m3fn: 0x7f).
inline void store_nan(void* base, std::int64_t i, DType t) { store_from_f32(base, i, t, kNaN); }

// Heap bytes with poisoned guard zones on both sides, so that a kernel reading or
// writing past either end is reported by AddressSanitizer even when the stray
// offset would skip ASan's own small redzones and land in another live block.
class GuardedBuffer {
 public:
  static constexpr std::size_t kGuard = 16 * 1024;

  GuardedBuffer() = default;
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  ~GuardedBuffer() { release(); }

  void assign(std::size_t bytes) {
    release();
    raw_.assign(bytes + 2 * kGuard, 0);
    size_ = bytes;
    RA_FUZZ_POISON(raw_.data(), kGuard);
    RA_FUZZ_POISON(raw_.data() + kGuard + bytes, kGuard);
  }
  unsigned char* data() { return raw_.data() + kGuard; }
  const unsigned char* data() const { return raw_.data() + kGuard; }
  std::size_t size() const { return size_; }

 private:
  void release() {
    if (!raw_.empty()) RA_FUZZ_UNPOISON(raw_.data(), raw_.size());
    raw_.clear();
    size_ = 0;
  }
  std::vector<unsigned char> raw_;
  std::size_t size_ = 0;
};

// Largest number of elements (logical or padding) one fuzz tensor may span.
inline constexpr std::int64_t kMaxTensorElements = std::int64_t{1} << 20;

// A rank-4 tensor [n0, n1, n2, n3] with element strides (s3 = 1 always) over a
// buffer that covers every logical element when the strides are non-negative.
// Everything not logical is NaN, so a kernel that reads padding produces NaN.
struct StridedTensor {
  DType dtype = DType::kF32;
  std::array<std::int64_t, 4> dim{};
  std::array<std::int64_t, 4> stride{};
  GuardedBuffer buf;
  bool valid_layout = true;  // every logical offset lies inside buf

  std::int64_t numel() const { return dim[0] * dim[1] * dim[2] * dim[3]; }
  std::int64_t offset(std::int64_t i0, std::int64_t i1, std::int64_t i2, std::int64_t i3) const {
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3;
  }
  std::int64_t capacity() const {
    return static_cast<std::int64_t>(buf.size() / dtype_size(dtype));
  }
  void* data() { return buf.data(); }
  float get(std::int64_t off) const { return load_as_f32(buf.data(), off, dtype); }
  void set(std::int64_t off, float v) { store_from_f32(buf.data(), off, dtype, v); }
  bool in_range(std::int64_t off) const { return off >= 0 && off < capacity(); }
};

// Every element (logical or padding) to NaN.
inline void poison_all(StridedTensor& t) {
  for (std::int64_t i = 0; i < t.capacity(); ++i) store_nan(t.data(), i, t.dtype);
}

// Decodes a stride choice for [n0, n1, n2, n3]: contiguous, padded, or garbage
// (negative, zero, overlapping). Returns false when the tensor would be too large.
inline bool make_tensor(FuzzBytes& in, StridedTensor& t, DType dtype,
                        std::array<std::int64_t, 4> dim) {
  t.dtype = dtype;
  t.dim = dim;
  std::array<std::int64_t, 4> contiguous{dim[1] * dim[2] * dim[3], dim[2] * dim[3], dim[3], 1};
  t.stride = contiguous;
  const int mode = in.u8() % 8;
  if (mode == 5 || mode == 6) {  // padded rows / heads / batches
    t.stride[2] = dim[3] + in.range(0, 9);
    t.stride[1] = t.stride[2] * dim[2] + in.range(0, 9);
    t.stride[0] = t.stride[1] * dim[1] + in.range(0, 9);
  } else if (mode == 7) {  // arbitrary: may be negative, zero or overlapping
    for (int k = 0; k < 3; ++k) t.stride[k] = in.range(-20, 300);
  }
  std::int64_t lo = 0, hi = 0;
  for (int k = 0; k < 4; ++k) {
    if (dim[k] <= 0) continue;
    lo += (dim[k] - 1) * std::min<std::int64_t>(t.stride[k], 0);
    hi += (dim[k] - 1) * std::max<std::int64_t>(t.stride[k], 0);
  }
  t.valid_layout = lo >= 0;
  std::int64_t elements = hi + 1;
  if (!t.valid_layout) {  // cover the contiguous extent; validation must reject the strides
    elements = std::max<std::int64_t>(t.numel(), 1);
  }
  if (elements > kMaxTensorElements) return false;
  t.buf.assign(static_cast<std::size_t>(elements) * dtype_size(dtype));
  poison_all(t);
  return true;
}

// A contiguous [n0, n1, n2, n3] tensor, all NaN.
inline void make_contiguous(StridedTensor& t, DType dtype, std::array<std::int64_t, 4> dim) {
  t.dtype = dtype;
  t.dim = dim;
  t.stride = {dim[1] * dim[2] * dim[3], dim[2] * dim[3], dim[3], 1};
  const std::int64_t elements = std::max<std::int64_t>(t.numel(), 1);
  t.buf.assign(static_cast<std::size_t>(elements) * dtype_size(dtype));
  poison_all(t);
  t.valid_layout = true;
}

// Calls f(offset) for every logical element whose offset lies in the buffer.
template <typename F>
void for_each_element(const StridedTensor& t, F&& f) {
  for (std::int64_t a = 0; a < t.dim[0]; ++a)
    for (std::int64_t b = 0; b < t.dim[1]; ++b)
      for (std::int64_t c = 0; c < t.dim[2]; ++c)
        for (std::int64_t d = 0; d < t.dim[3]; ++d) {
          const std::int64_t off = t.offset(a, b, c, d);
          if (t.in_range(off)) f(off);
        }
}

// Fills every logical element with finite values of magnitude <= `magnitude`.
inline void fill_finite(StridedTensor& t, Rng& rng, float magnitude) {
  for_each_element(t, [&](std::int64_t off) { t.set(off, magnitude * rng.uniform()); });
}

// True when every byte of `t` equals a NaN poison, i.e. nothing outside the
// logical elements was written (call after re-poisoning the logical elements).
inline bool all_poison(const StridedTensor& t) {
  for (std::int64_t i = 0; i < t.capacity(); ++i)
    if (!std::isnan(t.get(i))) return false;
  return true;
}

}  // namespace ringattn::fuzz
