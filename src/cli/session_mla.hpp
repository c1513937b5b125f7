// `ringattn session --mla`: an MLA decode session over a latent cache sharded across the
// ranks (mla_session.hpp), synthetic mode. cmd_session.cpp parses the options and hands
// over here.
#pragma once

#include <cstdint>

#include "ringattn/comm/communicator.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn::cli {

struct MlaSessionRun {
  int b = 1, h_q = 0, steps = 0, t = 1;
  std::int64_t prompt = 0;
  DType dtype = DType::kBF16;  // queries and latent cache
  std::uint64_t seed = 0;
  int page_size = 64;
  CacheLayout layout = CacheLayout::kRoundRobin;
  ShardLayout prompt_layout = ShardLayout::kContiguous;
  float scale = 0.0f;            // 0 = 1/sqrt(576)
  const float* sinks = nullptr;  // [h_q]
  int root = -1;
  bool merge_barrier = false, check = false, json = false;
};

// Collective. Prints the result line (or JSON) on rank 0; returns the exit status
// (1 when --check fails).
int run_mla_session(const comm::Communicator& comm, const Engine& engine, const MlaSessionRun& r);

}  // namespace ringattn::cli
