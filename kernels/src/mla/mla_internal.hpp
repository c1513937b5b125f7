// Internals shared by the MLA kernels (decode, sparse decode, sparse prefill):
// the per-ISA tile operations and the one tile loop that every path runs.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu_features.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn::detail::mla {

// Keys are processed in tiles of kTile tokens: each token of a tile is read from the
// cache ONCE, decoded to fp32 into a [kTile, 576] buffer, and then used by every query
// row of the unit (all heads of all its query tokens).
inline constexpr int kTile = 16;
// Query rows handled together against one key tile (scores [kRowGroup, kTile]).
inline constexpr int kRowGroup = 32;

// How a cache token is stored.
enum class SourceKind : std::uint8_t { kF32, kBF16, kFP8, kPacked656 };

struct TokenSource {
  SourceKind kind = SourceKind::kF32;
  const std::uint8_t* base = nullptr;  // token slot s starts at base + s * row_bytes
  std::int64_t row_bytes = 0;
};

// Tile operations, one table per ISA (mla_ops_scalar.cpp, mla_ops_avx2.cpp).
struct Ops {
  const char* name;
  // dst [n, 576] fp32 <- tokens at `slots` (fp8 decoded exactly; packed: times its scale).
  void (*load_tokens)(const TokenSource& src, const std::int64_t* slots, int n, float* dst);
  // s[r * lds + t] = q[r, :576] . k[t, :576]  for r < R, t < T.
  void (*scores)(const float* q, int R, const float* k, int T, float* s, int lds);
  // Online-softmax step over kTile columns of s (masked entries are -inf):
  // s <- exp(sc * s - m_new) in place, d <- d * alpha + rowsum, alpha = exp(m - m_new).
  void (*softmax)(float* s, int lds, int R, float sc, float* m, float* d, float* alpha);
  // acc[r, :512] = acc[r, :512] * alpha[r] + sum_{t < T} p[r * lds + t] * v[t, :512]
  // (v rows have stride 576).
  void (*pv)(const float* p, int lds, int R, const float* v, int T, float* acc, const float* alpha);
};

const Ops& ops_scalar();
const Ops& ops_avx2();  // precondition: cpu_supports(kAvx2)
const Ops& ops_for(CpuIsa isa);

// Key positions j in [0, n) of one unit -> cache slots.
struct KeyList {
  enum class Kind : std::uint8_t { kPaged, kList, kContiguous } kind = Kind::kContiguous;
  const std::int32_t* block_table = nullptr;  // kPaged: [max_blocks] of this sequence
  int page_size = 1;
  const std::int64_t* list = nullptr;  // kList: slot of key j
  std::int64_t base = 0;               // kContiguous: slot = base + j

  std::int64_t slot(std::int64_t j) const {
    switch (kind) {
      case Kind::kPaged:
        return static_cast<std::int64_t>(block_table[j / page_size]) * page_size + j % page_size;
      case Kind::kList:
        return list[j];
      case Kind::kContiguous:
        return base + j;
    }
    return 0;
  }
};

// Which keys each query TOKEN of a unit sees (its h_q head rows share it).
struct RowMask {
  enum class Kind : std::uint8_t { kNone, kLimit, kBits } kind = Kind::kNone;
  const std::int64_t* limit = nullptr;  // kLimit: [ntok] token sees keys j < limit
  const std::uint64_t* bits = nullptr;  // kBits: [ntok, words] bit j set = key j visible
  std::int64_t words = 0;
  // Exclusive upper bound of the keys token t can see (for tile skipping).
  std::int64_t last(int t, std::int64_t n) const;
};

// One unit of work: R = ntok * h_q query rows against keys [key_begin, key_end).
struct UnitSpec {
  const float* q = nullptr;  // [R, 576] fp32
  int ntok = 0, h_q = 0;
  std::int64_t key_begin = 0, key_end = 0;
  float sc = 1.0f;  // score scale
  RowMask mask;
};

// Per-thread scratch, reused across units.
struct Workspace {
  std::vector<float> ktile;  // [kTile, 576]
  std::vector<float> s;      // [kRowGroup, kTile]
  std::vector<float> alpha;  // [kRowGroup]
  std::vector<float> m, d;   // [R]
  std::vector<std::int64_t> slots;
  std::vector<float> qbuf;  // [R, 576]
  std::vector<float> acc;   // [R, 512]
  std::vector<float> lse;   // [R]
  // The bf16 paths (mla_bf16_unit.hpp documents the layouts).
  std::vector<bf16_t> qpairs;  // [288 pairs][Rp][2] the unit's queries, pair-major
  std::vector<bf16_t> vpairs;  // [keys / 2][512][2] V of one key tile, pairs of keys
  std::vector<bf16_t> ppairs;  // [keys / 2][Rp][2] P of one key tile, pairs of keys
  std::vector<bf16_t> kconv;   // [keys][576] fp8 rows of one key tile as bf16
  std::vector<const bf16_t*> krow;
  std::vector<bf16_t> prow;  // AMX: [Rp][keys] P of one key tile, row-major
};

// Runs one unit: o [R, 512] normalised (0 for rows that saw nothing), lse [R]
// natural log (-inf for those rows), and when max_logit is non-null the row's largest
// scaled score [R] (-inf for those rows).
void run_unit(const Ops& ops, const TokenSource& src, const KeyList& keys, const UnitSpec& u,
              Workspace& ws, float* o, float* lse, float* max_logit = nullptr);

// The last step of a unit: o = acc / d per row (0 for rows that saw nothing), lse and
// max_logit from the online-softmax state ws.m, ws.d (run_unit documents the outputs).
void finish_unit(const Workspace& ws, int R, float* o, float* lse, float* max_logit);

// run_unit on the bf16 dot-product instruction (vdpbf16ps): the same outputs, with the
// unit's queries taken as bf16 (exact for bf16 q) and the softmax weights P rounded to
// bf16 before P V (docs/cpu-backend.md, "MLA decode on the matrix tiers").
// Preconditions: cpu_supports(kAvx512Bf16), src.kind is kBF16 or kFP8.
void run_unit_dpbf16(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                     float* o, float* lse, float* max_logit = nullptr);

// The same on the AMX tiles (mla_decode_amx.cpp), same results up to the order of the fp32
// sums. Preconditions: cpu_supports(kAmx), src.kind is kBF16 or kFP8.
void run_unit_amx(const TokenSource& src, const KeyList& keys, const UnitSpec& u, Workspace& ws,
                  float* o, float* lse, float* max_logit = nullptr);

// Whether a decode call on tier `tier` runs the bf16 products, run_unit_dpbf16
// (cpu-avx512-bf16) or run_unit_amx (cpu-amx): bf16 q with a dense bf16 or fp8 cache
// (fp8 e4m3 values are exact in bf16) and at least 8 query rows per key list. fp32 q keeps the fp32
// tiles (scores exact in fp32), and so does the packed fp8 layout (its scaled values are not bf16
// values).
bool decode_uses_bf16_path(CpuIsa tier, const MlaDecodeParams& p);

// Converts n values of q (fp32 or bf16) to fp32.
void convert_to_f32(const void* src, DType t, std::int64_t offset, std::int64_t n, float* dst);

TokenSource make_source(const MlaDecodeParams& p);

// Score scale of a decode call (bmm1_scale, else scale, else 1/sqrt(576)).
float decode_score_scale(const MlaDecodeParams& p);

}  // namespace ringattn::detail::mla
