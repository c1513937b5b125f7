// set_contiguous_strides: the strides it fills equal those of row-major tensors of
// the documented shapes (dense, varlen, dense and paged KV caches with appends),
// over a grid of shapes, and the Engine accepts and runs the filled params on
// every backend.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ringattn/contiguous_params.hpp"
#include "ringattn/engine.hpp"
#include "test_util.hpp"

namespace ringattn::test {
namespace {

struct Shape {
  int b, s_q, s_k, h, h_k, d, d_v;
};

const std::vector<Shape> kShapes = {{1, 1, 1, 1, 1, 8, 8},
                                    {2, 5, 7, 4, 2, 16, 8},
                                    {3, 9, 4, 6, 1, 32, 64},
                                    {1, 64, 128, 8, 8, 128, 128}};

// The strides of a contiguous tensor of `shape` (row-major, from the test tensors).
std::vector<std::int64_t> row_major(std::vector<std::int64_t> shape) {
  return make_tensor(DType::kF32, std::move(shape)).strides;
}

TEST(ContiguousParams, DenseAndVarlenFwdStrides) {
  for (const Shape& c : kShapes) {
    SCOPED_TRACE(::testing::Message()
                 << "b=" << c.b << " s_q=" << c.s_q << " s_k=" << c.s_k << " h=" << c.h
                 << " h_k=" << c.h_k << " d=" << c.d << " d_v=" << c.d_v);
    FwdParams p;
    p.b = c.b, p.s_q = c.s_q, p.s_k = c.s_k, p.h = c.h, p.h_k = c.h_k, p.d = c.d, p.d_v = c.d_v;
    set_contiguous_strides(p);
    const auto expect = [](const std::vector<std::int64_t>& st, std::int64_t batch,
                           std::int64_t row, std::int64_t head) {
      EXPECT_EQ(batch, st[0]);
      EXPECT_EQ(row, st[1]);
      EXPECT_EQ(head, st[2]);
      EXPECT_EQ(1, st[3]);
    };
    expect(row_major({c.b, c.s_q, c.h, c.d}), p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    expect(row_major({c.b, c.s_k, c.h_k, c.d}), p.k_batch_stride, p.k_row_stride, p.k_head_stride);
    expect(row_major({c.b, c.s_k, c.h_k, c.d_v}), p.v_batch_stride, p.v_row_stride,
           p.v_head_stride);
    expect(row_major({c.b, c.s_q, c.h, c.d_v}), p.out_batch_stride, p.out_row_stride,
           p.out_head_stride);

    // Varlen: [total, h, d] rows, batch strides 0.
    const std::vector<std::int32_t> cu = {0, c.s_q};
    p.cu_seqlens_q = p.cu_seqlens_k = cu.data();
    set_contiguous_strides(p);
    const auto st = row_major({c.s_q * c.b, c.h, c.d});
    EXPECT_EQ(0, p.q_batch_stride);
    EXPECT_EQ(st[0], p.q_row_stride);
    EXPECT_EQ(st[1], p.q_head_stride);
    EXPECT_EQ(0, p.k_batch_stride);
    EXPECT_EQ(0, p.v_batch_stride);
    EXPECT_EQ(0, p.out_batch_stride);
    EXPECT_EQ(std::int64_t{c.h_k} * c.d_v, p.v_row_stride);
    EXPECT_EQ(std::int64_t{c.h} * c.d_v, p.out_row_stride);
  }
}

TEST(ContiguousParams, KvCacheStridesDenseAndPaged) {
  for (const Shape& c : kShapes) {
    for (const bool paged : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "b=" << c.b << " h=" << c.h << " d=" << c.d << " paged=" << paged);
      KvCacheParams p;
      p.b = c.b, p.s_q = c.s_q, p.h = c.h, p.h_k = c.h_k, p.d = c.d, p.d_v = c.d_v;
      p.s_new = 3;
      const std::vector<std::int32_t> table(static_cast<std::size_t>(c.b) * 5, 0);
      int rows = 0;
      if (paged) {
        p.page_table = table.data();
        p.max_pages = 5;
        p.num_blocks = 5 * c.b;
        p.page_size = rows = 16;
      } else {
        p.b_cache = c.b;
        p.s_cache = rows = c.s_k + 3;
      }
      set_contiguous_strides(p);
      const auto q = row_major({c.b, c.s_q, c.h, c.d});
      const auto kc = row_major({c.b, rows, c.h_k, c.d});
      const auto vc = row_major({c.b, rows, c.h_k, c.d_v});
      const auto kn = row_major({c.b, 3, c.h_k, c.d});
      const auto vn = row_major({c.b, 3, c.h_k, c.d_v});
      const auto out = row_major({c.b, c.s_q, c.h, c.d_v});
      EXPECT_EQ(std::vector<std::int64_t>({p.q_batch_stride, p.q_row_stride, p.q_head_stride, 1}),
                q);
      EXPECT_EQ(std::vector<std::int64_t>(
                    {p.k_cache_batch_stride, p.k_cache_row_stride, p.k_cache_head_stride, 1}),
                kc);
      EXPECT_EQ(std::vector<std::int64_t>(
                    {p.v_cache_batch_stride, p.v_cache_row_stride, p.v_cache_head_stride, 1}),
                vc);
      EXPECT_EQ(std::vector<std::int64_t>(
                    {p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride, 1}),
                kn);
      EXPECT_EQ(std::vector<std::int64_t>(
                    {p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride, 1}),
                vn);
      EXPECT_EQ(
          std::vector<std::int64_t>({p.out_batch_stride, p.out_row_stride, p.out_head_stride, 1}),
          out);
      if (paged) {
        EXPECT_EQ(5, p.page_table_batch_stride);
      }
    }
  }
}

// The filled params pass the Engine's validation and produce finite outputs in
// every slot on every backend (the kernels themselves are tested elsewhere).
TEST(ContiguousParams, EngineRunsFilledParamsOnEveryBackend) {
  std::mt19937_64 rng(case_seed("ContiguousParams"));
  const Shape c = kShapes[2];
  const std::int64_t nq = std::int64_t{c.b} * c.s_q * c.h * c.d;
  const std::int64_t nk = std::int64_t{c.b} * c.s_k * c.h_k * c.d;
  const std::int64_t nv = std::int64_t{c.b} * c.s_k * c.h_k * c.d_v;
  const std::int64_t no = std::int64_t{c.b} * c.s_q * c.h * c.d_v;
  std::normal_distribution<float> dist;
  std::vector<float> q(nq), k(nk), v(nv);
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = dist(rng);
  for (const std::string& backend : test_backends()) {
    SCOPED_TRACE(backend + " " + seed_note());
    std::vector<float> out(no), lse(static_cast<std::size_t>(c.b) * c.h * c.s_q);
    poison(out);
    poison(lse);
    FwdParams p;
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
    p.b = c.b, p.s_q = c.s_q, p.s_k = c.s_k, p.h = c.h, p.h_k = c.h_k, p.d = c.d, p.d_v = c.d_v;
    p.mask.causal = true;
    set_contiguous_strides(p);
    EngineOptions o;
    o.backend = backend;
    o.threads = 2;
    Engine(o).forward(p);
    for (const float x : out) ASSERT_TRUE(std::isfinite(x));
    for (const float x : lse) ASSERT_FALSE(std::isnan(x));
  }
}

}  // namespace
}  // namespace ringattn::test
