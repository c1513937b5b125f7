// `ringattn kvcache`: attention against a dense or paged KV cache with optional
// in-place append of new keys/values (docs/semantics.md section 3, FA3 flash_attn_with_kvcache).
//   --q            [b, s_q, h, d]
//   --k-cache      dense [b_cache, s_cache, h_k, d]    paged [num_blocks, page_size, h_k, d]
//   --v-cache      dense [b_cache, s_cache, h_k, d_v]  paged [num_blocks, page_size, h_k, d_v]
//   --cache-seqlens [b] valid tokens per sequence before the append
//   --page-table   [b, max_pages] (paged iff given)
//   --k-new/--v-new [b, s_new, h_k, d / d_v] appended at [cache_seqlens, +s_new)
//   --cache-batch-idx [b], --cache-leftpad [b], --rotary-cos/--rotary-sin [s_rotary, rotary_dim/2]
// Writes --out [b, s_q, h, d_v] fp32, --lse [b, h, s_q] fp32 (natural log), and the
// updated caches (--k-cache-out/--v-cache-out) in the dtype of the input cache files.
// --dtype fp8: every float operand is an e4m3 byte file (|u1), the caches written back
// as bytes; --q-descale/--k-descale/--v-descale [b, h_k]; --out/--lse stay fp32.
// Variable lengths (chunked prefill): --cu-seqlens-q [b+1] makes --q [total_q, h, d]
// (--out [total_q, h, d_v], --lse [h, total_q]); --cu-seqlens-k-new [b+1] makes
// --k-new/--v-new [total_new, h_k, d / d_v], sequence i appending its own segment.
// --qv (FA3): extra query part shaped as --out, same file dtype as --q, not rotated;
// score = scale * (q . k + qv . v), default scale 1/sqrt(d + d_v).
#include <algorithm>
#include <cstdio>
#include <optional>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: ringattn kvcache --q Q.npy --k-cache K.npy --v-cache V.npy --cache-seqlens L.npy\n"
    "                        [--page-table P.npy] [--k-new KN.npy --v-new VN.npy] [--out O.npy]\n"
    "                        [--lse LSE.npy] [--k-cache-out K2.npy --v-cache-out V2.npy] "
    "[options]\n"
    "\n"
    "Attention of --q against a KV cache (paged iff --page-table is given), appending\n"
    "--k-new/--v-new in place first. Inputs are <f4 or <f2 (--dtype fp8: |u1 files of e4m3\n"
    "bytes, caches and new rows alike, with optional --q-descale/--k-descale/--v-descale\n"
    "[b, h_k]); index tensors <i4 or <i8. --out/--lse are fp32.";

// The options of `ringattn kvcache`, each declared once (cli/args.hpp).
struct KvcacheArgs : MaskKernelArgs {
  std::string q, k_cache, v_cache, cache_seqlens, page_table;
  DescaleArgs descale;
  std::string k_new, v_new, cache_batch_idx, cache_leftpad;
  std::string rotary_cos, rotary_sin, rotary_seqlens;
  bool rotary_interleaved = false;
  int num_splits = 0;
  std::string cu_seqlens_q;
  int max_seqlen_q = 0;
  std::string cu_seqlens_k_new, qv, out, lse, k_cache_out, v_cache_out;

  template <class V>
  void for_each(V& f) {
    f.group("Inputs and outputs");
    f(q, {"q", "queries [b, s_q, h, d]", kNoDefault});
    f(k_cache,
      {"k-cache",
       "key cache: dense [b_cache, s_cache, h_k, d] or paged [num_blocks, page_size, h_k, d]",
       kNoDefault});
    f(v_cache, {"v-cache", "value cache, same layout as --k-cache with head dim d_v", kNoDefault});
    f(cache_seqlens, {"cache-seqlens",
                      "[b] int32/int64: valid tokens per sequence before the append", kNoDefault});
    f(page_table, {"page-table", "[b, max_pages] int32/int64: makes the cache paged", kNoDefault});
    descale.for_each(f);
    f(k_new, {"k-new", "new keys [b, s_new, h_k, d] appended in place", kNoDefault});
    f(v_new, {"v-new", "new values [b, s_new, h_k, d_v] appended in place", kNoDefault});
    f(cache_batch_idx,
      {"cache-batch-idx", "[b] int: cache sequence used by each batch element (dense cache)",
       kNoDefault});
    f(cache_leftpad,
      {"cache-leftpad", "[b] int: first valid cache token per sequence", kNoDefault});
    f(rotary_cos, {"rotary-cos", "rotary cos table [s_rotary, rotary_dim/2]", kNoDefault});
    f(rotary_sin, {"rotary-sin", "rotary sin table [s_rotary, rotary_dim/2]", kNoDefault});
    f(rotary_seqlens,
      {"rotary-seqlens",
       "[b] int: rotary position of each sequence's first new row (default --cache-seqlens)",
       kNoDefault});
    f(rotary_interleaved,
      {"rotary-interleaved", "rotate pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)"});
    f(num_splits, {"num-splits", "split-KV: 0 = engine decides, 1 = none, n = n splits"});
    f(cu_seqlens_q,
      {"cu-seqlens-q",
       "varlen queries: [b+1] int32/int64 offsets into --q [total_q, h, d] (chunked prefill)",
       kNoDefault});
    f(max_seqlen_q,
      {"max-seqlen-q", "varlen queries: longest query segment; 0 = from --cu-seqlens-q"});
    f(cu_seqlens_k_new,
      {"cu-seqlens-k-new",
       "varlen new keys: [b+1] offsets into --k-new/--v-new [total_new, h_k, d]", kNoDefault});
    f(qv, {"qv",
           "FA3 qv: extra query part [b, s_q, h, d_v] (varlen [total_q, h, d_v]), same "
           "file dtype as --q (not fp8), not rotated; score = scale * (q.k + qv.v), "
           "default scale 1/sqrt(d + d_v)",
           kNoDefault});
    f(out, {"out", "output fp32 [b, s_q, h, d_v]", kNoDefault});
    f(lse, {"lse", "log-sum-exp fp32 [b, h, s_q]", kNoDefault});
    f(k_cache_out, {"k-cache-out", "updated key cache (dtype of --k-cache)", kNoDefault});
    f(v_cache_out, {"v-cache-out", "updated value cache (dtype of --v-cache)", kNoDefault});
    mask_and_kernel(f, "Mask", "Kernel");
  }
  bool paged() const { return vm.count("page-table") > 0; }
  bool varlen_q() const { return vm.count("cu-seqlens-q") > 0; }
  bool varlen_new() const { return vm.count("cu-seqlens-k-new") > 0; }
};

// The headers of --q, --k-cache and --v-cache (data still in the files).
struct KvcacheFiles {
  NpyFile q, kc, vc;
};

// The problem as loaded: the params and everything they point into.
struct KvcacheRun {
  DType dtype = DType::kF32;
  KvCacheParams p;
  AttnHeads hd;
  std::int64_t b = 0, s_q = 0, total_q = 0;
  std::vector<float> sinks, rot_cos, rot_sin;
  Descales descales;
  std::vector<std::int32_t> cu_q, cu_new, seqlens, page_table, batch_idx, leftpad, rot_seqlens;
  StoredTensor q, qv, k_cache, v_cache, k_new, v_new;
  std::optional<OutLseFiles> files;
  NpyOutput kc_out, vc_out;
};

// The option checks that need no file.
void check_options(const KvcacheArgs& a) {
  require(a.vm, "q");
  require(a.vm, "k-cache");
  require(a.vm, "v-cache");
  require(a.vm, "cache-seqlens");
  RA_CHECK_ARG(a.vm.count("k-new") == a.vm.count("v-new"),
               "--k-new/--v-new: must be given together");
  RA_CHECK_ARG(a.vm.count("rotary-cos") == a.vm.count("rotary-sin"),
               "--rotary-cos/--rotary-sin: must be given together");
  const int num_splits = a.num_splits;  // named by the check
  RA_CHECK_ARG_GE(num_splits, 0, "--num-splits: must be >= 0");
  RA_CHECK_ARG(!(a.paged() && a.vm.count("cache-batch-idx")),
               "--cache-batch-idx: only valid with a dense cache (no --page-table)");
}

// The varlen options checked, then the headers: every shape is checked before any data
// is read.
KvcacheFiles open_inputs(const KvcacheArgs& a, DType dtype) {
  const bool vq = a.varlen_q(), vk = a.varlen_new(), paged = a.paged();
  RA_CHECK_ARG(vq || !given(a.vm, "max-seqlen-q"),
               "--max-seqlen-q: only valid with --cu-seqlens-q");
  RA_CHECK_ARG(!vk || a.vm.count("k-new"), "--cu-seqlens-k-new: needs --k-new/--v-new");
  const int max_seqlen_q = a.max_seqlen_q;  // named by the check
  RA_CHECK_ARG_GE(max_seqlen_q, 0, "--max-seqlen-q: must be >= 0");
  KvcacheFiles f{open_attn_tensor("--q", a.q, vq ? 3 : 4, dtype),
                 open_attn_tensor("--k-cache", a.k_cache, 4, dtype),
                 open_attn_tensor("--v-cache", a.v_cache, 4, dtype)};
  const int qh = vq ? 1 : 2;  // index of the heads dim of --q
  const NpyHeader &q = f.q.header(), &kc = f.kc.header(), &vc = f.vc.header();
  check_dim("--v-cache", vc, 0, "--k-cache", kc, 0, paged ? "blocks" : "cache sequences");
  check_dim("--v-cache", vc, 1, "--k-cache", kc, 1, paged ? "page size" : "cache capacity");
  check_dim("--v-cache", vc, 2, "--k-cache", kc, 2, "kv heads");
  check_dim("--k-cache", kc, 3, "--q", q, qh + 1, "head dim");
  return f;
}

// Offsets [b+1]: start at 0, non-decreasing, end at the rows of `rows_opt`.
std::vector<std::int32_t> load_cu(const char* opt, const std::string& path, std::int64_t rows,
                                  const char* rows_opt, std::int64_t* longest) {
  std::vector<std::int32_t> cu = load_offsets(opt, path);
  RA_CHECK_ARG_EQ(cu.front(), 0, opt << ": first entry");
  *longest = longest_segment(opt, cu);
  RA_CHECK_ARG_EQ(std::int64_t{cu.back()}, rows,
                  opt << ": last entry must equal the rows of " << rows_opt);
  return cu;
}

// The query's shape (from --q, or --cu-seqlens-q and --max-seqlen-q), the heads, and
// the params they and the options give.
void query_params(const KvcacheArgs& a, const KvcacheFiles& f, const MaskParams& mask,
                  KvcacheRun& r) {
  const bool vq = a.varlen_q();
  const NpyHeader &q = f.q.header(), &kc = f.kc.header();
  std::int64_t longest_q = 0;
  if (vq) r.cu_q = load_cu("--cu-seqlens-q", a.cu_seqlens_q, q.shape[0], "--q", &longest_q);
  const int max_seqlen_q = a.max_seqlen_q;  // named by the check
  if (vq && max_seqlen_q > 0)
    RA_CHECK_ARG_GE(max_seqlen_q, longest_q, "--max-seqlen-q: must cover the longest segment");
  const int qh = vq ? 1 : 2;  // index of the heads dim of --q
  r.b = vq ? static_cast<std::int64_t>(r.cu_q.size()) - 1 : q.shape[0];
  r.s_q = vq ? (max_seqlen_q > 0 ? max_seqlen_q : longest_q) : q.shape[1];
  r.total_q = vq ? q.shape[0] : r.b * r.s_q;
  r.hd = {q.shape[qh], kc.shape[2], q.shape[qh + 1], f.vc.header().shape[3]};
  check_kv_heads("--k-cache", q, kc, r.hd);
  r.sinks = load_sinks(a.mask, r.hd.h);
  set_attn_params(r.p, r.dtype, mask, r.sinks, a.num_splits, r.hd);
  r.p.b = static_cast<int>(r.b);
  r.p.s_q = static_cast<int>(r.s_q);
  load_descales(a.descale, r.dtype, r.b, r.hd.h_k, r.descales, r.p.descale);
}

// --cache-seqlens, the page table (paged) or the cache's extent (dense),
// --cache-batch-idx and --cache-leftpad.
void load_cache_index(const KvcacheArgs& a, const NpyHeader& kc, KvcacheRun& r) {
  KvCacheParams& p = r.p;
  const std::int64_t b = r.b;
  r.seqlens = load_index("--cache-seqlens", a.cache_seqlens, {b});
  p.cache_seqlens = r.seqlens.data();
  if (a.paged()) {
    const NpyArray pt = load_npy_arg("--page-table", a.page_table);
    RA_CHECK_ARG(pt.is_index() && pt.ndim() == 2 && pt.shape[0] == b,
                 "--page-table: expected an integer tensor [b, max_pages] with b = "
                     << b << " (from --q), got " << npy_descr(pt.dtype) << " "
                     << shape_to_string(pt.shape));
    r.page_table = pt.to_i32("--page-table");
    p.page_table = r.page_table.data();
    p.max_pages = static_cast<int>(pt.shape[1]);
    p.num_blocks = static_cast<int>(kc.shape[0]);
    p.page_size = static_cast<int>(kc.shape[1]);
  } else {
    p.b_cache = static_cast<int>(kc.shape[0]);
    p.s_cache = static_cast<int>(kc.shape[1]);
  }
  if (a.vm.count("cache-batch-idx")) {
    r.batch_idx = load_index("--cache-batch-idx", a.cache_batch_idx, {b});
    p.cache_batch_idx = r.batch_idx.data();
  }
  if (a.vm.count("cache-leftpad")) {
    r.leftpad = load_index("--cache-leftpad", a.cache_leftpad, {b});
    p.cache_leftpad = r.leftpad.data();
  }
}

// --k-new/--v-new [b, s_new, h_k, d / d_v] (varlen: [total_new, h_k, d / d_v] with
// --cu-seqlens-k-new), checked against the caches and read in storage dtype.
void load_new(const KvcacheArgs& a, const KvcacheFiles& f, KvcacheRun& r) {
  const bool vk = a.varlen_new();
  const std::int64_t b = r.b;
  const int nd = vk ? 3 : 4, nh = nd - 2;  // rank and heads dim of --k-new/--v-new
  const NpyFile kn_file = open_attn_tensor("--k-new", a.k_new, nd, r.dtype);
  const NpyFile vn_file = open_attn_tensor("--v-new", a.v_new, nd, r.dtype);
  const NpyHeader &kn = kn_file.header(), &vn = vn_file.header();
  const NpyHeader &kc = f.kc.header(), &vc = f.vc.header();
  if (!vk) {
    RA_CHECK_ARG_EQ(kn.shape[0], b, "--k-new: batch (dim 0) must equal the batch of --q");
    check_dim("--v-new", vn, 0, "--k-new", kn, 0, "batch");
  }
  check_dim("--v-new", vn, nh - 1, "--k-new", kn, nh - 1, "new tokens");
  check_dim("--k-new", kn, nh, "--k-cache", kc, 2, "kv heads");
  check_dim("--v-new", vn, nh, "--k-cache", kc, 2, "kv heads");
  check_dim("--k-new", kn, nh + 1, "--k-cache", kc, 3, "head dim");
  check_dim("--v-new", vn, nh + 1, "--v-cache", vc, 3, "value head dim");
  std::int64_t longest_new = 0;
  if (vk) {
    std::vector<std::int32_t>& cu_new = r.cu_new;  // named by the check
    cu_new =
        load_cu("--cu-seqlens-k-new", a.cu_seqlens_k_new, kn.shape[0], "--k-new", &longest_new);
    RA_CHECK_ARG_EQ(static_cast<std::int64_t>(cu_new.size()) - 1, b,
                    "--cu-seqlens-k-new: batch (entries - 1) must equal the batch of --q");
    r.p.cu_seqlens_k_new = cu_new.data();
  }
  r.k_new = load_storage("--k-new", kn_file, r.dtype);
  r.v_new = load_storage("--v-new", vn_file, r.dtype);
  r.p.s_new = static_cast<int>(vk ? longest_new : kn.shape[1]);
  r.p.k_new = r.k_new.data();
  r.p.v_new = r.v_new.data();
}

// --rotary-cos/--rotary-sin [s_rotary, rotary_dim/2], --rotary-interleaved and
// --rotary-seqlens [b].
void load_rotary(const KvcacheArgs& a, KvcacheRun& r) {
  KvCacheParams& p = r.p;
  const std::int64_t d = r.hd.d;
  if (a.vm.count("rotary-cos")) {
    const NpyArray c = load_tensor("--rotary-cos", a.rotary_cos, 2);
    const NpyArray s = load_tensor("--rotary-sin", a.rotary_sin, 2);
    check_shape("--rotary-sin", s, c.shape, "must match --rotary-cos");
    RA_CHECK_ARG(c.shape[1] >= 1 && 2 * c.shape[1] <= d,
                 "--rotary-cos: rotary_dim = 2 * " << c.shape[1] << " must be in [2, head dim " << d
                                                   << "] (shape " << shape_to_string(c.shape)
                                                   << ")");
    r.rot_cos = c.to_f32();
    r.rot_sin = s.to_f32();
    p.rotary_cos = r.rot_cos.data();
    p.rotary_sin = r.rot_sin.data();
    p.rotary_dim = static_cast<int>(2 * c.shape[1]);
    p.s_rotary = static_cast<int>(c.shape[0]);
    p.rotary_interleaved = a.rotary_interleaved;
  }
  if (a.vm.count("rotary-seqlens")) {
    RA_CHECK_ARG(a.vm.count("rotary-cos"), "--rotary-seqlens: needs --rotary-cos/--rotary-sin");
    r.rot_seqlens = load_index("--rotary-seqlens", a.rotary_seqlens, {r.b});
    p.rotary_seqlens = r.rot_seqlens.data();
  }
}

// Output files are created before anything is computed (a bad path fails at once);
// the kernel writes out/lse into them directly (it writes every element). Then the
// inputs in storage dtype: the files themselves when they hold it (mapped; the caches
// copy-on-write, as the append writes into them and never into the files).
void load_data(const KvcacheArgs& a, const KvcacheFiles& f, KvcacheRun& r) {
  const bool vq = a.varlen_q();
  const std::int64_t b = r.b, s_q = r.s_q, total_q = r.total_q, h = r.hd.h, d_v = r.hd.d_v;
  const std::vector<std::int64_t> out_shape =
      vq ? std::vector<std::int64_t>{total_q, h, d_v} : std::vector<std::int64_t>{b, s_q, h, d_v};
  const std::vector<std::int64_t> lse_shape =
      vq ? std::vector<std::int64_t>{h, total_q} : std::vector<std::int64_t>{b, h, s_q};
  std::optional<NpyFile> qv_file;
  if (a.vm.count("qv")) {
    qv_file.emplace(open_qv(a.qv, vq ? 3 : 4, f.q.header(), d_v, "--v-cache"));
    check_qv_shape(qv_file->header(), out_shape, vq, f.q.header(), "--v-cache", f.vc.header());
  }
  r.files.emplace(a.out, a.lse, out_shape, lse_shape);
  if (!a.k_cache_out.empty()) r.kc_out = open_output("--k-cache-out", a.k_cache_out, f.kc.header());
  if (!a.v_cache_out.empty()) r.vc_out = open_output("--v-cache-out", a.v_cache_out, f.vc.header());
  r.q = load_storage("--q", f.q, r.dtype);
  if (qv_file) r.qv = load_storage("--qv", *qv_file, r.dtype);
  r.k_cache = load_storage("--k-cache", f.kc, r.dtype, true);
  r.v_cache = load_storage("--v-cache", f.vc, r.dtype, true);
  KvCacheParams& p = r.p;
  p.qv = qv_file ? r.qv.data() : nullptr;
  if (vq) p.cu_seqlens_q = r.cu_q.data();
  p.q = r.q.data();
  p.k_cache = r.k_cache.data();
  p.v_cache = r.v_cache.data();
  p.out = r.files->out.data();
  p.lse = r.files->lse_data();
  set_contiguous_strides(p);
}

// The outputs and the updated caches (in the dtype of the input cache files) written.
void write_outputs(const KvcacheFiles& f, KvcacheRun& r) {
  r.files->commit();
  if (r.kc_out.is_open())
    commit_output("--k-cache-out", r.kc_out, r.k_cache.data(), r.dtype, f.kc.header().dtype);
  if (r.vc_out.is_open())
    commit_output("--v-cache-out", r.vc_out, r.v_cache.data(), r.dtype, f.vc.header().dtype);
}

void print_result(const KvcacheArgs& a, const KvcacheRun& r, const Engine& engine, double elapsed) {
  const KvCacheParams& p = r.p;
  std::printf(
      "kvcache: %s b=%d s_q=%d h=%d h_k=%d d=%d d_v=%d s_new=%d dtype=%s backend=%s threads=%d: "
      "%.3f ms\n",
      a.paged() ? "paged" : "dense", p.b, p.s_q, p.h, p.h_k, p.d, p.d_v, p.s_new,
      dtype_name(r.dtype), engine.backend_name().c_str(), engine.threads(), elapsed * 1e3);
}

}  // namespace

int cmd_kvcache(int argc, char** argv) {
  KvcacheArgs a;
  if (!parse_args(argc, argv, options(a), kUsage, &a.vm)) return 0;
  check_options(a);
  const KernelSetup k = kernel_setup(a.mask, a.kernel);
  KvcacheRun r;
  r.dtype = k.dtype;
  const KvcacheFiles f = open_inputs(a, r.dtype);
  query_params(a, f, k.mask, r);
  load_cache_index(a, f.kc.header(), r);
  if (a.vm.count("k-new")) load_new(a, f, r);
  load_rotary(a, r);
  load_data(a, f, r);
  const double elapsed = seconds_of([&] { k.engine.forward_kvcache(r.p); });
  write_outputs(f, r);
  print_result(a, r, k.engine, elapsed);
  return 0;
}

}  // namespace ringattn::cli
