// ringattn_soak: long-running randomized check of ring attention and distributed
// decode under mpirun (not part of CTest; see docs/reliability.md).
//
//   mpirun -np 2 --oversubscribe build/bin/ringattn_soak --minutes 10 [--seed N]
//          [--threads T] [--backend auto] [--max-seqlen 700]
//
// Until the time is up, rank 0 draws a case (shapes, GQA ratio, head dims, dtype,
// causal / window / softcap, layout, pass-KV or pass-Q, dense or varlen; or a decode
// with its own shapes and mask) and broadcasts it. Every rank builds the same global
// inputs from the case seed, runs the distributed computation on its shard, and
// compares its rows with a single-process reference-backend computation of the whole
// problem. A mismatch prints the case (replayable with --seed and --case). At the end
// rank 0 prints "soak: cases=<n> failures=<f> ..." and the exit code is 0 only
// without failures.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/shard_layout.hpp"

namespace ringattn::soak {
namespace {

// One randomized case; plain ints so that it travels as one MPI_Bcast.
struct Case {
  std::int64_t id = 0;
  std::int64_t seed = 0;
  int decode = 0;  // 0 ring, 1 decode
  int b = 1, s = 0, h = 1, h_k = 1, d = 32, d_v = 32;
  int dtype = 0;  // 0 fp32, 1 bf16, 2 fp16
  int causal = 0, window_left = -1, window_right = -1;
  int softcap = 0;
  int layout = 0;              // ShardLayout
  int pass_q = 0;              // RingMode
  int varlen = 0;              // ring only
  int lens[4] = {0, 0, 0, 0};  // varlen sequence lengths (b <= 4)
  int s_q = 1;                 // decode: new query rows
};

DType dtype_of(const Case& c) {
  return c.dtype == 0 ? DType::kF32 : c.dtype == 1 ? DType::kBF16 : DType::kF16;
}

std::string describe(const Case& c) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "case %lld seed %lld: %s b=%d s=%d h=%d h_k=%d d=%d d_v=%d dtype=%s causal=%d "
                "window=(%d,%d) softcap=%d layout=%s mode=%s varlen=%d lens=[%d,%d,%d,%d] s_q=%d",
                static_cast<long long>(c.id), static_cast<long long>(c.seed),
                c.decode ? "decode" : "ring", c.b, c.s, c.h, c.h_k, c.d, c.d_v,
                dtype_name(dtype_of(c)), c.causal, c.window_left, c.window_right, c.softcap,
                layout_name(static_cast<ShardLayout>(c.layout)), c.pass_q ? "pass-q" : "pass-kv",
                c.varlen, c.lens[0], c.lens[1], c.lens[2], c.lens[3], c.s_q);
  return buf;
}

Case draw(std::mt19937_64& rng, std::int64_t id, int ranks, int max_seqlen) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Case c;
  c.id = id;
  c.seed = static_cast<std::int64_t>(rng() >> 1);
  c.decode = pick(0, 3) == 0;
  const int groups[] = {1, 2, 3, 6};
  c.h_k = pick(1, 3);
  c.h = c.h_k * groups[pick(0, 3)];
  const int dims[] = {16, 32, 64, 128};
  c.d = dims[pick(0, 3)];
  c.d_v = pick(0, 2) == 0 ? dims[pick(0, 3)] : c.d;
  c.dtype = pick(0, 2);
  c.causal = pick(0, 1);
  c.softcap = pick(0, 3) == 0 ? 15 : 0;
  if (pick(0, 2) == 0) {
    c.window_left = pick(-1, 64);
    c.window_right = c.causal ? -1 : pick(-1, 64);
  }
  c.b = pick(1, 3);
  if (c.decode) {
    c.s = pick(ranks, std::max(ranks, 4 * max_seqlen));
    c.s_q = pick(1, 4);
    return c;
  }
  c.layout = pick(0, 2);
  c.pass_q = pick(0, 1);
  c.varlen = pick(0, 2) == 0;
  c.s = pick(ranks, std::max(ranks, max_seqlen));
  if (c.varlen) {
    c.b = pick(1, 4);
    for (int i = 0; i < c.b; ++i) c.lens[i] = pick(ranks, std::max(ranks, max_seqlen / 2));
  }
  return c;
}

std::vector<unsigned char> random_tensor(std::int64_t n, DType t, std::mt19937_64& rng) {
  std::vector<unsigned char> v(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) *
                               dtype_size(t));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (std::int64_t i = 0; i < n; ++i) store_from_f32(v.data(), i, t, u(rng));
  return v;
}

MaskParams mask_of(const Case& c) {
  MaskParams m;
  m.causal = c.causal != 0;
  m.window_left = c.window_left;
  m.window_right = c.window_right;
  m.softcap = static_cast<float>(c.softcap);
  return m;
}

// Compares one output row [h, d_v] and its LSE values with the reference.
bool close(float out, float ref) { return std::fabs(out - ref) <= 1e-4f * (1.0f + std::fabs(ref)); }
bool close_lse(float lse, float ref) {
  if (ref == -INFINITY || lse == -INFINITY) return lse == ref;
  return std::fabs(lse - ref) <= 1e-4f * (1.0f + std::fabs(ref));
}

// Reference over the whole problem with the "reference" backend (single process).
struct Reference {
  std::vector<float> out, lse;
};

// Ring attention case: returns the number of mismatching elements on this rank.
std::int64_t run_ring(const comm::Communicator& comm, const Engine& engine,
                      const Engine& ref_engine, const Case& c) {
  const int P = comm.size(), rank = comm.rank();
  const DType dt = dtype_of(c);
  const std::size_t es = dtype_size(dt);
  std::mt19937_64 rng(static_cast<std::uint64_t>(c.seed));
  // Global [total, heads, dim] tensors; dense batches are b sequences of length s.
  std::vector<std::int32_t> cu(static_cast<std::size_t>(c.b) + 1, 0);
  for (int i = 0; i < c.b; ++i)
    cu[static_cast<std::size_t>(i) + 1] =
        cu[static_cast<std::size_t>(i)] + (c.varlen ? c.lens[i] : c.s);
  const std::int64_t total = cu[static_cast<std::size_t>(c.b)];
  const std::int64_t qr = std::int64_t{c.h} * c.d, kr = std::int64_t{c.h_k} * c.d,
                     vr = std::int64_t{c.h_k} * c.d_v;
  const auto q = random_tensor(total * qr, dt, rng), k = random_tensor(total * kr, dt, rng),
             v = random_tensor(total * vr, dt, rng);

  // Single-process reference: varlen forward over the packed sequences.
  FwdParams f;
  f.dtype = dt;
  f.q = q.data(), f.k = k.data(), f.v = v.data();
  f.b = c.b, f.h = c.h, f.h_k = c.h_k, f.d = c.d, f.d_v = c.d_v;
  f.s_q = f.s_k = c.varlen ? *std::max_element(c.lens, c.lens + 4) : c.s;
  f.cu_seqlens_q = f.cu_seqlens_k = cu.data();
  f.q_row_stride = qr, f.q_head_stride = c.d;
  f.k_row_stride = kr, f.k_head_stride = c.d;
  f.v_row_stride = vr, f.v_head_stride = c.d_v;
  f.out_row_stride = std::int64_t{c.h} * c.d_v, f.out_head_stride = c.d_v;
  f.mask = mask_of(c);
  Reference ref;
  ref.out.assign(static_cast<std::size_t>(total * c.h * c.d_v), NAN);
  ref.lse.assign(static_cast<std::size_t>(total * c.h), NAN);
  f.out = ref.out.data(), f.lse = ref.lse.data();
  ref_engine.forward(f);

  // This rank's rows in local order: global token index of each local row.
  std::vector<std::int64_t> rows;
  for (int i = 0; i < c.b; ++i) {
    const std::int64_t len = cu[static_cast<std::size_t>(i) + 1] - cu[static_cast<std::size_t>(i)];
    for (std::int64_t pos : shard_positions(static_cast<ShardLayout>(c.layout), len, P, rank))
      rows.push_back(cu[static_cast<std::size_t>(i)] + pos);
  }
  const auto n = static_cast<std::int64_t>(rows.size());
  std::vector<unsigned char> lq(static_cast<std::size_t>(std::max<std::int64_t>(n * qr, 1)) * es),
      lk(static_cast<std::size_t>(std::max<std::int64_t>(n * kr, 1)) * es),
      lv(static_cast<std::size_t>(std::max<std::int64_t>(n * vr, 1)) * es);
  for (std::int64_t r = 0; r < n; ++r) {
    const auto g = rows[static_cast<std::size_t>(r)];
    std::memcpy(lq.data() + r * qr * es, q.data() + g * qr * es, static_cast<std::size_t>(qr) * es);
    std::memcpy(lk.data() + r * kr * es, k.data() + g * kr * es, static_cast<std::size_t>(kr) * es);
    std::memcpy(lv.data() + r * vr * es, v.data() + g * vr * es, static_cast<std::size_t>(vr) * es);
  }
  std::vector<float> out(static_cast<std::size_t>(std::max<std::int64_t>(n * c.h * c.d_v, 1)), NAN),
      lse(static_cast<std::size_t>(std::max<std::int64_t>(n * c.h, 1)), NAN);
  RingAttentionParams p;
  p.dtype = dt;
  p.q = lq.data(), p.k = lk.data(), p.v = lv.data(), p.out = out.data(), p.lse = lse.data();
  p.b = c.b, p.s = c.s, p.h = c.h, p.h_k = c.h_k, p.d = c.d, p.d_v = c.d_v;
  p.cu_seqlens = c.varlen ? cu.data() : nullptr;
  p.mask = mask_of(c);
  p.layout = static_cast<ShardLayout>(c.layout);
  ring_attention(comm, engine, c.pass_q ? RingMode::kPassQ : RingMode::kPassKV, p);

  // Dense local layout: out [b, n_r, h, d_v], lse [b, h, n_r]; varlen: [t_r, h, d_v], [h, t_r].
  std::int64_t bad = 0;
  const std::int64_t n_r = c.varlen ? n : n / c.b;
  for (std::int64_t r = 0; r < n; ++r) {
    const auto g = rows[static_cast<std::size_t>(r)];
    for (int hi = 0; hi < c.h; ++hi) {
      for (int x = 0; x < c.d_v; ++x) {
        const float o = out[static_cast<std::size_t>((r * c.h + hi) * c.d_v + x)];
        const float e = ref.out[static_cast<std::size_t>((g * c.h + hi) * c.d_v + x)];
        if (!close(o, e)) ++bad;
      }
      const std::int64_t li = c.varlen ? hi * n + r : ((r / n_r) * c.h + hi) * n_r + r % n_r;
      const float l = lse[static_cast<std::size_t>(li)];
      const float e = ref.lse[static_cast<std::size_t>(hi * total + g)];
      if (!close_lse(l, e)) ++bad;
    }
  }
  return bad;
}

// Distributed decode case: returns the number of mismatching elements on this rank.
std::int64_t run_decode(const comm::Communicator& comm, const Engine& engine,
                        const Engine& ref_engine, const Case& c) {
  const int P = comm.size(), rank = comm.rank();
  const DType dt = dtype_of(c);
  const std::size_t es = dtype_size(dt);
  std::mt19937_64 rng(static_cast<std::uint64_t>(c.seed));
  const std::int64_t kr = std::int64_t{c.h_k} * c.d, vr = std::int64_t{c.h_k} * c.d_v;
  const auto q = random_tensor(std::int64_t{c.b} * c.s_q * c.h * c.d, dt, rng);
  const auto k = random_tensor(std::int64_t{c.b} * c.s * kr, dt, rng);
  const auto v = random_tensor(std::int64_t{c.b} * c.s * vr, dt, rng);
  FwdParams f;
  f.dtype = dt;
  f.q = q.data(), f.k = k.data(), f.v = v.data();
  f.b = c.b, f.s_q = c.s_q, f.s_k = c.s, f.h = c.h, f.h_k = c.h_k, f.d = c.d, f.d_v = c.d_v;
  set_contiguous_strides(f);
  f.mask = mask_of(c);
  const auto n_out = static_cast<std::size_t>(std::int64_t{c.b} * c.s_q * c.h * c.d_v);
  const auto n_lse = static_cast<std::size_t>(std::int64_t{c.b} * c.h * c.s_q);
  std::vector<float> ref_out(n_out, NAN), ref_lse(n_lse, NAN);
  f.out = ref_out.data(), f.lse = ref_lse.data();
  ref_engine.forward(f);

  const std::int64_t first = decode_shard_first(c.s, P, rank),
                     len = decode_shard_length(c.s, P, rank);
  std::vector<unsigned char> lk(
      static_cast<std::size_t>(std::max<std::int64_t>(c.b * len * kr, 1)) * es),
      lv(static_cast<std::size_t>(std::max<std::int64_t>(c.b * len * vr, 1)) * es);
  for (int i = 0; i < c.b; ++i) {
    std::memcpy(lk.data() + (i * len) * kr * es, k.data() + (i * c.s + first) * kr * es,
                static_cast<std::size_t>(len * kr) * es);
    std::memcpy(lv.data() + (i * len) * vr * es, v.data() + (i * c.s + first) * vr * es,
                static_cast<std::size_t>(len * vr) * es);
  }
  std::vector<float> out(n_out, NAN), lse(n_lse, NAN);
  DecodeParams p;
  p.dtype = dt;
  p.q = q.data(), p.k_cache = lk.data(), p.v_cache = lv.data(), p.out = out.data(),
  p.lse = lse.data();
  p.b = c.b, p.s_q = c.s_q, p.h = c.h, p.h_k = c.h_k, p.d = c.d, p.d_v = c.d_v;
  p.s_cache = c.s;
  p.mask = mask_of(c);
  distributed_decode(comm, engine, p);
  std::int64_t bad = 0;
  for (std::size_t i = 0; i < n_out; ++i) bad += !close(out[i], ref_out[i]);
  for (std::size_t i = 0; i < n_lse; ++i) bad += !close_lse(lse[i], ref_lse[i]);
  return bad;
}

int run(int argc, char** argv) {
  comm::MpiRuntime runtime(&argc, &argv);
  const comm::Communicator comm(MPI_COMM_WORLD);
  double minutes = 10.0;
  std::uint64_t seed =
      static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  std::int64_t only_case = -1;
  int threads = 1, max_seqlen = 700;
  std::string backend = "auto";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* val = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--minutes" && val)
      minutes = std::atof(argv[++i]);
    else if (a == "--seed" && val)
      seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--case" && val)
      only_case = std::atoll(argv[++i]);
    else if (a == "--threads" && val)
      threads = std::atoi(argv[++i]);
    else if (a == "--backend" && val)
      backend = argv[++i];
    else if (a == "--max-seqlen" && val)
      max_seqlen = std::atoi(argv[++i]);
    else {
      if (comm.rank() == 0)
        std::fprintf(stderr,
                     "usage: ringattn_soak [--minutes M] [--seed N] [--case I] [--threads T] "
                     "[--backend NAME] [--max-seqlen S]\n");
      return 2;
    }
  }
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, comm.get());
  const Engine engine(EngineOptions{backend, threads});
  const Engine ref_engine(EngineOptions{"reference", threads});
  if (comm.rank() == 0)
    std::printf("soak: ranks=%d threads=%d backend=%s seed=%llu minutes=%.1f\n", comm.size(),
                threads, engine.backend_name().c_str(), static_cast<unsigned long long>(seed),
                minutes);
  std::mt19937_64 rng(seed);
  const auto t_start = std::chrono::steady_clock::now();
  std::int64_t cases = 0, failures = 0, ring_cases = 0, decode_cases = 0;
  for (std::int64_t id = 0;; ++id) {
    int go = 1;
    if (comm.rank() == 0) {
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      go = only_case >= 0 ? id <= only_case : elapsed < minutes * 60.0;
    }
    MPI_Bcast(&go, 1, MPI_INT, 0, comm.get());
    if (!go) break;
    Case c = draw(rng, id, comm.size(), max_seqlen);  // same draw on every rank (same seed)
    if (only_case >= 0 && id != only_case) continue;
    std::int64_t bad = 0;
    std::string error;
    try {
      bad = c.decode ? run_decode(comm, engine, ref_engine, c)
                     : run_ring(comm, engine, ref_engine, c);
    } catch (const std::exception& e) {
      error = e.what();
      bad = 1;
    }
    std::int64_t total_bad = 0;
    MPI_Allreduce(&bad, &total_bad, 1, MPI_INT64_T, MPI_SUM, comm.get());
    ++cases;
    (c.decode ? decode_cases : ring_cases) += 1;
    if (!error.empty())
      std::fprintf(stderr, "soak: rank %d: %s: error: %s\n", comm.rank(), describe(c).c_str(),
                   error.c_str());
    if (total_bad > 0) {
      ++failures;
      if (comm.rank() == 0)
        std::fprintf(stderr,
                     "soak: FAIL %s: %lld mismatching elements (replay: --seed %llu --case %lld)\n",
                     describe(c).c_str(), static_cast<long long>(total_bad),
                     static_cast<unsigned long long>(seed), static_cast<long long>(c.id));
    }
    if (comm.rank() == 0 && cases % 200 == 0) {
      std::printf("soak: %lld cases, %lld failures so far\n", static_cast<long long>(cases),
                  static_cast<long long>(failures));
      std::fflush(stdout);
    }
  }
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (comm.rank() == 0)
    std::printf("soak: cases=%lld failures=%lld ring=%lld decode=%lld elapsed=%.0fs\n",
                static_cast<long long>(cases), static_cast<long long>(failures),
                static_cast<long long>(ring_cases), static_cast<long long>(decode_cases), elapsed);
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace ringattn::soak

int main(int argc, char** argv) { return ringattn::soak::run(argc, argv); }
