// `ringattn attn`: dense or varlen attention on .npy inputs (docs/semantics.md sections 1-2).
//   dense:  --q [b, s_q, h, d]  --k [b, s_k, h_k, d]  --v [b, s_k, h_k, d_v]
//           -> --out [b, s_q, h, d_v] fp32, --lse [b, h, s_q] fp32 (natural log)
//   varlen: --q [total_q, h, d] --k [total_k, h_k, d] --v [total_k, h_k, d_v]
//           with --cu-seqlens-q/--cu-seqlens-k [b+1] (int32 or int64)
//           -> --out [total_q, h, d_v], --lse [h, total_q]
//   --qv (FA3): extra query part shaped as --out, same file dtype as --q;
//           score = scale * (q . k + qv . v), default scale 1/sqrt(d + d_v).
// Rows that see no key get output 0 and LSE -inf. --dtype fp8: q/k/v files hold e4m3
// bytes (|u1), --q-descale/--k-descale/--v-descale [b, h_k]; the output stays fp32.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/error.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: ringattn attn --q Q.npy --k K.npy --v V.npy [--out O.npy] [--lse L.npy] [options]\n"
    "\n"
    "Dense ([b,s,h,d]) or varlen ([total,h,d] with --cu-seqlens-q/-k) attention.\n"
    "Inputs are <f4 or <f2 .npy files (--dtype fp8: |u1 files of e4m3 bytes, with optional\n"
    "--q-descale/--k-descale/--v-descale [b, h_k]); outputs are fp32.";

// The options of `ringattn attn`, each declared once (cli/args.hpp).
struct AttnArgs : MaskKernelArgs {
  std::string q, k, v, out, lse, qv;
  std::string cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k;
  int max_seqlen_q = 0, max_seqlen_k = 0, num_splits = 0;
  DescaleArgs descale;
  bool json = false;

  template <class V>
  void for_each(V& f) {
    f.group("Inputs and outputs");
    f(q, {"q", "queries: [b, s_q, h, d] or varlen [total_q, h, d]", kNoDefault});
    f(k, {"k", "keys: [b, s_k, h_k, d] or varlen [total_k, h_k, d]", kNoDefault});
    f(v, {"v", "values: [b, s_k, h_k, d_v] or varlen [total_k, h_k, d_v]", kNoDefault});
    f(qv, {"qv",
           "FA3 qv: extra query part [b, s_q, h, d_v] or varlen [total_q, h, d_v], same "
           "file dtype as --q (not fp8); score = scale * (q.k + qv.v), default scale "
           "1/sqrt(d + d_v)",
           kNoDefault});
    f(out, {"out", "output fp32 [b, s_q, h, d_v] or [total_q, h, d_v]", kNoDefault});
    f(lse, {"lse", "log-sum-exp fp32 [b, h, s_q] or [h, total_q]", kNoDefault});
    f(cu_seqlens_q,
      {"cu-seqlens-q", "varlen: query segment offsets [b+1] int32/int64", kNoDefault});
    f(cu_seqlens_k, {"cu-seqlens-k", "varlen: key segment offsets [b+1] int32/int64", kNoDefault});
    f(seqused_q, {"seqused-q", "varlen: query rows used per segment [b]", kNoDefault});
    f(seqused_k, {"seqused-k", "varlen: keys used per segment [b]", kNoDefault});
    f(max_seqlen_q, {"max-seqlen-q", "varlen: longest query segment; 0 = from cu_seqlens"});
    f(max_seqlen_k, {"max-seqlen-k", "varlen: longest key segment; 0 = from cu_seqlens"});
    descale.for_each(f);
    f(num_splits, {"num-splits", "key splits: 0 = engine decides, 1 = none"});
    f(json,
      {"json", "print the result as one JSON object (kernel_s = seconds in the kernel call)"});
    mask_and_kernel(f, "Mask", "Kernel");
  }
  bool varlen() const { return vm.count("cu-seqlens-q") || vm.count("cu-seqlens-k"); }
};

// The headers of the input files (data still in the files).
struct AttnFiles {
  NpyFile q, k, v;
  std::optional<NpyFile> qv;
};

// The problem as loaded: the params and everything they point into.
struct AttnRun {
  bool varlen = false;
  DType dtype = DType::kF32;
  FwdParams p;
  AttnHeads hd;
  std::vector<float> sinks;
  std::vector<std::int32_t> cu_q, cu_k, used_q, used_k;
  std::vector<std::int64_t> out_shape, lse_shape;
  std::int64_t rows_q = 0;  // query rows in all: b * s_q or total_q
  Descales descales;
  std::optional<OutLseFiles> files;
  std::unique_ptr<float[]> lse_varlen;  // varlen --lse: the kernel's [h, cu_seqlens_q[b]]
  StoredTensor q, k, v, qv;
};

// The option checks that need no file.
void check_options(const AttnArgs& a) {
  require(a.vm, "q");
  require(a.vm, "k");
  require(a.vm, "v");
  const int max_seqlen_q = a.max_seqlen_q, max_seqlen_k = a.max_seqlen_k,
            num_splits = a.num_splits;  // named by the checks
  RA_CHECK_ARG_GE(max_seqlen_q, 0, "--max-seqlen-q: must be >= 0");
  RA_CHECK_ARG_GE(max_seqlen_k, 0, "--max-seqlen-k: must be >= 0");
  RA_CHECK_ARG_GE(num_splits, 0, "--num-splits: must be >= 0");
  if (a.varlen()) {
    require(a.vm, "cu-seqlens-q");
    require(a.vm, "cu-seqlens-k");
  } else {
    RA_CHECK_ARG(!a.vm.count("seqused-q") && !a.vm.count("seqused-k"),
                 "--seqused-q/--seqused-k: only valid with --cu-seqlens-q/--cu-seqlens-k (varlen)");
  }
}

// Headers first: every shape is checked before any data is read.
AttnFiles open_inputs(const AttnArgs& a, AttnRun& r) {
  const int rank = r.varlen ? 3 : 4;
  AttnFiles f{open_attn_tensor("--q", a.q, rank, r.dtype),
              open_attn_tensor("--k", a.k, rank, r.dtype),
              open_attn_tensor("--v", a.v, rank, r.dtype),
              {}};
  const NpyHeader &q = f.q.header(), &k = f.k.header(), &v = f.v.header();
  const int hd = rank - 2;  // index of the head dim in the shapes
  if (!r.varlen) {
    check_dim("--k", k, 0, "--q", q, 0, "batch");
    check_dim("--v", v, 0, "--q", q, 0, "batch");
  }
  check_dim("--v", v, hd - 1, "--k", k, hd - 1, "keys");
  check_dim("--v", v, hd, "--k", k, hd, "kv heads");
  check_dim("--k", k, hd + 1, "--q", q, hd + 1, "head dim");
  r.hd = {q.shape[hd], k.shape[hd], q.shape[hd + 1], v.shape[hd + 1]};
  check_kv_heads("--k", q, k, r.hd);
  const std::int64_t d = r.hd.d, d_v = r.hd.d_v;
  if (a.vm.count("qv")) f.qv.emplace(open_qv(a.qv, rank, q, d_v, "--v"));
  RA_CHECK_ARG(
      d <= kMaxHeadDim && d_v <= kMaxHeadDim,
      "--q/--v: head dims must be <= " << kMaxHeadDim << ", got d = " << d << ", d_v = " << d_v);
  return f;
}

// --seqused-q/--seqused-k [b]: each entry within its segment.
void load_seqused(const AttnArgs& a, std::int64_t b, AttnRun& r) {
  if (a.vm.count("seqused-q")) r.used_q = load_index("--seqused-q", a.seqused_q, {b});
  if (a.vm.count("seqused-k")) r.used_k = load_index("--seqused-k", a.seqused_k, {b});
  const auto &cu_q = r.cu_q, &cu_k = r.cu_k, &used_q = r.used_q, &used_k = r.used_k;
  for (std::int64_t i = 0; i < b; ++i) {
    if (!used_q.empty())
      RA_CHECK_ARG(used_q[i] >= 0 && used_q[i] <= cu_q[i + 1] - cu_q[i],
                   "--seqused-q: entry " << i << " = " << used_q[i] << " outside [0, "
                                         << cu_q[i + 1] - cu_q[i] << "]");
    if (!used_k.empty())
      RA_CHECK_ARG(used_k[i] >= 0 && used_k[i] <= cu_k[i + 1] - cu_k[i],
                   "--seqused-k: entry " << i << " = " << used_k[i] << " outside [0, "
                                         << cu_k[i + 1] - cu_k[i] << "]");
  }
}

// Checks a cu_seqlens array: starts >= 0, non-decreasing, last entry <= total.
// Returns the longest segment.
int check_cu_seqlens(const char* opt, const std::vector<std::int32_t>& cu, std::int64_t total,
                     const char* total_what) {
  RA_CHECK_ARG_GE(cu.front(), 0, opt << ": first entry");
  const int longest = longest_segment(opt, cu);
  RA_CHECK_ARG(cu.back() <= total,
               opt << ": last entry " << cu.back() << " exceeds " << total_what << " = " << total);
  return longest;
}

// Varlen: the segments from --cu-seqlens-q/-k (and --seqused-q/-k), the lengths from
// them or --max-seqlen-q/-k; the output [total_q, h, d_v], the LSE [h, total_q].
void varlen_shape(const AttnArgs& a, const NpyHeader& q, const NpyHeader& k, AttnRun& r) {
  r.cu_q = load_offsets("--cu-seqlens-q", a.cu_seqlens_q);
  const std::int64_t b = static_cast<std::int64_t>(r.cu_q.size()) - 1;
  r.cu_k = load_index("--cu-seqlens-k", a.cu_seqlens_k, {b + 1});
  const int longest_q = check_cu_seqlens("--cu-seqlens-q", r.cu_q, q.shape[0], "--q total_q");
  const int longest_k = check_cu_seqlens("--cu-seqlens-k", r.cu_k, k.shape[0], "--k total_k");
  load_seqused(a, b, r);
  const int max_seqlen_q = a.max_seqlen_q, max_seqlen_k = a.max_seqlen_k;  // named by the checks
  if (max_seqlen_q > 0)
    RA_CHECK_ARG_GE(max_seqlen_q, longest_q, "--max-seqlen-q: must cover the longest segment");
  if (max_seqlen_k > 0)
    RA_CHECK_ARG_GE(max_seqlen_k, longest_k, "--max-seqlen-k: must cover the longest segment");
  FwdParams& p = r.p;
  p.b = static_cast<int>(b);
  p.s_q = max_seqlen_q > 0 ? max_seqlen_q : longest_q;
  p.s_k = max_seqlen_k > 0 ? max_seqlen_k : longest_k;
  p.cu_seqlens_q = r.cu_q.data();
  p.cu_seqlens_k = r.cu_k.data();
  p.seqused_q = r.used_q.empty() ? nullptr : r.used_q.data();
  p.seqused_k = r.used_k.empty() ? nullptr : r.used_k.data();
  r.rows_q = q.shape[0];
  r.out_shape = {r.rows_q, r.hd.h, r.hd.d_v};
  r.lse_shape = {r.hd.h, r.rows_q};
}

// Dense: the lengths from the shapes; the output [b, s_q, h, d_v], the LSE [b, h, s_q].
void dense_shape(const AttnArgs& a, const NpyHeader& q, const NpyHeader& k, AttnRun& r) {
  RA_CHECK_ARG(!given(a.vm, "max-seqlen-q"),
               "--max-seqlen-q: only valid with --cu-seqlens-q (varlen)");
  RA_CHECK_ARG(!given(a.vm, "max-seqlen-k"),
               "--max-seqlen-k: only valid with --cu-seqlens-k (varlen)");
  FwdParams& p = r.p;
  p.b = static_cast<int>(q.shape[0]);
  p.s_q = static_cast<int>(q.shape[1]);
  p.s_k = static_cast<int>(k.shape[1]);
  r.rows_q = q.shape[0] * q.shape[1];
  r.out_shape = {q.shape[0], q.shape[1], r.hd.h, r.hd.d_v};
  r.lse_shape = {q.shape[0], r.hd.h, q.shape[1]};
}

// The params the headers and options give: heads, mask, lengths, descales; --qv's shape.
void build_params(const AttnArgs& a, const AttnFiles& f, const MaskParams& mask, AttnRun& r) {
  const NpyHeader &q = f.q.header(), &k = f.k.header();
  r.sinks = load_sinks(a.mask, r.hd.h);
  set_attn_params(r.p, r.dtype, mask, r.sinks, a.num_splits, r.hd);
  if (r.varlen)
    varlen_shape(a, q, k, r);
  else
    dense_shape(a, q, k, r);
  load_descales(a.descale, r.dtype, r.p.b, r.hd.h_k, r.descales, r.p.descale);
  if (f.qv) check_qv_shape(f.qv->header(), r.out_shape, r.varlen, q, "--v", f.v.header());
}

// Output files are created before anything is computed (a bad path fails at once)
// and the kernel writes into them directly. Dense: the kernel writes every element.
// Varlen: rows outside every segment (or beyond seqused_q) are set to output 0,
// LSE -inf after the kernel (finish_varlen), and the LSE goes through a
// [h, cu_seqlens_q[b]] buffer. Then the inputs in storage dtype: the files themselves
// when they hold it (mapped).
void load_data(const AttnArgs& a, const AttnFiles& f, AttnRun& r) {
  r.files.emplace(a.out, a.lse, r.out_shape, r.lse_shape);
  const bool lse = r.files->lse.has_value();
  if (r.varlen && lse)
    r.lse_varlen.reset(
        new float[std::max<std::size_t>(static_cast<std::size_t>(r.cu_q.back() * r.hd.h), 1)]);
  r.q = load_storage("--q", f.q, r.dtype);
  r.k = load_storage("--k", f.k, r.dtype);
  r.v = load_storage("--v", f.v, r.dtype);
  if (f.qv) r.qv = load_storage("--qv", *f.qv, r.dtype);
  FwdParams& p = r.p;
  p.q = r.q.data();
  p.k = r.k.data();
  p.v = r.v.data();
  p.qv = f.qv ? r.qv.data() : nullptr;
  p.out = r.files->out.data();
  p.lse = !lse ? nullptr : r.varlen ? r.lse_varlen.get() : r.files->lse_data();
  set_contiguous_strides(p);  // for varlen the row dim is the first one
}

// Varlen, after the kernel: output 0 and LSE -inf on the rows no segment uses, and the
// kernel's LSE [h, cu_seqlens_q[b]] copied into the file's [h, total_q] (total_q = rows
// of --q, which may exceed cu_seqlens_q[b]).
void finish_varlen(AttnRun& r) {
  const std::int64_t seg_rows = r.cu_q.back(), rows_q = r.rows_q, h = r.hd.h, d_v = r.hd.d_v;
  std::vector<bool> covered(static_cast<std::size_t>(rows_q), false);
  for (int i = 0; i < r.p.b; ++i) {
    const std::int32_t used = r.used_q.empty() ? r.cu_q[i + 1] - r.cu_q[i] : r.used_q[i];
    for (std::int32_t row = r.cu_q[i]; row < r.cu_q[i] + used; ++row) covered[row] = true;
  }
  float* out = r.files->out.data();
  float* lse = r.files->lse_data();
  for (std::int64_t row = 0; row < rows_q; ++row) {
    if (!covered[row]) std::fill_n(out + row * h * d_v, h * d_v, 0.0f);
    if (!lse) continue;
    for (std::int64_t j = 0; j < h; ++j)
      lse[j * rows_q + row] = covered[row] ? r.lse_varlen[j * seg_rows + row] : kNegInf;
  }
}

void print_result(const AttnArgs& a, const AttnRun& r, const Engine& engine, double elapsed) {
  const FwdParams& p = r.p;
  if (a.json) {
    Json j;
    j["command"] = "attn";
    j["layout"] = r.varlen ? "varlen" : "dense";
    j["b"] = p.b;
    j["s_q"] = p.s_q;
    j["s_k"] = p.s_k;
    j["h"] = p.h;
    j["h_k"] = p.h_k;
    j["d"] = p.d;
    j["d_v"] = p.d_v;
    j["causal"] = p.mask.causal;
    j["qv"] = p.qv != nullptr;
    j["dtype"] = dtype_name(r.dtype);
    j["backend"] = engine.backend_name();
    j["threads"] = engine.threads();
    j["kernel_s"] = json_number(elapsed);
    std::printf("%s\n", json_dump(j).c_str());
    return;
  }
  std::printf(
      "attn: %s b=%d s_q=%d s_k=%d h=%d h_k=%d d=%d d_v=%d dtype=%s backend=%s threads=%d: %.3f "
      "ms\n",
      r.varlen ? "varlen" : "dense", p.b, p.s_q, p.s_k, p.h, p.h_k, p.d, p.d_v, dtype_name(r.dtype),
      engine.backend_name().c_str(), engine.threads(), elapsed * 1e3);
}

}  // namespace

int cmd_attn(int argc, char** argv) {
  AttnArgs a;
  if (!parse_args(argc, argv, options(a), kUsage, &a.vm)) return 0;
  check_options(a);
  const KernelSetup k = kernel_setup(a.mask, a.kernel);
  AttnRun r;
  r.varlen = a.varlen();
  r.dtype = k.dtype;
  const AttnFiles f = open_inputs(a, r);
  build_params(a, f, k.mask, r);
  load_data(a, f, r);
  const double elapsed = seconds_of([&] { k.engine.forward(r.p); });
  if (r.varlen) finish_varlen(r);
  r.files->commit();
  print_result(a, r, k.engine, elapsed);
  return 0;
}

}  // namespace ringattn::cli
