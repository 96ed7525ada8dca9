// The CPU core's kernels alone, without TensorFlow or Python: forward and backward of a group of
// N float32 tensors [B, U], on the calling thread (or on T plain threads), for A/Bs of kernel
// changes. TensorFlow's per-call work and the noise of other variants do not enter.
//
//   cmake --build build/dev --target lbe_core_bench
//   build/dev/lbe_core_bench N B U [SETS [SECONDS [THREADS]]]
//
// SETS copies of the group are used in turn: 1 keeps the group in cache (hot); enough copies to
// exceed the last-level cache make every call read from memory (cold). Prints the median and the
// minimum of 7 timed rounds, per call, for the forward and the backward pass.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "batch_entropy_cpu.h"

namespace {

// The forward writes, and the backward reads, the mean residuals, as the ops do.
struct Group {
  std::vector<std::vector<float>> x, dx, mean, variance, residual;
  std::vector<const void*> x_ptr, mean_in, variance_in, residual_in;
  std::vector<void*> dx_ptr, mean_out, variance_out, residual_out;
  std::vector<float> entropy, grad_entropy;
};

Group MakeGroup(int64_t n, int64_t b, int64_t u, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  Group g;
  g.x.resize(n);
  g.dx.resize(n);
  g.mean.resize(n);
  g.variance.resize(n);
  g.residual.resize(n);
  g.entropy.resize(n);
  g.grad_entropy.assign(n, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    g.x[i].resize(b * u);
    for (float& v : g.x[i]) v = normal(gen);
    g.dx[i].resize(b * u);
    g.mean[i].resize(u);
    g.variance[i].resize(u);
    g.residual[i].resize(u);
    g.x_ptr.push_back(g.x[i].data());
    g.dx_ptr.push_back(g.dx[i].data());
    g.mean_out.push_back(g.mean[i].data());
    g.variance_out.push_back(g.variance[i].data());
    g.mean_in.push_back(g.mean[i].data());
    g.variance_in.push_back(g.variance[i].data());
    g.residual_out.push_back(g.residual[i].data());
    g.residual_in.push_back(g.residual[i].data());
  }
  return g;
}

// Contiguous ranges of the shards on `threads` threads (the calling thread takes the first).
lbe::cpu::ParallelFor ThreadsFor(int threads) {
  if (threads <= 1) return lbe::cpu::SerialFor();
  return [threads](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& body) {
    const int64_t per = (n + threads - 1) / threads;
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) {
      const int64_t begin = t * per, end = std::min(n, begin + per);
      if (begin < end) pool.emplace_back([begin, end, &body] { body(begin, end); });
    }
    body(0, std::min(n, per));
    for (std::thread& t : pool) t.join();
  };
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s N B U [SETS [SECONDS [THREADS]]]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), b = std::atoll(argv[2]), u = std::atoll(argv[3]);
  const int sets = argc > 4 ? std::atoi(argv[4]) : 1;
  const double seconds = argc > 5 ? std::atof(argv[5]) : 1.0;
  const int threads = argc > 6 ? std::atoi(argv[6]) : 1;
  if (n < 1 || b < 2 || u < 1 || sets < 1 || seconds <= 0 || threads < 1) {
    std::fprintf(stderr, "need N >= 1, B >= 2, U >= 1, SETS >= 1, SECONDS > 0, THREADS >= 1\n");
    return 2;
  }
  std::mt19937 gen(1);
  std::vector<Group> groups;
  for (int s = 0; s < sets; ++s) groups.push_back(MakeGroup(n, b, u, gen));
  const std::vector<int64_t> batch(n, b), units(n, u);
  const lbe::cpu::ParallelFor parallel_for = ThreadsFor(threads);

  auto forward = [&](Group& g) {
    lbe::ForwardArgs a;
    a.num_tensors = n;
    a.x = g.x_ptr.data();
    a.batch = batch.data();
    a.units = units.data();
    a.mean = g.mean_out.data();
    a.variance = g.variance_out.data();
    a.entropy = g.entropy.data();
    a.mean_residual = g.residual_out.data();
    return lbe::cpu::Forward(a, parallel_for);
  };
  auto backward = [&](Group& g) {
    lbe::BackwardArgs a;
    a.num_tensors = n;
    a.x = g.x_ptr.data();
    a.batch = batch.data();
    a.units = units.data();
    a.mean = g.mean_in.data();
    a.variance = g.variance_in.data();
    a.grad_entropy = g.grad_entropy.data();
    a.dx = g.dx_ptr.data();
    a.mean_residual = g.residual_in.data();
    return lbe::cpu::Backward(a, parallel_for);
  };
  for (int warm = 0; warm < 3; ++warm) {
    for (Group& g : groups) {
      const std::string error = forward(g) + backward(g);
      if (!error.empty()) {
        std::fprintf(stderr, "core error: %s\n", error.c_str());
        return 1;
      }
    }
  }
  std::printf("isa %s, %d thread(s), %lld x [%lld, %lld] float32, %d set(s) of %.1f MiB\n",
              lbe::cpu::IsaName(), threads, static_cast<long long>(n), static_cast<long long>(b),
              static_cast<long long>(u), sets, n * b * u * 4.0 / (1 << 20));
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<double> per_call;
    for (int round = 0; round < 7; ++round) {
      const auto start = std::chrono::steady_clock::now();
      int64_t calls = 0;
      double elapsed = 0;
      while (elapsed < seconds / 7) {
        for (Group& g : groups) {
          if (pass == 0) forward(g); else backward(g);
          ++calls;
        }
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
      per_call.push_back(elapsed / calls * 1e3);
    }
    std::sort(per_call.begin(), per_call.end());
    std::printf("%-8s %.3f ms per call (min %.3f)\n", pass == 0 ? "forward" : "backward",
                per_call[3], per_call[0]);
  }
  return 0;
}
