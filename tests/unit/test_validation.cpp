// Argument validation through the public Engine: every bad input throws
// ringattn::InvalidArgument whose message names the argument and includes the
// values that were compared; an explicit backend this CPU cannot run throws
// UnsupportedError naming the missing feature. Each case starts from a valid
// call (checked to run) and breaks exactly one thing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cpu_features.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/error.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

// Runs `call`, expects InvalidArgument, and checks that its message (without the
// file:line suffix) contains every string in `needles`.
void expect_invalid(const std::string& what, const std::function<void()>& call,
                    const std::vector<std::string>& needles) {
  SCOPED_TRACE(what);
  try {
    call();
    ADD_FAILURE() << what << ": no exception thrown";
  } catch (const InvalidArgument& e) {
    for (const auto& n : needles) {
      EXPECT_NE(e.message().find(n), std::string::npos)
          << what << ": message does not mention '" << n << "': " << e.what();
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected InvalidArgument, got: " << e.what();
  }
}

// A small valid dense problem: b=2, s_q=4, s_k=6, h=6, h_k=2, d=d_v=64, fp32.
struct DenseFixture {
  Tensor q = make_tensor(DType::kF32, {2, 4, 6, 64});
  Tensor k = make_tensor(DType::kF32, {2, 6, 2, 64});
  Tensor v = make_tensor(DType::kF32, {2, 6, 2, 64});
  Tensor out = make_tensor(DType::kF32, {2, 4, 6, 64});
  std::vector<float> lse = std::vector<float>(2 * 6 * 4);
  FwdParams p;
  DenseFixture() {
    std::mt19937_64 rng(1);
    fill_normal(q, rng);
    fill_normal(k, rng);
    fill_normal(v, rng);
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.out = out.data();
    p.lse = lse.data();
    set_strides(p, q, k, v, out);
    p.b = 2;
    p.s_q = 4;
    p.s_k = 6;
    p.h = 6;
    p.h_k = 2;
    p.d = p.d_v = 64;
  }
};

class Validation : public ::testing::Test {
 protected:
  Engine engine{EngineOptions{"reference", 1}};
};

TEST_F(Validation, ValidBaselinesRun) {
  DenseFixture f;
  EXPECT_NO_THROW(engine.forward(f.p));
  KvCase c;
  c.name = "validation_kv";
  c.seqlens = {5, 9};
  c.s_new = 1;
  c.page_size = 4;
  KvProblem kv = make_kv_problem(c);
  EXPECT_NO_THROW(engine.forward_kvcache(kv.p));
}

TEST_F(Validation, DenseShapes) {
  auto run = [&](const std::function<void(FwdParams&)>& edit) {
    return [this, edit] {
      DenseFixture f;
      edit(f.p);
      engine.forward(f.p);
    };
  };
  expect_invalid("b = 0", run([](FwdParams& p) { p.b = 0; }), {"b", "0"});
  expect_invalid("b = -3", run([](FwdParams& p) { p.b = -3; }), {"b", "-3"});
  expect_invalid("s_q = -2", run([](FwdParams& p) { p.s_q = -2; }), {"s_q", "-2"});
  expect_invalid("s_k = -5", run([](FwdParams& p) { p.s_k = -5; }), {"s_k", "-5"});
  expect_invalid("h = 0", run([](FwdParams& p) { p.h = 0; }), {"h", "0"});
  expect_invalid("h_k = 0", run([](FwdParams& p) { p.h_k = 0; }), {"h_k", "0"});
  expect_invalid("h % h_k != 0", run([](FwdParams& p) { p.h_k = 4; }), {"h_k", "6", "4"});
  expect_invalid("d > 256", run([](FwdParams& p) { p.d = 264; }), {"d", "264"});
  expect_invalid("d not a multiple of 8", run([](FwdParams& p) { p.d = 60; }), {"d", "60"});
  expect_invalid("d_v > 256", run([](FwdParams& p) { p.d_v = 320; }), {"d_v", "320"});
  expect_invalid("d_v = 0", run([](FwdParams& p) { p.d_v = 0; }), {"d_v", "0"});
}

TEST_F(Validation, DenseStridesAndOptions) {
  auto run = [&](const std::function<void(FwdParams&)>& edit) {
    return [this, edit] {
      DenseFixture f;
      edit(f.p);
      engine.forward(f.p);
    };
  };
  expect_invalid("negative q row stride", run([](FwdParams& p) { p.q_row_stride = -384; }),
                 {"q", "row", "-384"});
  expect_invalid("k head stride inside a row", run([](FwdParams& p) { p.k_head_stride = 5; }),
                 {"k", "head", "5"});
  expect_invalid("v batch stride inside a row", run([](FwdParams& p) { p.v_batch_stride = 7; }),
                 {"v", "batch", "7"});
  expect_invalid("overlapping out rows", run([](FwdParams& p) { p.out_row_stride = 100; }),
                 {"out", "row", "100"});
  expect_invalid("window_left < -1", run([](FwdParams& p) { p.mask.window_left = -3; }),
                 {"window_left", "-3"});
  expect_invalid("window_right < -1", run([](FwdParams& p) { p.mask.window_right = -7; }),
                 {"window_right", "-7"});
  expect_invalid("negative softcap", run([](FwdParams& p) { p.mask.softcap = -2.5f; }),
                 {"softcap", "-2.5"});
  expect_invalid("fp8 output", run([](FwdParams& p) {
                   p.dtype = DType::kFP8E4M3;
                   p.out_dtype = DType::kFP8E4M3;
                 }),
                 {"out_dtype", "fp8"});
  expect_invalid("out_dtype mismatch", run([](FwdParams& p) {
                   p.dtype = DType::kF32;
                   p.out_dtype = DType::kBF16;
                 }),
                 {"out_dtype", "bf16"});
  expect_invalid("num_splits < 0", run([](FwdParams& p) { p.num_splits = -4; }),
                 {"num_splits", "-4"});
}

TEST_F(Validation, Varlen) {
  // 2 segments of q rows {3, 1} and keys {4, 2} packed into the fixture's tensors.
  std::vector<std::int32_t> cu_q{0, 3, 4}, cu_k{0, 4, 6}, used{2, 9};
  auto run = [&](const std::function<void(FwdParams&)>& edit) {
    return [&, edit] {
      DenseFixture f;
      f.p.cu_seqlens_q = cu_q.data();
      f.p.cu_seqlens_k = cu_k.data();
      f.p.s_q = 3;
      f.p.s_k = 4;
      edit(f.p);
      engine.forward(f.p);
    };
  };
  EXPECT_NO_THROW(run([](FwdParams&) {})());
  std::vector<std::int32_t> bad_q{0, 10, 5};
  expect_invalid("cu_seqlens_q decreasing", run([&](FwdParams& p) {
                   p.cu_seqlens_q = bad_q.data();
                   p.s_q = 10;
                 }),
                 {"cu_seqlens_q", "10", "5"});
  std::vector<std::int32_t> bad_k{0, 5, 3};
  expect_invalid("cu_seqlens_k decreasing", run([&](FwdParams& p) {
                   p.cu_seqlens_k = bad_k.data();
                   p.s_k = 5;
                 }),
                 {"cu_seqlens_k", "5", "3"});
  std::vector<std::int32_t> bad_start{2, 3, 4};
  expect_invalid("cu_seqlens_q[0] != 0",
                 run([&](FwdParams& p) { p.cu_seqlens_q = bad_start.data(); }),
                 {"cu_seqlens_q", "2"});
  expect_invalid("segment longer than max_seqlen_k", run([](FwdParams& p) { p.s_k = 3; }),
                 {"cu_seqlens_k", "4", "3"});
  expect_invalid("cu_seqlens_k missing", run([](FwdParams& p) { p.cu_seqlens_k = nullptr; }),
                 {"cu_seqlens_k"});
  expect_invalid("seqused_k beyond segment", run([&](FwdParams& p) { p.seqused_k = used.data(); }),
                 {"seqused_k", "9", "2"});
}

TEST_F(Validation, KvCache) {
  KvCase paged;
  paged.name = "validation_paged";
  paged.seqlens = {5, 9};
  paged.s_new = 1;
  paged.page_size = 4;
  KvCase dense = paged;
  dense.name = "validation_dense";
  dense.page_size = 0;
  auto run = [&](const KvCase& c, const std::function<void(KvProblem&)>& edit) {
    return [&, c, edit] {
      KvProblem pr = make_kv_problem(c);
      edit(pr);
      engine.forward_kvcache(pr.p);
    };
  };
  expect_invalid("page table entry past num_blocks",
                 run(paged, [](KvProblem& pr) { pr.page_table[0] = 999; }), {"page_table", "999"});
  expect_invalid("negative page table entry",
                 run(paged, [](KvProblem& pr) { pr.page_table[1] = -1; }), {"page_table", "-1"});
  expect_invalid("cache_seqlens beyond dense capacity",
                 run(dense, [](KvProblem& pr) { pr.seqlens[1] = 50; }), {"cache_seqlens", "50"});
  expect_invalid("cache_seqlens + s_new beyond capacity",
                 run(dense,
                     [](KvProblem& pr) {
                       pr.seqlens[0] = pr.p.s_cache;  // room for 0 more, s_new = 1
                     }),
                 {"cache_seqlens", std::to_string(make_kv_problem(dense).p.s_cache)});
  expect_invalid("cache_seqlens beyond page table capacity",
                 run(paged, [](KvProblem& pr) { pr.seqlens[0] = 4 * pr.p.max_pages + 3; }),
                 {"cache_seqlens", std::to_string(4 * make_kv_problem(paged).p.max_pages + 3)});
  expect_invalid("negative cache_seqlens", run(dense, [](KvProblem& pr) { pr.seqlens[0] = -2; }),
                 {"cache_seqlens", "-2"});
  expect_invalid("leftpad > cache_seqlens",
                 run(dense,
                     [](KvProblem& pr) {
                       pr.leftpad = {7, 0};
                       pr.p.cache_leftpad = pr.leftpad.data();
                     }),
                 {"cache_leftpad", "7", "5"});
  expect_invalid("cache_batch_idx out of range",
                 run(dense,
                     [](KvProblem& pr) {
                       pr.batch_idx = {0, 7};
                       pr.p.cache_batch_idx = pr.batch_idx.data();
                     }),
                 {"cache_batch_idx", "7"});
  expect_invalid("h % h_k != 0", run(dense, [](KvProblem& pr) { pr.p.h = 5; }), {"h_k", "5", "2"});
  expect_invalid("k_new without v_new", run(dense, [](KvProblem& pr) { pr.p.v_new = nullptr; }),
                 {"v_new"});
  expect_invalid("negative s_new", run(dense, [](KvProblem& pr) { pr.p.s_new = -1; }),
                 {"s_new", "-1"});
  expect_invalid("d = 0", run(dense, [](KvProblem& pr) { pr.p.d = 0; }), {"d", "0"});
  KvCase rot = dense;
  rot.name = "validation_rotary";
  rot.rotary = 2;
  expect_invalid("odd rotary_dim", run(rot, [](KvProblem& pr) { pr.p.rotary_dim = 7; }),
                 {"rotary_dim", "7"});
  expect_invalid("rotary_dim > d", run(rot, [](KvProblem& pr) { pr.p.rotary_dim = 40; }),
                 {"rotary_dim", "40"});
  expect_invalid("rotary table too short", run(rot, [](KvProblem& pr) { pr.p.s_rotary = 3; }),
                 {"s_rotary", "3"});
  SchedulerMetadata bad_plan;
  bad_plan.b = 5;
  bad_plan.num_splits.assign(5, 1);
  expect_invalid("plan for another batch size",
                 run(dense, [&](KvProblem& pr) { pr.p.plan = &bad_plan; }), {"plan", "5", "2"});
}

TEST(ValidationBackend, UnknownBackendIsInvalidArgument) {
  expect_invalid("unknown backend",
                 [] {
                   Engine e(EngineOptions{"gpu-magic", 0});
                 },
                 {"backend", "gpu-magic"});
  expect_invalid("negative threads",
                 [] {
                   Engine e(EngineOptions{"reference", -2});
                 },
                 {"threads", "-2"});
}

TEST(ValidationBackend, MissingIsaIsUnsupportedError) {
  const auto names = available_backends();
  if (std::find(names.begin(), names.end(), "cpu-avx512") != names.end()) {
    GTEST_SKIP() << "this CPU runs cpu-avx512 (" << cpu_feature_summary() << ")";
  }
  try {
    Engine e(EngineOptions{"cpu-avx512", 0});
    ADD_FAILURE() << "cpu-avx512 accepted on a CPU without it";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(e.message().find("avx512"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected UnsupportedError, got: " << e.what();
  }
}

// cpu-amx: where the CPU and OS allow tiles it is listed, selectable and auto's
// choice (the backend grids then run it on every case); elsewhere asking for it is an
// UnsupportedError naming the missing feature and auto falls back to another tier.
TEST(ValidationBackend, CpuAmxSelectedOrNamedError) {
  const auto names = available_backends();
  const bool listed = std::find(names.begin(), names.end(), "cpu-amx") != names.end();
  std::string missing;
  const bool usable = detail::cpu_supports(detail::CpuIsa::kAmx, &missing);
  EXPECT_EQ(listed, usable) << missing;
  if (usable) {
    EXPECT_EQ(Engine(EngineOptions{"cpu-amx", 0}).backend_name(), "cpu-amx");
    EXPECT_EQ(Engine().backend_name(), "cpu-amx");
    return;
  }
  ASSERT_FALSE(missing.empty());
  try {
    Engine e(EngineOptions{"cpu-amx", 0});
    ADD_FAILURE() << "cpu-amx accepted on a CPU without it";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(e.message().find(missing.substr(0, missing.find(' '))), std::string::npos)
        << e.what();
    EXPECT_NE(e.message().find("cpu-amx"), std::string::npos) << e.what();
  }
  EXPECT_NE(Engine().backend_name(), "cpu-amx");
  GTEST_SKIP() << "cpu-amx not available here (missing: " << missing
               << "); its kernel tests run on a CPU with AMX";
}

// cpu-avx512-bf16 needs AVX512_BF16: named in the error where it is missing; where it is
// present, "auto" picks it unless cpu-amx is usable (the best tier first in the list).
TEST(ValidationBackend, Bf16TierNeedsAvx512Bf16) {
  const auto names = available_backends();
  if (std::find(names.begin(), names.end(), "cpu-avx512-bf16") != names.end()) {
    const bool amx = detail::cpu_supports(detail::CpuIsa::kAmx);
    const std::string best = amx ? "cpu-amx" : "cpu-avx512-bf16";
    EXPECT_EQ(names.front(), best);
    EXPECT_EQ(Engine(EngineOptions{"auto", 1}).backend_name(), best);
    EXPECT_EQ(Engine(EngineOptions{"cpu-avx512-bf16", 1}).backend_name(), "cpu-avx512-bf16");
    EXPECT_NE(cpu_feature_summary().find("avx512_bf16"), std::string::npos);
    return;
  }
  try {
    Engine e(EngineOptions{"cpu-avx512-bf16", 0});
    ADD_FAILURE() << "cpu-avx512-bf16 accepted on a CPU without it";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(e.message().find("avx512_bf16"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected UnsupportedError, got: " << e.what();
  }
}

TEST(ValidationBackend, AvailableBackendsRun) {
  const auto names = available_backends();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.back(), "reference");
  for (const auto& n : names) {
    Engine e(EngineOptions{n, 0});
    EXPECT_FALSE(e.backend_name().empty());
  }
  Engine automatic;
  EXPECT_NE(automatic.backend_name(), "auto");
}

}  // namespace
}  // namespace ringattn::test
