// Rate limiter for ProgressHook (attention_params.hpp): kernels call poll() often (per
// key tile, per task) on the calling thread; the hook runs at most once per interval.
#pragma once

#include <chrono>

#include "ringattn/attention_params.hpp"

namespace ringattn::detail {

class ProgressThrottle {
 public:
  explicit ProgressThrottle(const ProgressHook& hook)
      : hook_(hook), interval_(std::chrono::microseconds(hook.interval_us)) {}
  bool active() const { return hook_.fn != nullptr; }
  void poll() {
    if (!hook_.fn) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ < interval_) return;
    last_ = now;
    hook_.fn(hook_.ctx);
  }

 private:
  ProgressHook hook_;
  std::chrono::steady_clock::duration interval_;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace ringattn::detail
