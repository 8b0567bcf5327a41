// moe_decode_bench: the one-token MoE (what decode runs per layer) on full-size gpt-oss-20b
// layers, timed through moe_forward alone (no ExecuTorch, no Python), so the figure is the
// kernel's read rate from memory. Usage: moe_decode_bench [THREADS [CALLS [ISA]]]. Build (from
// this directory): g++ -O2 -std=c++17 -I. moe_decode_bench.cpp moe_core.cpp -o moe_decode_bench
// -lpthread
// Four layers of random MXFP4 experts (E=32, H=I=2880, 1.7 GB) are visited in turn with experts
// drawn without replacement, so, as in decode, each call's bytes come from memory, not cache.
// Prints the best and mean ms per call and the best call's GB/s of expert bytes read.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "moe_core.h"

namespace {

using ossedge::MoeArgs;
using ossedge::WeightFormat;

// A second thread that spins waiting for work (a decode call is ~2 ms; sleeping would cost more
// than it saves), sharing each parallel_for with the caller.
class Helper {
 public:
  Helper() : thread_([this] { loop(); }) {}
  ~Helper() {
    stop_ = true;
    thread_.join();
  }
  void run(int64_t n, void (*task)(void*, int64_t), void* ctx) {
    n_ = n, task_ = task, ctx_ = ctx, next_ = 0, done_ = false;
    round_.fetch_add(1);
    work();
    while (!done_.load()) {
    }
  }

 private:
  void work() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) task_(ctx_, i);
  }
  void loop() {
    int seen = 0;
    while (!stop_) {
      if (round_.load() == seen) continue;
      seen = round_.load();
      work();
      done_ = true;
    }
  }
  int64_t n_ = 0;
  void (*task_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  std::atomic<int64_t> next_{0};
  std::atomic<int> round_{0};
  std::atomic<bool> done_{false}, stop_{false};
  std::thread thread_;
};

Helper* g_helper = nullptr;
void two_threads(int64_t n, void (*task)(void*, int64_t), void* ctx) {
  g_helper->run(n, task, ctx);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  const int calls = argc > 2 ? std::atoi(argv[2]) : 320;
  if (threads < 1 || threads > 2 || calls < 8) {
    std::fprintf(stderr, "usage: moe_decode_bench [THREADS (1 or 2) [CALLS (>= 8) [ISA]]]\n");
    return 2;
  }
  if (argc > 3 && !ossedge::moe_set_isa(argv[3])) {
    std::fprintf(stderr, "moe_decode_bench: the %s path is not available here\n", argv[3]);
    return 1;
  }
  constexpr int64_t E = 32, H = 2880, I = 2880, K = 4, L = 4;
  std::mt19937 rng(0);
  std::vector<float> b1(E * 2 * I, 0.01f), b2(E * H, 0.01f), x(H), w(K, 0.25f), out(H);
  std::vector<int64_t> ids(K);
  for (float& v : x) v = static_cast<float>(rng() % 2001) / 1000.0f - 1.0f;
  std::deque<std::vector<uint8_t>> bytes;  // a deque: adding one moves none of the others
  std::vector<MoeArgs> layers(L);
  // A random MXFP4 weight [E, rows, cols]: any codes, scales near gpt-oss's (2^-9 .. 2^-4).
  const auto weight = [&](int64_t rows, int64_t cols) {
    std::vector<uint8_t>& codes = bytes.emplace_back(E * rows * cols / 2);
    for (uint8_t& b : codes) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t>& scales = bytes.emplace_back(E * rows * cols / 32);
    for (uint8_t& s : scales) s = static_cast<uint8_t>(118 + rng() % 6);
    return ossedge::ExpertWeight{WeightFormat::kMxfp4, codes.data(), scales.data(), rows, cols};
  };
  for (MoeArgs& a : layers) {
    a.x = x.data(), a.ids = ids.data(), a.weights = w.data(), a.tokens = 1, a.topk = K;
    a.experts = E, a.hidden = H, a.intermediate = I, a.limit = 7.0f, a.alpha = 1.702f;
    a.gate_up = weight(2 * I, H);
    a.down = weight(H, I);
    a.gate_up_bias = b1.data(), a.down_bias = b2.data();
    a.parallel = threads > 1 ? two_threads : nullptr;
  }
  std::unique_ptr<Helper> helper;  // no spinning second thread when one is asked for
  if (threads > 1) helper = std::make_unique<Helper>();
  g_helper = helper.get();
  std::vector<int64_t> perm(E);
  for (int64_t e = 0; e < E; ++e) perm[e] = e;
  std::vector<double> ms;
  while (static_cast<int>(ms.size()) < calls + 8) {
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t g = 0; g < E / K; ++g) {
      for (MoeArgs& a : layers) {
        std::copy(perm.begin() + g * K, perm.begin() + (g + 1) * K, ids.begin());
        const auto t0 = std::chrono::steady_clock::now();
        if (!ossedge::moe_forward(a, out.data())) return 1;
        ms.push_back(std::chrono::duration<double, std::milli>(
                         std::chrono::steady_clock::now() - t0).count());
      }
    }
  }
  ms.erase(ms.begin(), ms.begin() + 8);  // warm-up
  const double best = *std::min_element(ms.begin(), ms.end());
  double mean = 0;
  for (double v : ms) mean += v / ms.size();
  const double read = K * (2.0 * I * H + H * I) * 17 / 32;  // 4 experts at 4.25 bits a weight
  std::printf("{\"isa\": \"%s\", \"threads\": %d, \"calls\": %zu, \"best_ms\": %.3f, "
              "\"mean_ms\": %.3f, \"best_gb_s\": %.1f}\n",
              ossedge::moe_isa(), threads, ms.size(), best, mean, read / best / 1e6);
  return 0;
}
