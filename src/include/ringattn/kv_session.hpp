// Context-parallel inference: a KV cache sharded across the ranks of a communicator
// that lives across prefill, decode steps and follow-up prefills ("extend").
//
//   prefill  a causal pass-KV ring over the prompt (ring_attention.hpp, one ring per
//            sequence); each rank's K/V shard is written into its paged cache first and
//            the ring reads it from there: the prompt's K/V are stored once.
//   decode   the same t new query rows on every rank; their K/V are appended on the
//            rank that owns each position; every rank attends over its keys and one
//            reduction whose operation is the LSE merge combines the partials.
//   extend   S1 new tokens attend to the whole cached context and causally to each
//            other; pass-Q (each rank attends all new queries to its keys, the partials
//            are merged across ranks) or pass-KV (each rank keeps a slice of the new
//            queries, the cached context travels around the ring), chosen by a cost
//            model (ExtendPlan) or forced.
//
// Token ownership (ShardedKvCache): prompt tokens stay where the prefill ring had them
// (the `prefill_layout` shard of the prompt: zigzag by default, which balances the causal
// prefill); tokens appended later follow `layout`:
//   round-robin  blocks of page_size tokens go to ranks 0, 1, ..., P-1, 0, ... (default:
//                every rank gains keys as a sequence grows, so decode work stays balanced)
//   contiguous   rank r owns appended positions [S0 + r * A, S0 + (r + 1) * A) with
//                A = ceil((capacity - S0) / P): the last ranks get keys only late.
// Every rank keeps its positions in ascending order, so "local keys with position < x"
// is a prefix of its cache: masks by global position become per-row key counts.
//
// Exactness: every output equals single-process causal attention over the sequence's
// whole history (fp32 within rounding), whatever P, layouts and page size. LSE natural
// log; rows that see no key give out 0, LSE -inf.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ringattn/attention_params.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn {

enum class CacheLayout : std::uint8_t { kContiguous, kRoundRobin };
const char* cache_layout_name(CacheLayout layout);
// "contiguous" | "round-robin"; InvalidArgument otherwise.
CacheLayout parse_cache_layout(std::string_view name);

struct SessionConfig {
  DType dtype = DType::kF32;  // storage of q, k, v and the cache: fp32, bf16 or fp16
  int b = 1;                  // sequences
  int h = 0, h_k = 0, d = 0, d_v = 0;
  int page_size = 256;
  std::int64_t capacity = 0;  // tokens per sequence, prompt included
  CacheLayout layout = CacheLayout::kRoundRobin;
  ShardLayout prefill_layout = ShardLayout::kZigzag;
  // scale, softcap, window_left, attention_chunk and sinks apply; the session is always
  // causal (window_right = 0). Windows are not supported by extend.
  MaskParams mask;
};

// Per-rank paged storage of b sequences: K [pages, page_size, h_k, d], V [pages,
// page_size, h_k, d_v] (dtype), each sequence owning a run of pages_per_seq pages, so
// its local slots 0, 1, ... are contiguous rows. O(capacity / P) per rank.
class ShardedKvCache {
 public:
  ShardedKvCache(const SessionConfig& config, int ranks, int rank);

  const SessionConfig& config() const { return config_; }
  int ranks() const { return ranks_; }
  int rank() const { return rank_; }
  // Global tokens of sequence s (prompt + appended).
  std::int64_t length(int s) const { return length_[static_cast<std::size_t>(s)]; }
  std::int64_t prompt_length(int s) const { return prompt_[static_cast<std::size_t>(s)]; }
  // Rank owning position `pos` of sequence s, and this rank's keys of s with position
  // < limit (its slot of a position it owns is local_count(s, pos)).
  int owner(int s, std::int64_t pos) const;
  std::int64_t local_count(int s, std::int64_t limit) const { return count(s, limit, rank_); }
  std::int64_t count(int s, std::int64_t limit, int rank) const;
  // Local capacity (slots) of one sequence.
  std::int64_t local_capacity() const { return std::int64_t{pages_per_seq_} * page_size(); }
  int page_size() const { return config_.page_size; }
  int pages_per_seq() const { return pages_per_seq_; }

  // Row `slot` of sequence s (K or V).
  std::byte* k_row(int s, std::int64_t slot);
  std::byte* v_row(int s, std::int64_t slot);
  std::byte* k_cache() { return k_.data(); }  // [b * pages_per_seq, page_size, h_k, d]
  std::byte* v_cache() { return v_.data(); }
  const std::vector<std::int32_t>& page_table() const { return pages_; }  // [b, pages_per_seq]

  // Starts sequence s with a prompt of `len` tokens (its prefill layout shard is what
  // this rank stores), or appends positions [length, length + n) (owners store them).
  // InvalidArgument naming the sequence, lengths and capacity when it would overflow.
  void begin(int s, std::int64_t len);
  void grow(int s, std::int64_t n);
  // Checks that n more tokens fit in sequence s (same message as grow).
  void check_room(int s, std::int64_t n) const;

 private:
  SessionConfig config_;
  int ranks_ = 1, rank_ = 0;
  int pages_per_seq_ = 0;
  std::vector<std::int64_t> length_, prompt_;
  std::vector<std::vector<std::int64_t>> prompt_pos_;  // [b] this rank's prompt positions
  std::vector<std::byte> k_, v_;
  std::vector<std::int32_t> pages_;
};

enum class ExtendMode : std::uint8_t { kAuto, kPassQ, kPassKV };
const char* extend_mode_name(ExtendMode mode);
// "auto" | "pass-q" | "pass-kv"; InvalidArgument otherwise.
ExtendMode parse_extend_mode(std::string_view name);

// Machine constants of the extend cost model, measured on the 16-core Xeon (bf16, cpu-amx,
// 1 thread per rank, 16 ranks, shared-memory MPI; docs/session.md has the runs): a
// pass-Q extend of 128 tokens against 4096 cached keys per rank computed at about 150
// GFLOP/s per rank; a pass-KV step with 8 query rows (32 per K/V head) at about 18.
struct CostConstants {
  double bytes_per_s = 5e9;         // point-to-point bandwidth per rank
  double latency_s = 5e-6;          // per message
  double flops_per_s = 150e9;       // kernel rate per rank (attention FLOPs) on long calls
  double memory_bytes_per_s = 8e9;  // cache read rate per rank with every rank reading
  // Query rows per K/V head from which a call reaches flops_per_s; a call with fewer
  // runs proportionally slower (the tile engines are fed by row blocks).
  double full_rate_rows = 256;
};

// The extend decision: bytes each rank sends and the predicted seconds of each mode.
struct ExtendPlan {
  ExtendMode mode = ExtendMode::kPassQ;  // what runs (never kAuto)
  double pass_q_bytes = 0, pass_kv_bytes = 0;
  double pass_q_s = 0, pass_kv_s = 0;
  std::string why;
};
// Pure function (unit-tested without MPI): the mode `requested` resolves to for S1 new
// tokens per sequence against `context` cached tokens (the longest sequence's).
ExtendPlan plan_extend(const SessionConfig& c, int ranks, std::int64_t context, std::int64_t s1,
                       ExtendMode requested, const CostConstants& k = {});

struct StepStats {
  double total_s = 0;    // the whole call, slowest rank
  double compute_s = 0;  // kernel calls of this rank
  double merge_s = 0;    // the cross-rank merge / exchanges (decode: see below)
  double bytes = 0;      // bytes this rank sent
  // Decode only. A rank enters the merge reduction when its own local attention is done
  // and leaves it when the last rank's partials have been merged in, so its time inside
  // the reduction is "waiting for the slowest rank" plus "the merge itself". With every
  // rank's clock started at the call's entry (the ranks leave the previous collective
  // within microseconds of each other), from one allgather of the per-rank times:
  //   merge_s   = max_r(enter_r + reduce_r) - max_r(enter_r): from the last rank's entry
  //               to the last rank's exit, the reduction's own cost on the critical path
  //               (records on the wire, MPI latency per round, the LSE merge arithmetic);
  //               the same on every rank
  //   wait_s    = mean over ranks of max_r'(local_r') - local_r: time a rank idles
  //               waiting for the slowest rank's local attention (load imbalance)
  //   max_wait_s = max_r(local_r) - min_r(local_r): the fastest rank's wait
  double local_s = 0;     // this rank: call entry to the end of its local work
  double reduce_s = 0;    // this rank: time inside the reduction (waiting included)
  double wait_s = 0;      // mean over ranks (above)
  double max_wait_s = 0;  // (above)
};

class KvSession {
 public:
  // Collective: checks the config on every rank (same exception everywhere) and
  // allocates the cache.
  KvSession(const comm::Communicator& comm, const Engine& engine, const SessionConfig& config);

  ShardedKvCache& cache() { return cache_; }
  const ShardedKvCache& cache() const { return cache_; }

  // Rows of this rank's prefill shard of a prompt of `len` tokens, in local order.
  std::vector<std::int64_t> prefill_positions(std::int64_t len) const;

  // Collective. prompt_lens [b] (same on every rank). This rank's shard, packed
  // sequence after sequence in local order (prefill_positions):
  //   q [t_r, h, d], k [t_r, h_k, d], v [t_r, h_k, d_v] (dtype)
  //   out [t_r, h, d_v] fp32, lse [h, t_r] fp32 (nullable)
  // attend = false only stores the prompt's K/V (no attention, out/lse untouched): decode
  // and extend benchmarks over long contexts without the prefill's cost.
  StepStats prefill(const std::vector<std::int64_t>& prompt_lens, const void* q, const void* k,
                    const void* v, float* out, float* lse, bool attend = true);

  // Collective. t new tokens per sequence, identical on every rank:
  //   q [b, t, h, d], k [b, t, h_k, d], v [b, t, h_k, d_v] (dtype)
  //   out [b, t, h, d_v] fp32, lse [b, h, t] fp32 (nullable): every rank (root < 0) or root.
  StepStats decode(int t, const void* q, const void* k, const void* v, float* out, float* lse,
                   int root = -1);
  // Measurement mode for decode: a barrier before the merge reduction, so the reduction
  // starts on every rank at once and its time is the merge alone (the wait moves into the
  // barrier). Checks StepStats::merge_s; off by default (it adds a collective per step).
  void set_merge_after_barrier(bool on) { merge_after_barrier_ = on; }

  // Collective. s1 new tokens per sequence, identical on every rank (layouts as decode
  // with t = s1); appended to the cache after attending. `plan` reports what ran.
  StepStats extend(int s1, const void* q, const void* k, const void* v, float* out, float* lse,
                   ExtendMode mode, ExtendPlan* plan = nullptr, int root = -1,
                   const CostConstants& constants = {});

 private:
  // Rows [row0, row0 + rows) of sequence s's t new rows, which all see this rank's
  // local keys [from, to).
  struct LocalRun {
    int s = 0, row0 = 0, rows = 0;
    std::int32_t to = 0, from = 0;
  };
  // The runs of t new rows per sequence (at positions length(s) + i) against this rank's
  // cached keys: each row sees the keys from its window's or attention chunk's first
  // position on; consecutive rows with the same first key form one run.
  std::vector<LocalRun> local_runs(int t) const;
  // Global tokens of every sequence, [b].
  std::vector<std::int64_t> lengths() const;
  // Partial (o, lse) records [b, t, h][d_v + 1] of t query rows per sequence against this
  // rank's keys, for runs that tile the b * t rows in order.
  void attend_local(int t, const void* q, const std::vector<LocalRun>& runs,
                    std::vector<float>& records);
  // Appends t tokens per sequence (k [b, t, h_k, d], v [b, t, h_k, d_v]) on their owners.
  void append(int t, const void* k, const void* v);

  const comm::Communicator& comm_;
  const Engine& engine_;
  ShardedKvCache cache_;
  bool merge_after_barrier_ = false;
  // Buffers reused by every decode step (records, kernel outputs, page tables: once they
  // have grown, a step allocates only a few vectors of b or run-count entries).
  struct Scratch {
    std::vector<float> records, fresh, out, lse;
    std::vector<std::int32_t> table, cu_q, to, from;
    std::vector<std::int64_t> shift;
  } scratch_;
};

}  // namespace ringattn
