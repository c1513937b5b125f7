// Kernel bodies of the optimised CPU backend, written once over the thin vector API
// (S = SimdAvx2 / SimdAvx512 / SimdScalar) and the storage type T (float, bf16_t,
// f16_t, fp8e4m3_t: e4m3 loads return value / 256, folded into AttnProblem's fp8
// factors). flash_fwd_cpu_<isa>.cpp instantiates run_flash_fwd<S> for its ISA.
//
// Work decomposition. A task is (sequence, KV head hk, block of query rows, key split).
// It owns every query head of the KV group (h / h_k heads), so each K/V row it loads
// serves all of them (GQA/MQA read K/V once). The task's rows are
// r = g * nq + ii  (head g of the group, query row q0 + ii), M = nq * group in all.
// A decode task may cover nh consecutive KV heads (decode_heads_per_task); its rows
// are then the nh groups one after the other (query head hk * group + r / nq).
//
//  - Prefill kernel (M > kDecodeMaxRows): FlashAttention-2 tiling. Per key tile of
//    kKeyTile keys: K is packed transposed into kt [d][kKeyTile] fp32 and V into
//    vp [kKeyTile][d_v padded] fp32 (bf16/fp16 converted while packing), once for all
//    M rows; S = Q K^T and O += P V run as register-blocked GEMM micro-kernels.
//  - Decode kernel (M <= kDecodeMaxRows, e.g. s_q = 1): K and V rows are streamed
//    straight from memory once per tile for all M rows (dot products over d with a
//    rows x keys block of L accumulators and one transposed reduction, then
//    O += P V with V rows read in place).
//  - Masked prefill tiles compute each row block only up to its last visible key
//    column (diagonal sub-tiles).
//  - qv (FA3's extra query part, score = scale * (q . k + qv . v)): each query row in
//    sc.q is [q, zeros to dqa, qv] (dqa = d rounded up to the vector width). The
//    prefill tile packs V^T under K^T in kt ([dk_rows][kKeyTile]: K^T, zero rows to
//    dqa, V^T), so S = Q K^T is one product over dk_rows = dqa + d_v; the decode
//    kernels add a second dot-product pass of the qv part against the V rows they read
//    for P V anyway. A matrix engine sees has_qv and packs its own layouts
//    (DpBf16Engine: the same [q, qv] x [K; V] product); cpu_backend.cpp runs qv calls
//    of the AMX tier on the vector tiles.
//
// Both keep one SoftmaxState (running max m, running sum d) per row and an fp32
// accumulator o[M][d_v]; a task covering a key split writes its unnormalised
// (o, state) to a partial buffer and the splits are merged afterwards with
// SoftmaxState::merge, the same merge the ring and split-KV reductions use.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/flash_fwd_cpu.hpp"
#include "progress_throttle.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail::cpu {
// Everything below has internal linkage: each ISA's translation unit gets its own
// copy, so the linker can never hand code compiled for AVX-512 to another path.
namespace {

inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Software prefetch into L2 (prefetcht2): the decode kernel asks for the rows it will
// read a few tiles later while it computes on the current ones (see decode_tile).
// Every cache line is asked for at least twice (kBytes = bytes of one vector load
// starting at `a`): a prefetch is dropped when the miss queue is full, and one
// prefetch per line (fp32 with 64-byte vectors) measured 3-8 points of the read
// bandwidth slower than two.
template <int kBytes, class U>
inline void prefetch_l2(const U* a) {
  __builtin_prefetch(a, 0, 1);
  if constexpr (kBytes >= 64) __builtin_prefetch(reinterpret_cast<const char*>(a) + 32, 0, 1);
}

// prefetch_l2 for element c of `row` when the loads are narrower than 32 bytes (fp8
// rows: 8 or 16 bytes a load): only every 32nd byte asks, so each cache line is still
// asked for twice, not four or eight times (the extra prefetches cost issue slots in
// the compute-bound decode loop).
template <int kBytes, class U>
inline void prefetch_l2_at(const U* row, int c) {
  if constexpr (kBytes < 32)
    if ((c * static_cast<int>(sizeof(U))) % 32 != 0) return;
  prefetch_l2<kBytes>(row + c);
}

// Makes the compiler keep a loaded vector in a register: without it GCC folds the
// load of a q vector into every FMA that uses it (KB loads instead of one per step of
// the decode score loop; the decode kernel is load-port bound there, and one load
// measured 5 % faster).
template <class X>
inline void keep_in_register(X& x) {
  if constexpr (sizeof(X) >= 16) asm("" : "+v"(x));
}

// Upper bound of the per-call K/V packing buffer (floats, 1 GiB); larger calls pack
// tiles per task instead.
constexpr std::int64_t kMaxPackedFloats = std::int64_t{1} << 28;

// 64-byte aligned buffer of a trivially copyable type, allocated once per call (never
// inside the loops). Contents start uninitialised.
template <class X>
class AlignedBuf {
 public:
  void reset(std::size_t n) {
    const std::size_t bytes = static_cast<std::size_t>(
        round_up(static_cast<std::int64_t>(std::max<std::size_t>(n, 1) * sizeof(X)), 64));
    ptr_.reset(static_cast<X*>(std::aligned_alloc(64, bytes)));
    if (!ptr_) throw_scratch_alloc_failure(bytes);
  }
  X* get() const { return ptr_.get(); }
  X& operator[](std::size_t i) const { return ptr_.get()[i]; }

 private:
  struct Free {
    void operator()(X* p) const { std::free(p); }
  };
  std::unique_ptr<X, Free> ptr_;
};
using AlignedFloats = AlignedBuf<float>;

// a / b rounded towards -inf and towards +inf (b > 0).
inline std::int64_t div_floor(std::int64_t a, std::int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
inline std::int64_t div_ceil(std::int64_t a, std::int64_t b) { return -div_floor(-a, b); }

// Visible key range [lo, hi) of query row i (docs/semantics.md section 1); empty when lo >= hi.
struct RowRange {
  std::int64_t lo, hi;
};
inline RowRange visible_keys(const AttnProblem& p, const SeqDesc& sd, std::int64_t i) {
  RowRange r{0, sd.s_k};
  if (p.w_left >= 0) r.lo = std::max<std::int64_t>(0, i + sd.shift - p.w_left);
  if (p.w_right >= 0) r.hi = std::min<std::int64_t>(sd.s_k, i + sd.shift + p.w_right + 1);
  if (p.chunk > 0) {
    // The chunk [c0, c0 + chunk) holding row i's position a; its keys j are those with
    // c0 <= k_pos + j * st < c0 + chunk (default positions: a = i + shift, k_pos = 0, st = 1).
    const std::int64_t st = p.chunk_stride;
    const std::int64_t a = sd.q_pos + i * st;
    const std::int64_t c0 = div_floor(a, p.chunk) * p.chunk;
    r.lo = std::max(r.lo, div_ceil(c0 - sd.k_pos, st));
    r.hi = std::min(r.hi, div_ceil(c0 + p.chunk - sd.k_pos, st));
  }
  return r;
}

struct Task {
  int seq, hk, nh, q0, nq;  // KV heads [hk, hk + nh), query rows [q0, q0 + nq)
  std::int64_t kb, ke;      // key range of this split
  std::int64_t part;        // index of the partial slot, -1 = no split (writes the output)
  const float* packed;      // pre-packed K/V tiles of (seq, hk), nullptr = pack per task
};

struct PackItem {
  int seq, hk;
  std::int64_t j0;
  float* dst;
};

// Matrix engine of the prefill tiles (template parameter E of FlashFwd). VectorTiles,
// the default: the vector micro-kernels of this file (every storage type widened to
// fp32). An engine for bf16 storage (DpBf16Engine in mm_dpbf16.hpp: vdpbf16ps, tier
// cpu-avx512-bf16; AmxTiles in amx_prefill.hpp: AMX tiles, tier cpu-amx) sets kMatrix
// and takes over the K/V packing and the prefill key tile through the hooks marked
// "E hook"; the task loop, masks, splits, merges and the decode kernel (K / V rows read
// in place; memory bound, docs/cpu-backend.md) stay FlashFwd's. With f the FlashFwd and
// sc its Scratch, an engine provides
//   kKeyTile                            keys per prefill tile (FlashFwd's NC)
//   Scratch                             its per-thread buffers (sc.mm)
//   init_scratch(f, sc)                 sizes sc.mm (and may enlarge FlashFwd's buffers)
//   tile_floats(f)                      floats of one packed K + V tile (pack buffer unit)
//   pack_tile(f, sd, hk, j0, nc, dst)   keys [j0, j0 + nc) of KV head hk: K then V in
//                                       the engine's layouts, keys past nc zero
//   begin_task(f, t, sd, sc, M)         before a prefill task's tiles: its M Q rows as
//                                       stored (unscaled), r = g * nq + ii
//   prefill_tile(f, sd, t, sc, M, nq, j0, nc, full, packed)   one key tile: S = Q K^T,
//       the online softmax (FlashFwd's softmax_tile on sc.s, or the engine's own into
//       sc.st), O = O * alpha + P V into sc.o; packed = the tile's pack_tile output or
//       nullptr (the engine packs it into sc.mm)
//
// An engine may also take over the decode tile (E::kDecode = true; Fp8DpBf16Decode in
// decode_fp8_dpbf16.hpp: fp8 caches on vdpbf16ps). It then provides init_scratch and
//   kDecodeTile                         keys per decode tile (divides kKeyTile)
//   begin_decode_task(f, t, sd, sc, M)  before a decode task's tiles (its q rows)
//   decode_tile(f, sd, t, sc, M, nq, j0, nc, full)   one decode key tile: scores into
//       sc.s, FlashFwd's softmax_tile, O = O * alpha + P V into sc.o
struct VectorTiles {
  static constexpr bool kMatrix = false;
  static constexpr int kKeyTile = cpu::kKeyTile;  // keys per prefill tile (NC)
  struct Scratch {};
};
template <class E>
constexpr bool engine_decodes() {
  if constexpr (requires { E::kDecode; }) return E::kDecode;
  return false;
}

template <class S, class T, class E = VectorTiles>
struct FlashFwd {
  using V = typename S::V;
  static constexpr int L = S::kLanes;
  static constexpr int MR = S::kRows;
  static constexpr int NV = S::kVecs;
  static constexpr int NC = E::kKeyTile;
  static constexpr bool kDecodeEngine = engine_decodes<E>();
  static_assert(NC % (NV * L) == 0, "key tile must be a multiple of the micro-kernel width");

  const AttnProblem& p;
  int group, dq, dvp, max_rows;
  // qv: offset of the qv part in a query row of sc.q, and rows of the packed K^T tile
  // (d without qv; dqa + d_v with qv, see the header comment).
  bool has_qv;
  int dqa, dk_rows;

  struct Scratch {
    AlignedFloats q, s, o, kt, vp, alpha;
    AlignedBuf<SoftmaxState> st;
    AlignedBuf<RowRange> rows;
    AlignedBuf<int> lim;  // per MR-row block: key columns of the tile it needs
    AlignedBuf<const T*> kptr, vrow_t, kbase, vbase;
    AlignedBuf<const T*> kpf, vpf, kpf_base, vpf_base;  // decode prefetch rows
    AlignedBuf<const float*> vrow_f;
    typename E::Scratch mm;                // matrix engine buffers (E hook)
    ProgressThrottle* progress = nullptr;  // set on the calling thread only
  };

  std::int64_t tile_floats() const {
    if constexpr (E::kMatrix) return E::tile_floats(*this);  // E hook
    return std::int64_t{dk_rows} * NC + std::int64_t{NC} * dvp;
  }

  explicit FlashFwd(const AttnProblem& prob) : p(prob) {
    group = p.h / p.h_k;
    has_qv = p.qv != nullptr;
    dqa = static_cast<int>(round_up(p.d, L));
    dvp = static_cast<int>(round_up(p.d_v, L));
    dq = has_qv ? dqa + dvp : dqa;
    dk_rows = has_qv ? dqa + p.d_v : p.d;
    max_rows = 1;
    for (const SeqDesc& sd : p.seqs)
      max_rows = std::max(
          max_rows,
          query_block_rows(sd.s_q, group) * group *
              (is_decode(sd.s_q, group) ? decode_heads_per_task(sd.s_q, group, p.h_k) : 1));
  }

  void init_scratch(Scratch& sc) const {
    const std::size_t m = static_cast<std::size_t>(max_rows);
    sc.q.reset(m * dq);
    sc.s.reset(m * NC);
    sc.o.reset(m * dvp);
    sc.kt.reset(static_cast<std::size_t>(dk_rows) * NC);
    sc.vp.reset(static_cast<std::size_t>(NC) * dvp);
    sc.alpha.reset(m);
    sc.st.reset(m);
    sc.rows.reset(m);
    sc.lim.reset(m / MR + 1);
    sc.kptr.reset(NC);
    sc.kbase.reset(NC);
    sc.vbase.reset(NC);
    sc.vrow_f.reset(NC);
    sc.vrow_t.reset(NC);
    sc.kpf.reset(NC);
    sc.vpf.reset(NC);
    sc.kpf_base.reset(NC);
    sc.vpf_base.reset(NC);
    if constexpr (E::kMatrix || kDecodeEngine) E::init_scratch(*this, sc);  // E hook
  }

  const T* k_row(const SeqDesc& sd, std::int64_t t, int hk) const {
    return reinterpret_cast<const T*>(sd.k.base) + kv_rows_offset(sd.k, t, hk);
  }
  const T* v_row(const SeqDesc& sd, std::int64_t t, int hk) const {
    return reinterpret_cast<const T*>(sd.v.base) + kv_rows_offset(sd.v, t, hk);
  }

  // Converts n (multiple of 8) values of storage type U to fp32, times `mul`; the
  // vector-width tail (AVX-512, n % 16 == 8) is zero filled up to round_up(n, L).
  template <class U>
  static void convert_row(const U* src, int n, float mul, float* dst) {
    const V vm = S::set1(mul);
    int c = 0;
    for (; c + L <= n; c += L) S::store(dst + c, S::mul(S::load(src + c), vm));
    if (c < n) S::store(dst + c, S::mul(S::load_partial(src + c, n - c), vm));
  }

  // ---------------- micro-kernels ----------------

  // S[R rows][ncols] = Q[R][d] * KT[d][ncols] (KT row stride NC), ncols multiple of NV*L.
  // Register block: R rows x NV vectors of accumulators; per d step, NV loads of KT
  // and R broadcasts of Q feed R * NV FMAs.
  template <int R>
  static void qk_block(const float* q, int ldq, const float* kt, int d, float* s, int ncols) {
    for (int c0 = 0; c0 < ncols; c0 += NV * L) {
      V acc[R][NV];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
      const float* kp = kt + c0;
      for (int kk = 0; kk < d; ++kk) {
        V b[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) b[v] = S::load(kp + v * L);
        kp += NC;
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const V a = S::set1(q[r * ldq + kk]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(a, b[v], acc[r][v]);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) S::store(s + r * NC + c0 + v * L, acc[r][v]);
    }
  }

  // O[R rows][c0 .. c0 + NVv*L) = O * alpha[r] + P[R][0..nk) * Vrows[0..nk)[c0 ..].
  // vrows[k] points at key k's value row (fp32 packed or storage type U, read in
  // place); the last vector reads only `tail` values when kTail (AVX-512 tails).
  template <int R, int NVv, bool kTail, class U>
  static void pv_block(const float* pm, const U* const* vrows, int nk, int c0, int tail,
                       const float* alpha, float* o, int ldo, const U* const* pf = nullptr) {
    V acc[R][NVv];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const V al = S::set1(alpha[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) acc[r][v] = S::mul(S::load(o + r * ldo + c0 + v * L), al);
    }
    // The key loop twice (with and without prefetch), so the prefill instantiation
    // (pf == nullptr) carries no test in its innermost loop.
    const auto keys = [&](auto with_pf) {
      for (int k = 0; k < nk; ++k) {
        const U* vr = vrows[k] + c0;
        if constexpr (decltype(with_pf)::value)
#pragma GCC unroll 4
          for (int v = 0; v < NVv; ++v) prefetch_l2_at<L * sizeof(U)>(pf[k], c0 + v * L);
        V b[NVv];
#pragma GCC unroll 4
        for (int v = 0; v < NVv; ++v) {
          if (kTail && v == NVv - 1) {
            b[v] = S::load_partial(vr + v * L, tail);
          } else {
            b[v] = S::load(vr + v * L);
          }
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const V a = S::set1(pm[r * NC + k]);
#pragma GCC unroll 4
          for (int v = 0; v < NVv; ++v) acc[r][v] = S::fma(a, b[v], acc[r][v]);
        }
      }
    };
    if (pf) {
      keys(std::true_type{});
    } else {
      keys(std::false_type{});
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NVv; ++v) S::store(o + r * ldo + c0 + v * L, acc[r][v]);
  }

  // Decode scores: s[r][0..nk) = q[r] . krows[k] over d values for R rows (q fp32, rows
  // dq apart, zero padded past d to the vector width), or s += q[r] . krows[k] when
  // `accumulate` (the qv pass: q at the qv part, krows the V rows). R is a power of two
  // <= L. Keys are taken KB = L / R at a time, so the R x KB accumulators are L
  // independent FMA chains (enough to hide the FMA latency on two ports, where one chain
  // per row left the loop latency bound), and the L dot products are finished by one
  // transposed reduction (reduce_add_lanes) instead of L horizontal sums. Lane
  // r * KB + kb of the reduction is the score of row r, key k0 + kb. krows must hold
  // round_up(nk, KB) pointers (padding repeats a real row; the padded columns are masked
  // by softmax_tile).
  template <int R>
  void qk_rows(const float* q, const T* const* krows, const T* const* pf, int nk, float* s, int d,
               bool accumulate) const {
    constexpr int KB = L / R;
    static_assert(R * KB == L, "rows must divide the vector width");
    const int dfull = d / L * L;
    const int tail = d - dfull;
    for (int k0 = 0; k0 < nk; k0 += KB) {
      V acc[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) acc[i] = S::zero();
      const T* kr[KB];
      const T* kf[KB];
#pragma GCC unroll 16
      for (int kb = 0; kb < KB; ++kb) {
        kr[kb] = krows[k0 + kb];
        kf[kb] = pf[k0 + kb];
      }
      for (int c = 0; c < dfull; c += L) {
        V b[KB];
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) prefetch_l2_at<L * sizeof(T)>(kf[kb], c);
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) b[kb] = S::load(kr[kb] + c);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          V a = S::load(q + r * dq + c);
          keep_in_register(a);
#pragma GCC unroll 16
          for (int kb = 0; kb < KB; ++kb) acc[r * KB + kb] = S::fma(a, b[kb], acc[r * KB + kb]);
        }
      }
      if (tail) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const V a = S::load(q + r * dq + dfull);
#pragma GCC unroll 16
          for (int kb = 0; kb < KB; ++kb)
            acc[r * KB + kb] = S::fma(a, S::load_partial(kr[kb] + dfull, tail), acc[r * KB + kb]);
        }
      }
      alignas(64) float sums[L];
      S::store(sums, S::reduce_add_lanes(acc));
      if (accumulate) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
          for (int kb = 0; kb < KB; ++kb) s[r * NC + k0 + kb] += sums[r * KB + kb];
        continue;
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int kb = 0; kb < KB; ++kb) s[r * NC + k0 + kb] = sums[r * KB + kb];
    }
  }

  // Runtime row count -> compile-time R (1 .. MR, or 1 .. 8 for decode).
  template <int R = MR>
  static void qk_dispatch(int rows, const float* q, int ldq, const float* kt, int d, float* s,
                          int ncols) {
    if constexpr (R > 0) {
      if (rows == R) return qk_block<R>(q, ldq, kt, d, s, ncols);
      return qk_dispatch<R - 1>(rows, q, ldq, kt, d, s, ncols);
    }
  }
  // Decode scores for any row count: chunks of L, L/2, ..., 1 rows (powers of two).
  void qk_rows_dispatch(int rows, const float* q, const T* const* krows, const T* const* pf, int nk,
                        float* s, int d, bool acc) const {
    int r0 = 0;
    qk_rows_pow2<L>(rows, r0, q, krows, pf, nk, s, d, acc);
  }
  template <int R>
  void qk_rows_pow2(int rows, int& r0, const float* q, const T* const* krows, const T* const* pf,
                    int nk, float* s, int d, bool acc) const {
    for (; rows - r0 >= R; r0 += R) qk_rows<R>(q + r0 * dq, krows, pf, nk, s + r0 * NC, d, acc);
    if constexpr (R > 1) qk_rows_pow2<R / 2>(rows, r0, q, krows, pf, nk, s, d, acc);
  }
  template <int R, class U>
  static void pv_cols(const float* pm, const U* const* vrows, int nk, int ncols, int tail,
                      const float* alpha, float* o, int ldo, int cstart = 0,
                      const U* const* pf = nullptr) {
    // Columns [cstart, ncols) (multiples of L); the last vector is partial when tail.
    int c0 = cstart;
    for (; c0 + NV * L <= ncols && !(tail && c0 + NV * L == ncols); c0 += NV * L)
      pv_block<R, NV, false>(pm, vrows, nk, c0, 0, alpha, o, ldo, pf);
    while (c0 < ncols) {
      const bool last = c0 + L == ncols;
      if (last && tail) {
        pv_block<R, 1, true>(pm, vrows, nk, c0, tail, alpha, o, ldo, pf);
      } else {
        pv_block<R, 1, false>(pm, vrows, nk, c0, 0, alpha, o, ldo, pf);
      }
      c0 += L;
    }
  }
  // Decode P V for few rows (R <= 4): NVD vectors of columns per block, so R * NVD
  // independent FMA chains (more than pv_cols' R * NV: the chains run over the keys of
  // a tile and are latency bound at 8).
  static constexpr int NVD = L >= 16 ? 4 : 3;
  template <int R, class U>
  static void pv_cols_wide(const float* pm, const U* const* vrows, int nk, int ncols, int tail,
                           const float* alpha, float* o, int ldo, const U* const* pf) {
    int c0 = 0;
    for (; c0 + NVD * L <= ncols && !(tail && c0 + NVD * L == ncols); c0 += NVD * L)
      pv_block<R, NVD, false>(pm, vrows, nk, c0, 0, alpha, o, ldo, pf);
    if (c0 < ncols) pv_cols<R>(pm, vrows, nk, ncols, tail, alpha, o, ldo, c0, pf);
  }
  // Runtime row count (1 .. 4) -> pv_cols_wide<R>.
  template <class U, int R = 4>
  static void pv_wide_dispatch(int rows, const float* pm, const U* const* vrows, int nk, int ncols,
                               int tail, const float* alpha, float* o, int ldo,
                               const U* const* pf) {
    if constexpr (R > 0) {
      if (rows == R) return pv_cols_wide<R>(pm, vrows, nk, ncols, tail, alpha, o, ldo, pf);
      return pv_wide_dispatch<U, R - 1>(rows, pm, vrows, nk, ncols, tail, alpha, o, ldo, pf);
    }
  }
  template <class U, int R = (MR > 8 ? MR : 8)>
  static void pv_dispatch(int rows, const float* pm, const U* const* vrows, int nk, int ncols,
                          int tail, const float* alpha, float* o, int ldo,
                          const U* const* pf = nullptr) {
    if constexpr (R > 0) {
      if (rows == R) return pv_cols<R>(pm, vrows, nk, ncols, tail, alpha, o, ldo, 0, pf);
      return pv_dispatch<U, R - 1>(rows, pm, vrows, nk, ncols, tail, alpha, o, ldo, pf);
    }
  }

  // ---------------- softmax over one score tile ----------------

  // Rows r in [0, M) of the score tile s [M][NC] hold scores for keys j0 .. j0 + nc;
  // columns [nc, ncv) are padding. Applies the soft cap, then the mask (only when the
  // tile is not fully visible to every row), then the online-softmax update: s becomes
  // P = exp(s - m_new), alpha[r] = exp(m_old - m_new) rescales the row's accumulator.
  void softmax_tile(Scratch& sc, int M, int nq, std::int64_t j0, int nc, int ncv, bool full) const {
    float* s = sc.s.get();
    const V ninf = S::set1(kNegInf);
    for (int r = 0; r < M; ++r) {
      float* sr = s + r * NC;
      if (p.softcap > 0.0f) {
        const V cap = S::set1(p.softcap);
        for (int c = 0; c < ncv; c += L) S::store(sr + c, S::mul(cap, S::tanh(S::load(sr + c))));
      }
      int a = 0, b = nc;
      if (!full) {
        const RowRange rr = sc.rows[r % nq];
        a = static_cast<int>(std::clamp<std::int64_t>(rr.lo - j0, 0, nc));
        b = static_cast<int>(std::clamp<std::int64_t>(rr.hi - j0, 0, nc));
        if (a >= b) a = b = 0;
      }
      for (int c = 0; c < a; ++c) sr[c] = kNegInf;
      for (int c = b; c < ncv; ++c) sr[c] = kNegInf;
      SoftmaxState& st = sc.st[r];
      if (a >= b) {  // row sees nothing in this tile
        for (int c = 0; c < ncv; c += L) S::store(sr + c, S::zero());
        sc.alpha.get()[r] = 1.0f;
        continue;
      }
      V vmax = ninf;
      for (int c = 0; c < ncv; c += L) vmax = S::max(vmax, S::load(sr + c));
      const float m_new = std::max(st.m, S::reduce_max(vmax));
      const V vm = S::set1(m_new);
      V vsum = S::zero();
      for (int c = 0; c < ncv; c += L) {
        const V e = S::exp(S::sub(S::load(sr + c), vm));
        S::store(sr + c, e);
        vsum = S::add(vsum, e);
      }
      const float alpha = st.m == kNegInf ? 0.0f : std::exp(st.m - m_new);
      st.d = st.d * alpha + S::reduce_add(vsum);
      st.m = m_new;
      sc.alpha.get()[r] = alpha;
    }
  }

  // ---------------- one task ----------------

  void run_task(const Task& t, Scratch& sc, float* part_o, SoftmaxState* part_st) const {
    const SeqDesc& sd = p.seqs[static_cast<std::size_t>(t.seq)];
    const int nq = t.nq;
    const int gq = t.nh * group;  // query heads of the task
    const int M = nq * gq;
    const bool decode = is_decode(sd.s_q, group);
    const float qmul = p.softcap > 0.0f ? p.scale / p.softcap : p.scale;
    float* q = sc.q.get();
    float* o = sc.o.get();

    // Query rows (scaled, fp32), accumulators, per-row key ranges.
    // fp8: the per-head descales (and the 256s of the e4m3 loads) ride on the scale.
    for (int g = 0; g < gq; ++g) {
      const int hq = t.hk * group + g;
      const float mul = qmul * p.qk_factor(sd, hq / group);
      for (int ii = 0; ii < nq; ++ii) {
        const T* src = static_cast<const T*>(p.q) + sd.q_off + (t.q0 + ii) * p.q_row_stride +
                       hq * p.q_head_stride;
        convert_row(src, p.d, mul, q + (g * nq + ii) * dq);
        if (has_qv) {  // the qv part, same scale: score = scale * (q . k + qv . v)
          const T* qv = static_cast<const T*>(p.qv) + sd.qv_off + (t.q0 + ii) * p.qv_row_stride +
                        hq * p.qv_head_stride;
          convert_row(qv, p.d_v, qmul, q + (g * nq + ii) * dq + dqa);  // qv is never fp8
        }
      }
    }
    if constexpr (E::kMatrix)
      if (!decode) E::begin_task(*this, t, sd, sc, M);  // E hook
    if constexpr (kDecodeEngine)
      if (decode) E::begin_decode_task(*this, t, sd, sc, M);  // E hook
    std::fill(o, o + static_cast<std::size_t>(M) * dvp, 0.0f);
    for (int r = 0; r < M; ++r) sc.st[r] = SoftmaxState{};
    std::int64_t jb = t.ke, je = t.kb;  // union of the rows' ranges within the split
    for (int ii = 0; ii < nq; ++ii) {
      RowRange rr = visible_keys(p, sd, t.q0 + ii);
      rr.lo = std::max(rr.lo, t.kb);
      rr.hi = std::min(rr.hi, t.ke);
      sc.rows[ii] = rr;
      if (rr.lo < rr.hi) {
        jb = std::min(jb, rr.lo);
        je = std::max(je, rr.hi);
      }
    }

    // Key tiles. A tile that every row sees entirely runs without the mask; a tile
    // no row sees is skipped; others are masked per row in softmax_tile.
    const float* packed = t.packed;
    if (packed) packed += jb / NC * tile_floats();
    // Decode streams K/V from memory once; its tiles (16 or 64 keys of all nh heads,
    // K and V) stay inside L2 between the score and the P V pass.
    const int step = decode ? decode_step() : NC;
    for (std::int64_t j0 = jb / step * step; j0 < je; j0 += step) {
      const float* packed_tile = packed;
      if (packed) packed += tile_floats();
      const int nc = static_cast<int>(std::min<std::int64_t>(step, je - j0));
      bool full = true;
      bool any = false;
      for (int ii = 0; ii < nq; ++ii) {
        const RowRange& rr = sc.rows[ii];
        if (rr.lo > j0 || rr.hi < j0 + nc) full = false;
        if (std::max(rr.lo, j0) < std::min(rr.hi, j0 + nc)) any = true;
      }
      if (!any) continue;
      if (sc.progress) sc.progress->poll();
      if (decode) {
        decode_tile(sd, t, sc, M, nq, j0, nc, full);
      } else {
        prefill_tile(sd, t, sc, M, nq, j0, nc, full, packed_tile);
      }
    }

    // Finish: normalise and write, or hand the unnormalised state to the merge.
    if (t.part >= 0) {
      std::memcpy(part_o, o, sizeof(float) * static_cast<std::size_t>(M) * dvp);
      for (int r = 0; r < M; ++r) part_st[r] = sc.st[r];
      return;
    }
    for (int g = 0; g < gq; ++g)
      for (int ii = 0; ii < nq; ++ii) {
        const int r = g * nq + ii;
        write_row(sd, t.hk * group + g, t.q0 + ii, o + r * dvp, sc.st[r]);
      }
  }

  // Packs keys [j0, j0 + nc) of KV head hk: kt [d][NC] = K^T in fp32 (columns past nc
  // zero) and vp [nc][dvp] = V in fp32 (padding columns zero). `staging` holds d floats.
  // With qv, kt is [dk_rows][NC]: K^T, zero rows up to dqa, then V^T (from vp).
  void pack_tile(const SeqDesc& sd, int hk, std::int64_t j0, int nc, float* kt, float* vp,
                 float* staging) const {
    if constexpr (E::kMatrix) return E::pack_tile(*this, sd, hk, j0, nc, kt);  // E hook
    for (int j = 0; j < nc; ++j) {
      convert_row(k_row(sd, j0 + j, hk), p.d, 1.0f, staging);
      for (int c = 0; c < p.d; ++c) kt[c * NC + j] = staging[c];
    }
    if (nc < NC)
      for (int c = 0; c < p.d; ++c) std::fill(kt + c * NC + nc, kt + (c + 1) * NC, 0.0f);
    for (int j = 0; j < nc; ++j) convert_row(v_row(sd, j0 + j, hk), p.d_v, 1.0f, vp + j * dvp);
    if (has_qv) {
      std::fill(kt + p.d * NC, kt + dqa * NC, 0.0f);
      float* vt = kt + dqa * NC;
      for (int j = 0; j < nc; ++j)
        for (int c = 0; c < p.d_v; ++c) vt[c * NC + j] = vp[j * dvp + c];
      if (nc < NC)
        for (int c = 0; c < p.d_v; ++c) std::fill(vt + c * NC + nc, vt + (c + 1) * NC, 0.0f);
    }
  }

  // Diagonal sub-tiles: on a masked tile, a block of MR rows only needs the key
  // columns up to the last one any of its rows sees (lim); the columns past it are
  // -inf for every row of the block, so S and P V stop there (rounded up to the
  // micro-kernel width for S), and a block that sees nothing is skipped (its rows
  // keep alpha = 1 and P = 0 from softmax_tile). On causal prefill this removes
  // the hidden upper triangle of each diagonal tile.
  void block_limits(Scratch& sc, int M, int nq, std::int64_t j0, int nc, bool full) const {
    int* lim = sc.lim.get();
    for (int r0 = 0, bi = 0; r0 < M; r0 += MR, ++bi) {
      lim[bi] = nc;
      if (full) continue;
      std::int64_t hi = 0;
      for (int r = r0; r < std::min(MR + r0, M); ++r) hi = std::max(hi, sc.rows[r % nq].hi - j0);
      lim[bi] = static_cast<int>(std::clamp<std::int64_t>(hi, 0, nc));
    }
  }

  // One key tile of the prefill kernel. `packed` = this tile's kt followed by vp when
  // the call pre-packed K/V (shared by every query block of the head), else nullptr.
  void prefill_tile(const SeqDesc& sd, const Task& t, Scratch& sc, int M, int nq, std::int64_t j0,
                    int nc, bool full, const float* packed) const {
    if constexpr (E::kMatrix) return E::prefill_tile(*this, sd, t, sc, M, nq, j0, nc, full, packed);
    const float* kt = packed;
    const float* vp = packed ? packed + dk_rows * NC : nullptr;
    if (!packed) {
      pack_tile(sd, t.hk, j0, nc, sc.kt.get(), sc.vp.get(), sc.s.get());
      kt = sc.kt.get();
      vp = sc.vp.get();
    }
    for (int j = 0; j < nc; ++j) sc.vrow_f[j] = vp + j * dvp;
    const int ncv = static_cast<int>(round_up(nc, NV * L));
    int* lim = sc.lim.get();
    block_limits(sc, M, nq, j0, nc, full);
    // S = Q K^T over all M rows in blocks of MR rows.
    for (int r0 = 0, bi = 0; r0 < M; r0 += MR, ++bi) {
      const int rows = std::min(MR, M - r0);
      if (lim[bi] > 0)
        qk_dispatch(rows, sc.q.get() + r0 * dq, dq, kt, dk_rows, sc.s.get() + r0 * NC,
                    static_cast<int>(round_up(lim[bi], NV * L)));
    }
    softmax_tile(sc, M, nq, j0, nc, ncv, full);
    // O = O * alpha + P V over all M rows.
    for (int r0 = 0, bi = 0; r0 < M; r0 += MR, ++bi) {
      const int rows = std::min(MR, M - r0);
      if (lim[bi] > 0)
        pv_dispatch<float>(rows, sc.s.get() + r0 * NC, sc.vrow_f.get(), lim[bi], dvp, 0,
                           sc.alpha.get() + r0, sc.o.get() + r0 * dvp, dvp);
    }
  }

  // Decode tile order: key-major for fp32 K/V when the backend asks for it
  // (EngineOptions::decode_order; memory bound there, and K and V are each read as one
  // ascending stream); head-major otherwise, and always for 2-byte K/V (half the bytes
  // per key, so the arithmetic bounds it, and head-major keeps the P V accumulators in
  // registers: 25 against 37 ns per key and head on AVX-512).
  bool key_major_decode() const { return sizeof(T) == 4 && p.decode_key_major; }
  // Keys per decode tile (a decode engine picks its own, E::kDecodeTile).
  int decode_step() const {
    if constexpr (kDecodeEngine) return E::kDecodeTile;
    return key_major_decode() ? kDecodeKeyMajorTile : kDecodeKeyTile;
  }

  // Row pointers of a decode tile (head t.hk; other heads add the head stride): the K/V
  // rows of keys [j0, j0 + nc) into kbase / vbase, and the rows `ahead` keys later into
  // kpf_base / vpf_base for entries [0, npf) (within the task's key range; past its end
  // the current rows, already cached, stand in). The cache page lookup runs once per key.
  void decode_tile_rows_of(const SeqDesc& sd, const Task& t, Scratch& sc, std::int64_t j0, int nc,
                           int npf, std::int64_t ahead) const {
    const T** kb = sc.kbase.get();
    const T** vb = sc.vbase.get();
    rows_of(sd.k, j0, nc, t.hk, kb);
    rows_of(sd.v, j0, nc, t.hk, vb);
    const std::int64_t pj0 = j0 + ahead;
    const int nin = static_cast<int>(std::clamp<std::int64_t>(t.ke - pj0, 0, npf));
    rows_of(sd.k, pj0, nin, t.hk, sc.kpf_base.get());
    rows_of(sd.v, pj0, nin, t.hk, sc.vpf_base.get());
    for (int j = nin; j < npf; ++j) {
      sc.kpf_base[j] = kb[std::min(j, nc - 1)];
      sc.vpf_base[j] = vb[std::min(j, nc - 1)];
    }
  }
  // rows[j] = the row of key t0 + j, KV head hk, for j < n: the (paged) cache lookup
  // once per run of keys that follow each other in memory.
  static void rows_of(const KvRows& kv, std::int64_t t0, int n, int hk, const T** rows) {
    const std::int64_t stride = kv_row_stride(kv);
    for (int j = 0; j < n;) {
      const T* r = reinterpret_cast<const T*>(kv.base) + kv_rows_offset(kv, t0 + j, hk);
      const int run = static_cast<int>(kv_rows_run(kv, t0 + j, n - j));
      for (int i = 0; i < run; ++i) rows[j + i] = r + i * stride;
      j += run;
    }
  }

  void decode_tile(const SeqDesc& sd, const Task& t, Scratch& sc, int M, int nq, std::int64_t j0,
                   int nc, bool full) const {
    if constexpr (kDecodeEngine) return E::decode_tile(*this, sd, t, sc, M, nq, j0, nc, full);
    if (key_major_decode()) {
      decode_tile_key_major(sd, t, sc, M, nq, j0, nc, full);
    } else {
      decode_tile_head_major(sd, t, sc, M, nq, j0, nc, full);
    }
  }

  // ---------------- decode (key-major) ----------------

  // Calls f(std::integral_constant<int, R>{}, r0) for rows [r0, r0 + R) covering
  // [0, rows) in chunks of at most 4 rows (the register block of qk_key / pv_key).
  template <int RH, class F>
  static void row_chunks(int rows, F&& f) {
    if constexpr (RH > 0) {
      int r0 = 0;
#pragma GCC unroll 4
      for (; r0 + 4 <= RH; r0 += 4) f(std::integral_constant<int, 4>{}, r0);
      if constexpr (RH % 4 != 0) f(std::integral_constant<int, RH % 4>{}, r0);
      return;
    }
    int r0 = 0;
    for (; r0 + 4 <= rows; r0 += 4) f(std::integral_constant<int, 4>{}, r0);
    switch (rows - r0) {
      case 3:
        return f(std::integral_constant<int, 3>{}, r0);
      case 2:
        return f(std::integral_constant<int, 2>{}, r0);
      case 1:
        return f(std::integral_constant<int, 1>{}, r0);
      default:
        return;
    }
  }

  // Decode scores against one key row of one KV head: s[r * NC] = q[r] . krow for R
  // rows. Two accumulators per row (even / odd vector steps) give 2R independent FMA
  // chains; each row's horizontal sum follows at once (deferring the sums to one
  // transposed reduction over all rows of the key measured 5 ns per key and head
  // slower). Each K load is paired with a prefetch of the same offset in the row `kf`
  // (kDecodeKeyMajorPrefetchTiles tiles ahead).
  // d: values of the dot product (p.d; p.d_v for the qv pass, which adds to s when
  // `accumulate`, with q at the qv part and kr / kf the V rows).
  template <int R>
  void qk_key(const float* q, const T* kr, const T* kf, float* s, int d, bool accumulate) const {
    V acc0[R], acc1[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = S::zero();
    int c = 0;
    for (; c + 2 * L <= d; c += 2 * L) {
      prefetch_l2<L * sizeof(T)>(kf + c);
      prefetch_l2<L * sizeof(T)>(kf + c + L);
      const V b0 = S::load(kr + c);
      const V b1 = S::load(kr + c + L);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc0[r] = S::fma(S::load(q + r * dq + c), b0, acc0[r]);
        acc1[r] = S::fma(S::load(q + r * dq + c + L), b1, acc1[r]);
      }
    }
    if (c + L <= d) {
      prefetch_l2<L * sizeof(T)>(kf + c);
      const V b0 = S::load(kr + c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc0[r] = S::fma(S::load(q + r * dq + c), b0, acc0[r]);
      c += L;
    }
    if (c < d) {  // q is zero padded to dq
      const V b1 = S::load_partial(kr + c, d - c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc1[r] = S::fma(S::load(q + r * dq + c), b1, acc1[r]);
    }
    if (accumulate) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) s[r * NC] += S::reduce_add(S::add(acc0[r], acc1[r]));
      return;
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) s[r * NC] = S::reduce_add(S::add(acc0[r], acc1[r]));
  }

  // Decode O += P V for one key row of one KV head: o[r] += p[r] * vrow for R rows
  // (p[r] at pm[r * NC], o rows dvp apart). Each V load is paired with a prefetch of
  // the same offset in the row `vf`.
  template <int R>
  void pv_key(const float* pm, const T* vr, const T* vf, float* o) const {
    V a[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r] = S::set1(pm[r * NC]);
    // Locals: the vector stores may alias any object, members would be re-read.
    const int ld = dvp, dv = p.d_v, dfull = dv / L * L;
    int c = 0;
    for (; c < dfull; c += L) {
      prefetch_l2<L * sizeof(T)>(vf + c);
      const V b = S::load(vr + c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        S::store(o + r * ld + c, S::fma(a[r], b, S::load(o + r * ld + c)));
    }
    if (c < dv) {
      const V b = S::load_partial(vr + c, dv - c);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        S::store(o + r * ld + c, S::fma(a[r], b, S::load(o + r * ld + c)));
    }
  }

  // One key tile of the decode kernel, all nh KV heads of the task; rows of head hh
  // are r in [hh * mh, (hh + 1) * mh).
  //
  // Order: key-major. For each key of the tile, the K rows of all nh heads (one
  // contiguous [nh, d] piece of a [.., h_k, d] cache), then the next key; after the
  // softmax, V the same way, with the accumulators O (nh * mh rows) in L1. So K and V
  // are each read as one ascending stream, which the hardware prefetchers follow, and
  // every load is paired with a prefetch of the same offset kDecodeKeyMajorPrefetchTiles
  // tiles ahead, i.e. the prefetches form the same single stream. Measurements:
  // docs/cpu-backend.md, seventh round.
  void decode_tile_key_major(const SeqDesc& sd, const Task& t, Scratch& sc, int M, int nq,
                             std::int64_t j0, int nc, bool full) const {
    switch (M / t.nh) {
      case 1:
        return decode_tile_rows<1>(sd, t, sc, M, nq, j0, nc, full);
      case 2:
        return decode_tile_rows<2>(sd, t, sc, M, nq, j0, nc, full);
      case 4:
        return decode_tile_rows<4>(sd, t, sc, M, nq, j0, nc, full);
      case 8:
        return decode_tile_rows<8>(sd, t, sc, M, nq, j0, nc, full);
      default:
        return decode_tile_rows<0>(sd, t, sc, M, nq, j0, nc, full);
    }
  }
  // RH: rows per KV head when known at compile time (0: run time, M / t.nh).
  template <int RH>
  void decode_tile_rows(const SeqDesc& sd, const Task& t, Scratch& sc, int M, int nq,
                        std::int64_t j0, int nc, bool full) const {
    const int mh = RH > 0 ? RH : M / t.nh;  // rows of one KV head
    const int ncv = static_cast<int>(round_up(nc, L));
    const std::int64_t khs = kv_head_stride(sd.k), vhs = kv_head_stride(sd.v);
    decode_tile_rows_of(sd, t, sc, j0, nc, nc,
                        std::int64_t{kDecodeKeyMajorPrefetchTiles} * kDecodeKeyMajorTile);
    const T* const* kb = sc.kbase.get();
    const T* const* vb = sc.vbase.get();
    const T* const* kfb = sc.kpf_base.get();
    const T* const* vfb = sc.vpf_base.get();
    const float* const q = sc.q.get();
    float* const s = sc.s.get();
    float* const o = sc.o.get();

    // S = Q K^T, key by key.
    for (int j = 0; j < nc; ++j) {
      for (int hh = 0; hh < t.nh; ++hh) {
        row_chunks<RH>(mh, [&](auto rc, int r0) {
          const int r = hh * mh + r0;
          qk_key<decltype(rc)::value>(q + r * dq, kb[j] + hh * khs, kfb[j] + hh * khs,
                                      s + r * NC + j, p.d, false);
          if (has_qv)  // + qv . v over the V row P V reads below
            qk_key<decltype(rc)::value>(q + r * dq + dqa, vb[j] + hh * vhs, vfb[j] + hh * vhs,
                                        s + r * NC + j, p.d_v, true);
        });
      }
    }
    softmax_tile(sc, M, nq, j0, nc, ncv, full);

    // O = O * alpha + P V.
    const int ld = dvp;
    for (int r = 0; r < M; ++r) {
      const float al = sc.alpha.get()[r];
      if (al == 1.0f) continue;
      const V va = S::set1(al);
      for (int c = 0; c < ld; c += L) S::store(o + r * ld + c, S::mul(va, S::load(o + r * ld + c)));
    }
    for (int j = 0; j < nc; ++j) {
      for (int hh = 0; hh < t.nh; ++hh) {
        row_chunks<RH>(mh, [&](auto rc, int r0) {
          const int r = hh * mh + r0;
          pv_key<decltype(rc)::value>(s + r * NC + j, vb[j] + hh * vhs, vfb[j] + hh * vhs,
                                      o + r * dvp);
        });
      }
    }
  }

  // One key tile of the decode kernel in head-major order (2-byte K/V, and fp32 K/V
  // unless key-major is asked for), all nh KV heads of the task.
  // Rows of head hh are r in [hh * mh, (hh + 1) * mh). Loop order: head-major within
  // the tile (for each head, its nc key rows, then the next head), K for the scores,
  // then V for O += P V with the accumulators in registers across the tile's keys,
  // each row read exactly once. Key row pointers are resolved once per key (the cache
  // page lookup) and offset by the head stride.
  //
  // Prefetch: every load of the scores and of P V is paired with a prefetcht2 of the
  // same head's row kDecodePrefetchTiles tiles ahead, so the misses of later tiles are
  // in flight while this tile computes and the prefetches come at the rate the data
  // is consumed (a burst of prefetches per tile, as tried first, stalled the loads
  // behind it). Measurements: docs/cpu-backend.md, fourth round.
  // Keys the head-major decode prefetches ahead: kDecodePrefetchTiles tiles for 2- and
  // 4-byte rows; for 1-byte (fp8) rows twice as many keys, the same bytes in flight as
  // bf16 (with the same key distance fp8 had half the bytes in flight and, where memory
  // latency bounds the loop, read no faster than bf16).
  static constexpr std::int64_t kDecodePrefetchKeys =
      std::int64_t{kDecodePrefetchTiles} * kDecodeKeyTile * (sizeof(T) == 1 ? 2 : 1);

  void decode_tile_head_major(const SeqDesc& sd, const Task& t, Scratch& sc, int M, int nq,
                              std::int64_t j0, int nc, bool full) const {
    const int mh = M / t.nh;  // rows of one KV head
    const int ncv = static_cast<int>(round_up(nc, L));
    const std::int64_t khs = kv_head_stride(sd.k), vhs = kv_head_stride(sd.v);
    // Prefetch rows for the padded key count too (the score kernel takes KB at a time).
    decode_tile_rows_of(sd, t, sc, j0, nc, ncv, kDecodePrefetchKeys);
    const T* const* kb = sc.kbase.get();
    const T* const* vb = sc.vbase.get();
    const T* const* kfb = sc.kpf_base.get();
    const T* const* vfb = sc.vpf_base.get();
    const T** kp = sc.kptr.get();
    const T** kf = sc.kpf.get();
    for (int hh = 0; hh < t.nh; ++hh) {
      for (int j = 0; j < nc; ++j) kp[j] = kb[j] + hh * khs;
      for (int j = nc; j < ncv; ++j) kp[j] = kp[nc - 1];  // padding (masked)
      for (int j = 0; j < ncv; ++j) kf[j] = kfb[j] + hh * khs;
      qk_rows_dispatch(mh, sc.q.get() + hh * mh * dq, kp, kf, nc, sc.s.get() + hh * mh * NC, p.d,
                       false);
      if (has_qv) {  // + qv . v over the V rows P V reads below (padding as for K)
        const T** vq = sc.vrow_t.get();
        const T** vqf = sc.vpf.get();
        for (int j = 0; j < nc; ++j) vq[j] = vb[j] + hh * vhs;
        for (int j = nc; j < ncv; ++j) vq[j] = vq[nc - 1];
        for (int j = 0; j < ncv; ++j) vqf[j] = vfb[j] + hh * vhs;
        qk_rows_dispatch(mh, sc.q.get() + hh * mh * dq + dqa, vq, vqf, nc,
                         sc.s.get() + hh * mh * NC, p.d_v, true);
      }
    }
    softmax_tile(sc, M, nq, j0, nc, ncv, full);
    const int tail = p.d_v % L;
    const T** vp = sc.vrow_t.get();
    const T** vf = sc.vpf.get();
    for (int hh = 0; hh < t.nh; ++hh) {
      for (int j = 0; j < nc; ++j) vp[j] = vb[j] + hh * vhs;
      for (int j = 0; j < nc; ++j) vf[j] = vfb[j] + hh * vhs;
      for (int r0 = hh * mh; r0 < (hh + 1) * mh; r0 += 8) {
        const int rows = std::min(8, (hh + 1) * mh - r0);
        float* const sr = sc.s.get() + r0 * NC;
        float* const orow = sc.o.get() + r0 * dvp;
        const float* const al = sc.alpha.get() + r0;
        // Up to 4 rows (GQA groups of 4): wider column blocks.
        if (rows <= 4) {
          pv_wide_dispatch(rows, sr, vp, nc, dvp, tail, al, orow, dvp, vf);
        } else {
          pv_dispatch<T>(rows, sr, vp, nc, dvp, tail, al, orow, dvp, vf);
        }
      }
    }
  }

  // out row = acc / d (0 for an empty row; fp8: times the v descale), lse = m + log(d)
  // (-inf when empty). This
  // runs once per row after any split merge, so the attention sink (softmax_state.hpp
  // sink_scale) is applied here exactly once; the LSE excludes it.
  void write_row(const SeqDesc& sd, int hq, std::int64_t i, const float* acc,
                 const SoftmaxState& st) const {
    float inv = st.inv_sum() * p.v_factor(sd, hq / group);  // fp8: v descale once
    if (p.sinks) inv *= sink_scale(st.lse(), p.sinks[hq]);
    const std::int64_t off = sd.out_off + i * p.out_row_stride + hq * p.out_head_stride;
    if (p.out_dtype == DType::kF32) {
      float* dst = static_cast<float*>(p.out) + off;
      for (int c = 0; c < p.d_v; ++c) dst[c] = acc[c] * inv;
    } else {
      store_row_converted(p.out, off, p.out_dtype, acc, inv, p.d_v);
    }
    if (p.lse) p.lse[sd.lse_off + hq * p.lse_head_stride + i] = st.lse();
  }

  // ---------------- the whole call ----------------

  void run(int threads) const {
    // Task list: (sequence, KV head, query block, key split).
    std::vector<Task> tasks;
    struct Merge {
      int seq, hk, nh, q0, nq;
      std::int64_t first_part;
      int splits;
    };
    std::vector<Merge> merges;
    std::int64_t parts = 0;

    // Prefill sequences with several query blocks per KV head read every K/V row once
    // per block. Their K/V are converted and packed into tiles ONCE per call (kt [d][NC]
    // then vp [NC][dvp] per tile, tiles of one (sequence, head) consecutive), so tasks
    // stream contiguous fp32 tiles instead of gathering rows that sit h_k * d elements
    // apart (one page or more each: TLB misses) once per query block.
    const int nseq = static_cast<int>(p.seqs.size());
    std::vector<std::int64_t> pack_base(static_cast<std::size_t>(nseq), -1);
    std::int64_t pack_total = 0;
    for (int si = 0; si < nseq; ++si) {
      const SeqDesc& sd = p.seqs[static_cast<std::size_t>(si)];
      if (sd.s_q <= 0 || sd.s_k <= 0 || is_decode(sd.s_q, group) ||
          num_query_blocks(sd.s_q, group) < 2)
        continue;
      pack_base[static_cast<std::size_t>(si)] = pack_total;
      pack_total += std::int64_t{p.h_k} * ((sd.s_k + NC - 1) / NC) * tile_floats();
    }
    if (pack_total > kMaxPackedFloats) {  // too large: pack per task instead
      std::fill(pack_base.begin(), pack_base.end(), -1);
      pack_total = 0;
    }
    BufferPool::Lease pack_lease;
    std::vector<PackItem> pack_items;
    if (pack_total > 0)
      take_scratch(p.pool, static_cast<std::size_t>(pack_total) * sizeof(float), pack_lease);
    float* const pack_buf = static_cast<float*>(pack_lease.data());

    for (int si = 0; si < nseq; ++si) {
      const SeqDesc& sd = p.seqs[static_cast<std::size_t>(si)];
      if (sd.s_q <= 0) continue;
      const int mq = query_block_rows(sd.s_q, group);
      std::int64_t chunk = std::max<std::int64_t>(sd.s_k, 1);
      int splits = 1;
      if (sd.num_splits > 1 && sd.s_k > NC) {
        chunk = round_up((sd.s_k + sd.num_splits - 1) / sd.num_splits, NC);
        splits = static_cast<int>((sd.s_k + chunk - 1) / chunk);
      }
      const std::int64_t ntiles = (sd.s_k + NC - 1) / NC;
      const bool decode = is_decode(sd.s_q, group);
      const int hpt = decode ? decode_heads_per_task(sd.s_q, group, p.h_k) : 1;
      for (int hk = 0; hk < p.h_k; hk += hpt) {
        const int nh = std::min(hpt, p.h_k - hk);
        float* packed = nullptr;
        if (pack_base[static_cast<std::size_t>(si)] >= 0) {
          packed = pack_buf + pack_base[static_cast<std::size_t>(si)] + hk * ntiles * tile_floats();
          for (std::int64_t ti = 0; ti < ntiles; ++ti)
            pack_items.push_back({si, hk, ti * NC, packed + ti * tile_floats()});
        }
        for (int q0 = 0; q0 < sd.s_q; q0 += mq) {
          const int nq = std::min(mq, sd.s_q - q0);
          if (splits == 1) {
            tasks.push_back({si, hk, nh, q0, nq, 0, sd.s_k, -1, packed});
            continue;
          }
          merges.push_back({si, hk, nh, q0, nq, parts, splits});
          for (int sp = 0; sp < splits; ++sp) {
            const std::int64_t kb = sp * chunk;
            tasks.push_back(
                {si, hk, nh, q0, nq, kb, std::min(sd.s_k, kb + chunk), parts++, packed});
          }
        }
      }
    }
    // Split partials: o [parts][max_rows][dvp] then their states [parts][max_rows].
    BufferPool::Lease part_lease;
    const std::size_t part_o_floats = static_cast<std::size_t>(parts) * max_rows * dvp;
    if (parts > 0)
      take_scratch(p.pool,
                   part_o_floats * sizeof(float) +
                       static_cast<std::size_t>(parts) * max_rows * sizeof(SoftmaxState),
                   part_lease);
    float* const part_o = static_cast<float*>(part_lease.data());
    SoftmaxState* const part_st = reinterpret_cast<SoftmaxState*>(part_o + part_o_floats);

    const std::int64_t ntasks = static_cast<std::int64_t>(tasks.size());
    const int nthreads =
        static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, ntasks)));
    std::vector<Scratch> scratch(static_cast<std::size_t>(nthreads));
    for (Scratch& sc : scratch) init_scratch(sc);
    ProgressThrottle progress(p.progress);
    if (progress.active()) scratch[0].progress = &progress;
#pragma omp parallel num_threads(nthreads)
    {
      // Thread 0 of this region is the calling thread: only it polls the hook.
      Scratch& sc = scratch[static_cast<std::size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic, 4)
      for (std::size_t pi = 0; pi < pack_items.size(); ++pi) {
        const PackItem& it = pack_items[pi];
        const SeqDesc& sd = p.seqs[static_cast<std::size_t>(it.seq)];
        const int nc = static_cast<int>(std::min<std::int64_t>(NC, sd.s_k - it.j0));
        pack_tile(sd, it.hk, it.j0, nc, it.dst, it.dst + dk_rows * NC, sc.s.get());
        if (sc.progress) sc.progress->poll();
      }
#pragma omp for schedule(dynamic, 1)
      for (std::int64_t ti = 0; ti < ntasks; ++ti) {
        const Task& t = tasks[static_cast<std::size_t>(ti)];
        float* po = t.part >= 0 ? part_o + t.part * max_rows * dvp : nullptr;
        SoftmaxState* ps = t.part >= 0 ? part_st + t.part * max_rows : nullptr;
        run_task(t, sc, po, ps);
        if (sc.progress) sc.progress->poll();
      }

      // Split-KV reduction: merge the splits' states row by row (docs/semantics.md section 5).
      float* acc = sc.vp.get();  // free between tasks: the merge's accumulator row
#pragma omp for schedule(dynamic, 1)
      for (std::size_t mi = 0; mi < merges.size(); ++mi) {
        const Merge& mg = merges[mi];
        const SeqDesc& sd = p.seqs[static_cast<std::size_t>(mg.seq)];
        const int M = mg.nq * group * mg.nh;
        for (int r = 0; r < M; ++r) {
          SoftmaxState st;
          for (int c = 0; c < p.d_v; ++c) acc[c] = 0.0f;
          for (int sp = 0; sp < mg.splits; ++sp) {
            const std::int64_t part = mg.first_part + sp;
            const SoftmaxState& ps = part_st[static_cast<std::size_t>(part * max_rows + r)];
            const float* po = part_o + (part * max_rows + r) * dvp;
            const SoftmaxState::Scales f = st.merge(ps);
            for (int c = 0; c < p.d_v; ++c) acc[c] = acc[c] * f.self + po[c] * f.other;
          }
          write_row(sd, mg.hk * group + r / mg.nq, mg.q0 + r % mg.nq, acc, st);
        }
      }
    }

    // Rows past seqused_q: output 0, LSE -inf.
    const SoftmaxState empty;
    float* zeros = scratch[0].vp.get();
    for (int c = 0; c < p.d_v; ++c) zeros[c] = 0.0f;
    for (const SeqDesc& sd : p.seqs)
      for (int i = std::max(sd.s_q, 0); i < sd.s_q_slots; ++i)
        for (int hq = 0; hq < p.h; ++hq) write_row(sd, hq, i, zeros, empty);
  }
};

template <class S>
void run_flash_fwd(const AttnProblem& p, int threads) {
  switch (p.dtype) {
    case DType::kF32:
      FlashFwd<S, float>(p).run(threads);
      return;
    case DType::kBF16:
      FlashFwd<S, bf16_t>(p).run(threads);
      return;
    case DType::kF16:
      FlashFwd<S, f16_t>(p).run(threads);
      return;
    case DType::kFP8E4M3:
      FlashFwd<S, fp8e4m3_t>(p).run(threads);
      return;
    default:
      throw_unsupported_dtype(p.dtype);
  }
}

}  // namespace
}  // namespace ringattn::detail::cpu
