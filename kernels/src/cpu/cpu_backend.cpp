// The optimised CPU backend ("cpu-amx" / "cpu-avx512-bf16" / "cpu-avx512" / "cpu-avx2" /
// "cpu-scalar").
//
// Every entry point is turned into one AttnProblem (flash_fwd_cpu.hpp): a list of
// independent sequences with their lengths, mask diagonal and K/V row addressing.
// The ISA is fixed when the backend is created: one function pointer to the
// instantiation of the kernel templates for that ISA (run-time dispatch happens once).
//
//   forward          dense: one sequence per batch element; varlen: one per segment
//   forward_kvcache  kvcache_append (in place, rotary on k_new), q rotated into scratch
//                    when rotary applies, then one sequence per batch element whose
//                    keys are resolved through kvcache_prepare.hpp (pages, leftpad,
//                    cache_batch_idx)
//   plan_kvcache     split-KV plan: key splits per sequence (choose_num_splits)
//   mla_decode       mla_decode_cpu (mla/mla_kernels.hpp)
#include <cmath>
#include <cstdint>
#include <vector>

#include "backend.hpp"
#include "cpu/flash_fwd_cpu.hpp"
#include "cpu/simd_math.hpp"
#include "kvcache_prepare.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {
namespace {

using cpu::AttnProblem;
using cpu::SeqDesc;

using KernelFn = void (*)(const AttnProblem&, int);

// The vector ISA of a tier: kAmx and kAvx512Bf16 run the AVX-512 code except where
// their matrix engine applies (bf16 storage, kernel_for_problem).
CpuIsa vector_isa(CpuIsa isa) {
  return isa == CpuIsa::kAmx || isa == CpuIsa::kAvx512Bf16 ? CpuIsa::kAvx512 : isa;
}

KernelFn kernel_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAmx:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512:
      return &cpu::flash_fwd_avx512;
    case CpuIsa::kAvx2:
      return &cpu::flash_fwd_avx2;
    case CpuIsa::kScalar:
      return &cpu::flash_fwd_scalar;
  }
  return &cpu::flash_fwd_scalar;
}

// Head-major fp32 decode (every sequence at most kDecodeMaxRows rows per KV head) runs
// the 256-bit kernel on AVX-512 machines: with 64-byte vectors each load is a whole
// cache line and that order measured 10-15 % slower on one thread of a Zen 5 and no
// faster on a Xeon (docs/cpu-backend.md). Key-major fp32 decode, bf16 / fp16 decode
// and all prefill keep AVX-512.
// kAmx / kAvx512Bf16: bf16 storage runs flash_fwd_amx / flash_fwd_avx512_bf16 (engine
// prefill, AVX-512 decode); on kAvx512Bf16, fp8 e4m3 runs flash_fwd_fp8_avx512_bf16_vbmi
// where the CPU has AVX512_VBMI (vdpbf16ps decode, AVX-512 prefill; on the Sapphire Rapids
// Xeon that decode measured slower than the fp32 kernel, so cpu-amx keeps the latter);
// other dtypes the AVX-512 kernels (docs/cpu-backend.md). cpu-amx runs calls with
// qv on the AVX-512 vector tiles (its AMX tile has no qv product).
KernelFn kernel_for_problem(CpuIsa isa, const AttnProblem& a) {
  if (a.dtype == DType::kBF16 && !a.qv && isa == CpuIsa::kAmx) return &cpu::flash_fwd_amx;
  if (a.dtype == DType::kBF16 && isa == CpuIsa::kAvx512Bf16) return &cpu::flash_fwd_avx512_bf16;
  if (a.dtype == DType::kFP8E4M3 && isa == CpuIsa::kAvx512Bf16 && cpu_has_avx512_vbmi())
    return &cpu::flash_fwd_fp8_avx512_bf16_vbmi;
  isa = vector_isa(isa);
  if (isa == CpuIsa::kAvx512 && a.dtype == DType::kF32 && !a.decode_key_major) {
    const int group = a.h / a.h_k;
    bool decode = true;
    for (const SeqDesc& sd : a.seqs) decode = decode && cpu::is_decode(sd.s_q, group);
    if (decode) return &cpu::flash_fwd_avx2;
  }
  return kernel_for(isa);
}

// d_score: length of the score's dot product (d, or d + d_v with qv).
void set_mask(AttnProblem& a, const MaskParams& m, int d_score) {
  a.scale = m.scale != 0.0f ? m.scale : 1.0f / std::sqrt(static_cast<float>(d_score));
  a.softcap = m.softcap;
  a.w_left = m.window_left;
  a.w_right = m.causal ? 0 : m.window_right;
  a.sinks = m.sinks;
  a.chunk = m.attention_chunk;
  a.chunk_stride = m.chunk_stride;
}

// The chunk-rule positions of batch element bi (MaskParams::chunk_q_pos), after sd.shift.
void set_chunk_pos(SeqDesc& sd, const MaskParams& m, int bi) {
  sd.q_pos = m.chunk_q_pos ? m.chunk_q_pos[bi] : sd.shift;
  sd.k_pos = m.chunk_k_pos ? m.chunk_k_pos[bi] : 0;
}

// fp8 storage: the per-(batch element, KV head) factors of AttnProblem (fp8_qk, fp8_v)
// from the descales (nullable = 1) and the 256 of each e4m3 load (simd_math.hpp).
void set_fp8_factors(AttnProblem& a, const Fp8Descale& ds, int b) {
  if (a.dtype != DType::kFP8E4M3) return;
  const std::size_t n = static_cast<std::size_t>(b) * a.h_k;
  a.fp8_qk.resize(n);
  a.fp8_v.resize(n);
  const auto at = [](const float* x, std::int64_t stride, int bi, int g) {
    return x ? x[bi * stride + g] : 1.0f;
  };
  constexpr float k256 = cpu::kFp8ViaHalfScale;
  for (int bi = 0; bi < b; ++bi) {
    for (int g = 0; g < a.h_k; ++g) {
      const std::size_t i = static_cast<std::size_t>(bi) * a.h_k + g;
      a.fp8_qk[i] =
          k256 * k256 * at(ds.q, ds.q_batch_stride, bi, g) * at(ds.k, ds.k_batch_stride, bi, g);
      a.fp8_v[i] = k256 * at(ds.v, ds.v_batch_stride, bi, g);
    }
  }
}

// Tasks a call has without splitting keys (cpu::unsplit_tasks per sequence).
std::int64_t base_tasks(const std::vector<SeqDesc>& seqs, int h, int h_k) {
  std::int64_t n = 0;
  for (const SeqDesc& sd : seqs) n += cpu::unsplit_tasks(sd.s_q, h, h_k);
  return n;
}

// num_splits: 0 = heuristic, 1 = none, n > 1 = n splits for every sequence.
void assign_splits(std::vector<SeqDesc>& seqs, int requested, int h, int h_k, int threads) {
  const std::int64_t base = base_tasks(seqs, h, h_k);
  for (SeqDesc& sd : seqs)
    sd.num_splits = requested > 0 ? requested : cpu::choose_num_splits(sd.s_k, base, threads);
}

AttnProblem make_problem(const FwdParams& p, int threads) {
  AttnProblem a;
  a.dtype = p.dtype;
  a.out_dtype = p.out_dtype;
  a.h = p.h;
  a.h_k = p.h_k;
  a.d = p.d;
  a.d_v = p.d_v;
  a.q = p.q;
  a.q_row_stride = p.q_row_stride;
  a.q_head_stride = p.q_head_stride;
  a.out = p.out;
  a.out_row_stride = p.out_row_stride;
  a.out_head_stride = p.out_head_stride;
  a.lse = p.lse;
  a.progress = p.progress;
  a.qv = p.qv;
  a.qv_row_stride = p.qv_row_stride;
  a.qv_head_stride = p.qv_head_stride;
  set_mask(a, p.mask, p.qv ? p.d + p.d_v : p.d);
  const std::int64_t esize = static_cast<std::int64_t>(dtype_size(p.dtype));
  a.seqs.resize(static_cast<std::size_t>(p.b));
  if (p.is_varlen()) {
    // lse [h, total_q]
    a.lse_head_stride = p.cu_seqlens_q[p.b];
  } else {
    // lse [b, h, s_q]
    a.lse_head_stride = p.s_q;
  }
  for (int bi = 0; bi < p.b; ++bi) {
    SeqDesc& sd = a.seqs[static_cast<std::size_t>(bi)];
    std::int64_t k_off, v_off;
    if (p.is_varlen()) {
      const std::int64_t q0 = p.cu_seqlens_q[bi], k0 = p.cu_seqlens_k[bi];
      sd.s_q_slots = static_cast<int>(p.cu_seqlens_q[bi + 1] - q0);
      sd.s_q = p.seqused_q ? p.seqused_q[bi] : sd.s_q_slots;
      sd.s_k = p.seqused_k ? p.seqused_k[bi] : p.cu_seqlens_k[bi + 1] - k0;
      sd.q_off = q0 * p.q_row_stride;
      sd.qv_off = q0 * p.qv_row_stride;
      sd.out_off = q0 * p.out_row_stride;
      sd.lse_off = q0;
      k_off = k0 * p.k_row_stride;
      v_off = k0 * p.v_row_stride;
    } else {
      sd.s_q_slots = p.s_q;
      sd.s_q = p.seqused_q ? p.seqused_q[bi] : p.s_q;
      sd.s_k = p.seqused_k ? p.seqused_k[bi] : p.s_k;
      sd.q_off = bi * p.q_batch_stride;
      sd.qv_off = bi * p.qv_batch_stride;
      sd.out_off = bi * p.out_batch_stride;
      sd.lse_off = std::int64_t{bi} * p.h * p.s_q;
      k_off = bi * p.k_batch_stride;
      v_off = bi * p.v_batch_stride;
    }
    sd.shift = p.mask.mask_shift ? p.mask.mask_shift[bi] : sd.s_k - sd.s_q;
    set_chunk_pos(sd, p.mask, bi);
    sd.batch = bi;
    sd.k.base = static_cast<const char*>(p.k) + k_off * esize;
    sd.k.row_stride = p.k_row_stride;
    sd.k.head_stride = p.k_head_stride;
    sd.v.base = static_cast<const char*>(p.v) + v_off * esize;
    sd.v.row_stride = p.v_row_stride;
    sd.v.head_stride = p.v_head_stride;
  }
  assign_splits(a.seqs, p.num_splits, p.h, p.h_k, threads);
  set_fp8_factors(a, p.descale, p.b);
  return a;
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(CpuIsa isa, DecodeOrder order)
      : isa_(isa),
        key_major_(order == DecodeOrder::kKeyMajor ||
                   (order == DecodeOrder::kAuto && cpu_prefers_key_major_decode())) {}

  std::string name() const override { return std::string("cpu-") + isa_name(isa_); }
  std::string decode_order() const override { return key_major_ ? "key-major" : "head-major"; }

  void forward(const FwdParams& p, int threads) override {
    AttnProblem a = make_problem(p, threads);
    a.pool = &pool_;
    a.decode_key_major = key_major_;
    kernel_for_problem(isa_, a)(a, threads);
  }

  void forward_kvcache(const KvCacheParams& p, int threads) override {
    kvcache_append(p, threads);

    // Rotary rotates q: into a contiguous scratch [total_q, h, d] of the storage dtype.
    std::vector<unsigned char> q_rot;
    const void* q = p.q;
    std::int64_t q_batch = p.q_batch_stride, q_row = p.q_row_stride, q_head = p.q_head_stride;
    if (kv_has_rotary(p)) {
      q_rot.resize(static_cast<std::size_t>(kv_total_q(p) * p.h * p.d) * dtype_size(p.dtype));
      kvcache_prepare_q(p, q_rot.data(), p.dtype, threads);
      q = q_rot.data();
      q_head = p.d;
      q_row = std::int64_t{p.h} * p.d;
      q_batch = q_row * p.s_q;
    }

    AttnProblem a;
    a.dtype = p.dtype;
    a.out_dtype = p.out_dtype;
    a.h = p.h;
    a.h_k = p.h_k;
    a.d = p.d;
    a.d_v = p.d_v;
    a.q = q;
    a.q_row_stride = q_row;
    a.q_head_stride = q_head;
    a.out = p.out;
    a.out_row_stride = p.out_row_stride;
    a.out_head_stride = p.out_head_stride;
    a.lse = p.lse;
    a.lse_head_stride = p.cu_seqlens_q ? kv_total_q(p) : p.s_q;  // [h, total_q] / [b, h, s_q]
    a.qv = p.qv;                                                 // never rotated: read in place
    a.qv_row_stride = p.qv_row_stride;
    a.qv_head_stride = p.qv_head_stride;
    set_mask(a, p.mask, p.qv ? p.d + p.d_v : p.d);
    a.seqs.resize(static_cast<std::size_t>(p.b));
    for (int bi = 0; bi < p.b; ++bi) {
      SeqDesc& sd = a.seqs[static_cast<std::size_t>(bi)];
      sd.s_q = sd.s_q_slots = static_cast<int>(kv_s_q(p, bi));
      sd.s_k = kv_num_keys(p, bi);
      sd.shift = p.mask.mask_shift ? p.mask.mask_shift[bi] : sd.s_k - sd.s_q;
      set_chunk_pos(sd, p.mask, bi);
      sd.batch = bi;
      // Varlen queries: rows packed on one axis (cu_seqlens_q), batch strides unused.
      const std::int64_t row0 = kv_q_row0(p, bi);
      sd.q_off = p.cu_seqlens_q ? row0 * q_row : bi * q_batch;
      sd.out_off = kv_out_offset(p, bi, 0);
      sd.qv_off = kv_qv_offset(p, bi, 0);
      sd.lse_off = p.cu_seqlens_q ? row0 : std::int64_t{bi} * p.h * p.s_q;
      sd.k.base = static_cast<const char*>(p.k_cache);
      sd.k.cache = &p;
      sd.k.seq = bi;
      sd.v.base = static_cast<const char*>(p.v_cache);
      sd.v.cache = &p;
      sd.v.seq = bi;
      sd.v.is_v = true;
    }
    if (p.plan && p.plan->num_splits.size() == static_cast<std::size_t>(p.b)) {
      for (int bi = 0; bi < p.b; ++bi)
        a.seqs[static_cast<std::size_t>(bi)].num_splits =
            std::max(1, p.plan->num_splits[static_cast<std::size_t>(bi)]);
    } else {
      assign_splits(a.seqs, p.num_splits, p.h, p.h_k, threads);
    }
    set_fp8_factors(a, p.descale, p.b);
    a.pool = &pool_;
    a.decode_key_major = key_major_;
    kernel_for_problem(isa_, a)(a, threads);
  }

  SchedulerMetadata plan_kvcache(const KvCacheParams& p, int threads) override {
    std::vector<SeqDesc> seqs(static_cast<std::size_t>(p.b));
    for (int bi = 0; bi < p.b; ++bi) {
      seqs[static_cast<std::size_t>(bi)].s_q = static_cast<int>(kv_s_q(p, bi));
      seqs[static_cast<std::size_t>(bi)].s_k = kv_num_keys(p, bi);
    }
    assign_splits(seqs, p.num_splits, p.h, p.h_k, threads);
    SchedulerMetadata m;
    m.b = p.b;
    m.threads = threads;
    m.num_splits.reserve(seqs.size());
    for (const SeqDesc& sd : seqs) m.num_splits.push_back(sd.num_splits);
    return m;
  }

  void mla_sparse_prefill(const MlaSparsePrefillParams& p, int threads) override {
    mla_sparse_prefill_cpu(p, vector_isa(isa_), threads);
  }
  void mla_decode(const MlaDecodeParams& p, int threads) override {
    mla_decode_cpu(p, isa_, threads);  // the tier: bf16 storage runs its matrix path
  }

 private:
  CpuIsa isa_;
  bool key_major_;      // fp32 decode tile order (EngineOptions::decode_order)
  BufferPool pool_{4};  // packed K/V and split partials of up to 4 calls
};

}  // namespace

namespace cpu {

void store_row_converted(void* dst, std::int64_t off, DType t, const float* src, float mul, int n) {
  if (t == DType::kBF16) {
    auto* d = static_cast<std::uint16_t*>(dst) + off;
    for (int c = 0; c < n; ++c) d[c] = f32_to_bf16(src[c] * mul);
    return;
  }
  for (int c = 0; c < n; ++c) store_from_f32(dst, off + c, t, src[c] * mul);
}

void throw_scratch_alloc_failure(std::size_t bytes) {
  RA_THROW(ResourceError, "cpu backend: cannot allocate " << bytes << " bytes of scratch");
}

void throw_unsupported_dtype(DType t) {
  RA_THROW(UnsupportedError,
           "cpu backend: storage dtype " << dtype_name(t) << " is not supported for attention");
}

}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend(CpuIsa isa, DecodeOrder order) {
  return std::make_unique<CpuBackend>(isa, order);
}

}  // namespace ringattn::detail
