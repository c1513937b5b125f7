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

// Checks a cu_seqlens array: starts >= 0, non-decreasing, last entry <= total.
// Returns the longest segment.
int check_cu_seqlens(const std::string& opt, const std::vector<std::int32_t>& cu,
                     std::int64_t total, const std::string& total_what) {
  RA_CHECK_ARG_GE(cu.front(), 0, opt << ": first entry");
  int longest = 0;
  for (std::size_t i = 1; i < cu.size(); ++i) {
    RA_CHECK_ARG(cu[i] >= cu[i - 1], opt << ": must be non-decreasing, got entry " << i << " = "
                                         << cu[i] << " < entry " << i - 1 << " = " << cu[i - 1]);
    longest = std::max(longest, cu[i] - cu[i - 1]);
  }
  RA_CHECK_ARG(cu.back() <= total,
               opt << ": last entry " << cu.back() << " exceeds " << total_what << " = " << total);
  return longest;
}

}  // namespace

int cmd_attn(int argc, char** argv) {
  std::string q_path, k_path, v_path, out_path, lse_path, qv_path;
  std::string cu_q_path, cu_k_path, used_q_path, used_k_path;
  std::string q_ds_path, k_ds_path, v_ds_path;
  int max_seqlen_q = 0, max_seqlen_k = 0, num_splits = 0;
  bool json = false;
  MaskArgs mask_args;
  KernelArgs kernel_args;

  // Each flag once: name, help; the default is the variable's initial value.
  const auto flags = [&](auto& f) {
    f.group("Inputs and outputs");
    f(q_path, {"q", "queries: [b, s_q, h, d] or varlen [total_q, h, d]", kNoDefault});
    f(k_path, {"k", "keys: [b, s_k, h_k, d] or varlen [total_k, h_k, d]", kNoDefault});
    f(v_path, {"v", "values: [b, s_k, h_k, d_v] or varlen [total_k, h_k, d_v]", kNoDefault});
    f(qv_path, {"qv",
                "FA3 qv: extra query part [b, s_q, h, d_v] or varlen [total_q, h, d_v], same "
                "file dtype as --q (not fp8); score = scale * (q.k + qv.v), default scale "
                "1/sqrt(d + d_v)",
                kNoDefault});
    f(out_path, {"out", "output fp32 [b, s_q, h, d_v] or [total_q, h, d_v]", kNoDefault});
    f(lse_path, {"lse", "log-sum-exp fp32 [b, h, s_q] or [h, total_q]", kNoDefault});
    f(cu_q_path, {"cu-seqlens-q", "varlen: query segment offsets [b+1] int32/int64", kNoDefault});
    f(cu_k_path, {"cu-seqlens-k", "varlen: key segment offsets [b+1] int32/int64", kNoDefault});
    f(used_q_path, {"seqused-q", "varlen: query rows used per segment [b]", kNoDefault});
    f(used_k_path, {"seqused-k", "varlen: keys used per segment [b]", kNoDefault});
    f(max_seqlen_q, {"max-seqlen-q", "varlen: longest query segment; 0 = from cu_seqlens"});
    f(max_seqlen_k, {"max-seqlen-k", "varlen: longest key segment; 0 = from cu_seqlens"});
    f(q_ds_path, {"q-descale", "--dtype fp8: q descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(k_ds_path, {"k-descale", "--dtype fp8: k descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(v_ds_path, {"v-descale", "--dtype fp8: v descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(num_splits, {"num-splits", "key splits: 0 = engine decides, 1 = none"});
    f(json,
      {"json", "print the result as one JSON object (kernel_s = seconds in the kernel call)"});
    f.group("Mask");
    mask_args.for_each(f);
    f.group("Kernel");
    kernel_args.for_each(f);
  };
  po::variables_map vm;
  if (!parse_args(argc, argv, options_of(flags), kUsage, &vm)) return 0;
  require(vm, "q");
  require(vm, "k");
  require(vm, "v");
  RA_CHECK_ARG_GE(max_seqlen_q, 0, "--max-seqlen-q: must be >= 0");
  RA_CHECK_ARG_GE(max_seqlen_k, 0, "--max-seqlen-k: must be >= 0");
  RA_CHECK_ARG_GE(num_splits, 0, "--num-splits: must be >= 0");
  const bool varlen = vm.count("cu-seqlens-q") || vm.count("cu-seqlens-k");
  if (varlen) {
    require(vm, "cu-seqlens-q");
    require(vm, "cu-seqlens-k");
  } else {
    RA_CHECK_ARG(!vm.count("seqused-q") && !vm.count("seqused-k"),
                 "--seqused-q/--seqused-k: only valid with --cu-seqlens-q/--cu-seqlens-k (varlen)");
  }
  const DType dtype = attn_tensor_dtype(kernel_args);
  const MaskParams mask_params = to_mask_params(mask_args);
  const Engine engine = make_engine(kernel_args);

  // Headers first: every shape is checked before any data is read.
  const int rank = varlen ? 3 : 4;
  const NpyFile q_file = open_attn_tensor("--q", q_path, rank, dtype);
  const NpyFile k_file = open_attn_tensor("--k", k_path, rank, dtype);
  const NpyFile v_file = open_attn_tensor("--v", v_path, rank, dtype);
  const NpyHeader &q = q_file.header(), &k = k_file.header(), &v = v_file.header();
  const int hd = rank - 2;  // index of the head dim in the shapes
  if (!varlen) {
    check_dim("--k", k, 0, "--q", q, 0, "batch");
    check_dim("--v", v, 0, "--q", q, 0, "batch");
  }
  check_dim("--v", v, hd - 1, "--k", k, hd - 1, "keys");
  check_dim("--v", v, hd, "--k", k, hd, "kv heads");
  check_dim("--k", k, hd + 1, "--q", q, hd + 1, "head dim");
  const std::int64_t h = q.shape[hd], h_k = k.shape[hd];
  RA_CHECK_ARG(h_k > 0 && h % h_k == 0,
               "--k: kv heads h_k = " << h_k << " must divide --q heads h = " << h << " (--q shape "
                                      << shape_to_string(q.shape) << ", --k shape "
                                      << shape_to_string(k.shape) << ")");
  const std::int64_t d = q.shape[hd + 1], d_v = v.shape[hd + 1];
  std::optional<NpyFile> qv_file;
  if (vm.count("qv")) {
    qv_file.emplace(open_tensor("--qv", qv_path, rank));
    RA_CHECK_ARG(qv_file->header().dtype == q.dtype,
                 "--qv: file dtype " << npy_descr(qv_file->header().dtype) << " must equal --q's "
                                     << npy_descr(q.dtype));
    RA_CHECK_ARG(d_v <= kMaxHeadDim, "--qv: d_v = " << d_v << " (--v head dim) exceeds the limit "
                                                    << kMaxHeadDim
                                                    << " of the attention kernels; absorbed MLA "
                                                       "(d_v = 512) runs through `ringattn mla`");
  }
  RA_CHECK_ARG(
      d <= kMaxHeadDim && d_v <= kMaxHeadDim,
      "--q/--v: head dims must be <= " << kMaxHeadDim << ", got d = " << d << ", d_v = " << d_v);

  const std::vector<float> sinks = load_sinks(mask_args, h);
  FwdParams p;
  p.dtype = dtype;
  p.out_dtype = DType::kF32;
  p.mask = mask_params;
  if (!sinks.empty()) p.mask.sinks = sinks.data();
  p.num_splits = num_splits;
  p.h = static_cast<int>(h);
  p.h_k = static_cast<int>(h_k);
  p.d = static_cast<int>(d);
  p.d_v = static_cast<int>(d_v);

  std::vector<std::int32_t> cu_q, cu_k, used_q, used_k;
  std::vector<std::int64_t> out_shape, lse_shape;
  std::int64_t rows_q = 0;  // query rows in all: b * s_q or total_q
  if (varlen) {
    const NpyArray cq = load_npy_arg("--cu-seqlens-q", cu_q_path);
    RA_CHECK_ARG(
        cq.ndim() == 1 && cq.shape[0] >= 2,
        "--cu-seqlens-q: expected shape [b+1] with b >= 1, got " << shape_to_string(cq.shape));
    const std::int64_t b = cq.shape[0] - 1;
    cu_q = cq.to_i32("--cu-seqlens-q");
    cu_k = load_index("--cu-seqlens-k", cu_k_path, {b + 1});
    const int longest_q = check_cu_seqlens("--cu-seqlens-q", cu_q, q.shape[0], "--q total_q");
    const int longest_k = check_cu_seqlens("--cu-seqlens-k", cu_k, k.shape[0], "--k total_k");
    if (vm.count("seqused-q")) used_q = load_index("--seqused-q", used_q_path, {b});
    if (vm.count("seqused-k")) used_k = load_index("--seqused-k", used_k_path, {b});
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
    if (max_seqlen_q > 0)
      RA_CHECK_ARG_GE(max_seqlen_q, longest_q, "--max-seqlen-q: must cover the longest segment");
    if (max_seqlen_k > 0)
      RA_CHECK_ARG_GE(max_seqlen_k, longest_k, "--max-seqlen-k: must cover the longest segment");
    p.b = static_cast<int>(b);
    p.s_q = max_seqlen_q > 0 ? max_seqlen_q : longest_q;
    p.s_k = max_seqlen_k > 0 ? max_seqlen_k : longest_k;
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    p.seqused_q = used_q.empty() ? nullptr : used_q.data();
    p.seqused_k = used_k.empty() ? nullptr : used_k.data();
    rows_q = q.shape[0];
    out_shape = {rows_q, h, d_v};
    lse_shape = {h, rows_q};
  } else {
    RA_CHECK_ARG(vm.count("max-seqlen-q") == 0 || vm["max-seqlen-q"].defaulted(),
                 "--max-seqlen-q: only valid with --cu-seqlens-q (varlen)");
    RA_CHECK_ARG(vm.count("max-seqlen-k") == 0 || vm["max-seqlen-k"].defaulted(),
                 "--max-seqlen-k: only valid with --cu-seqlens-k (varlen)");
    p.b = static_cast<int>(q.shape[0]);
    p.s_q = static_cast<int>(q.shape[1]);
    p.s_k = static_cast<int>(k.shape[1]);
    rows_q = q.shape[0] * q.shape[1];
    out_shape = {q.shape[0], q.shape[1], h, d_v};
    lse_shape = {q.shape[0], h, q.shape[1]};
  }

  Descales descales;
  load_descales(q_ds_path, k_ds_path, v_ds_path, dtype, p.b, h_k, descales, p.descale);
  if (qv_file) {
    check_shape("--qv", qv_file->header(), out_shape,
                "shaped as the output [" + std::string(varlen ? "total_q" : "b, s_q") +
                    ", h, d_v]; --q shape " + shape_to_string(q.shape) + ", --v shape " +
                    shape_to_string(v.shape));
  }

  // Output files are created before anything is computed (a bad path fails at once)
  // and the kernel writes into them directly. Dense: the kernel writes every element.
  // Varlen: rows outside every segment (or beyond seqused_q) are set to output 0,
  // LSE -inf after the kernel, and the LSE goes through a [h, cu_seqlens_q[b]] buffer.
  OutputTensor out("--out", out_path, out_shape);
  std::optional<OutputTensor> lse;
  if (!lse_path.empty()) lse.emplace("--lse", lse_path, lse_shape);
  std::unique_ptr<float[]> lse_varlen;
  if (varlen && lse)
    lse_varlen.reset(
        new float[std::max<std::size_t>(static_cast<std::size_t>(cu_q.back() * h), 1)]);
  // Inputs in storage dtype: the files themselves when they hold it (mapped).
  const StoredTensor qs = load_storage("--q", q_file, dtype),
                     ks = load_storage("--k", k_file, dtype),
                     vs = load_storage("--v", v_file, dtype);
  std::optional<StoredTensor> qvs;
  if (qv_file) qvs.emplace(load_storage("--qv", *qv_file, dtype));
  p.q = qs.data();
  p.k = ks.data();
  p.v = vs.data();
  p.qv = qvs ? qvs->data() : nullptr;
  p.out = out.data();
  p.lse = !lse ? nullptr : varlen ? lse_varlen.get() : lse->data();
  set_contiguous_strides(p);  // for varlen the row dim is the first one

  const double t0 = now_seconds();
  engine.forward(p);
  const double elapsed = now_seconds() - t0;
  if (varlen) {
    // The kernel's varlen LSE is [h, cu_seqlens_q[b]]; the file's is [h, total_q]
    // (total_q = rows of --q, which may exceed cu_seqlens_q[b]).
    const std::int64_t seg_rows = cu_q.back();
    std::vector<bool> covered(static_cast<std::size_t>(rows_q), false);
    for (int i = 0; i < p.b; ++i) {
      const std::int32_t used = used_q.empty() ? cu_q[i + 1] - cu_q[i] : used_q[i];
      for (std::int32_t r = cu_q[i]; r < cu_q[i] + used; ++r) covered[r] = true;
    }
    for (std::int64_t r = 0; r < rows_q; ++r) {
      if (!covered[r]) std::fill_n(out.data() + r * h * d_v, h * d_v, 0.0f);
      if (!lse) continue;
      for (std::int64_t j = 0; j < h; ++j)
        lse->data()[j * rows_q + r] = covered[r] ? lse_varlen[j * seg_rows + r] : kNegInf;
    }
  }
  out.commit();
  if (lse) lse->commit();

  if (json) {
    Json j;
    j["command"] = "attn";
    j["layout"] = varlen ? "varlen" : "dense";
    j["b"] = p.b;
    j["s_q"] = p.s_q;
    j["s_k"] = p.s_k;
    j["h"] = p.h;
    j["h_k"] = p.h_k;
    j["d"] = p.d;
    j["d_v"] = p.d_v;
    j["causal"] = p.mask.causal;
    j["qv"] = p.qv != nullptr;
    j["dtype"] = dtype_name(dtype);
    j["backend"] = engine.backend_name();
    j["threads"] = engine.threads();
    j["kernel_s"] = json_number(elapsed);
    std::printf("%s\n", json_dump(j).c_str());
    return 0;
  }
  std::printf(
      "attn: %s b=%d s_q=%d s_k=%d h=%d h_k=%d d=%d d_v=%d dtype=%s backend=%s threads=%d: %.3f "
      "ms\n",
      varlen ? "varlen" : "dense", p.b, p.s_q, p.s_k, p.h, p.h_k, p.d, p.d_v, dtype_name(dtype),
      engine.backend_name().c_str(), engine.threads(), elapsed * 1e3);
  return 0;
}

}  // namespace ringattn::cli
