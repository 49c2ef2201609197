// Same-run A/B of the two [K, N] GEMV kernels of kernels/gemv_cpu.cc on the 120 layer products of
// SmolLM2-135M's shapes (30 x QKV [576, 960], O [576, 576], gate|up [576, 3072], down [1536, 576];
// 425 MB, random weights, so W comes from DRAM): the row kernel on W [K, N] (Gemv) and the panel
// kernel on W packed [N / 8, K, 8] (GemvPanels), on 1 and 2 threads, alternating chain by chain,
// medians. First checks that the panel kernel gives the row kernel's one-thread bits for M = 1..16
// (shapes with N % 8 == 0; odd N only prints the differences: the row kernel's scalar tail sums
// four products before adding them).
//
// Build and run from the repository root (under the bench lock; M = rows of x, default 8):
//   g++ -O3 -std=c++17 -pthread -w -I$(python -c 'import jax; print(jax.ffi.include_dir())') \
//       -Ikernels docs/decode/panels_ab.cc -o /tmp/panels_ab
//   flock /tmp/wafer-bench.lock /tmp/panels_ab 8 15
#include "gemv_cpu.cc"

namespace panels {
inline int64_t PackedSize(int64_t K, int64_t N) { return (N + kPanel - 1) / kPanel * K * kPanel; }

// kernels/gemv_cpu.py pack_panels: panel p, row k at (p * K + k) * 8, the last panel zero-padded.
inline void Pack(const float* w, int64_t K, int64_t N, float* out) {
  for (int64_t p = 0; p < (N + kPanel - 1) / kPanel; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        out[(p * K + k) * kPanel + j] = n < N ? w[k * N + n] : 0.f;
      }
}
}  // namespace panels
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <algorithm>
#include <string>

struct Mat { int64_t K, N; std::vector<float> w, wp; };

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main(int argc, char** argv) {
  const int M = argc > 1 ? atoi(argv[1]) : 8;
  const int reps = argc > 2 ? atoi(argv[2]) : 15;
  const int L = 30, D = 576, QKV = 960, F = 1536;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 0.02f);
  // correctness on odd shapes first: packed vs current 1 thread, M = 1..16
  {
    double worst = 0;
    for (auto [K, N] : std::vector<std::pair<int64_t, int64_t>>{{576, 960}, {1536, 576}, {37, 61}, {576, 3072}, {13, 8}, {100, 19}}) {
      Mat m{K, N}; m.w.resize(K * N); for (auto& v : m.w) v = nd(rng);
      m.wp.resize(panels::PackedSize(K, N)); panels::Pack(m.w.data(), K, N, m.wp.data());
      for (int mm = 1; mm <= 16; ++mm) {
        std::vector<float> x(mm * K), y0(mm * N), y1(mm * N, 7.f), y2(mm * N, 7.f);
        for (auto& v : x) v = nd(rng) * 50;
        Gemv(x.data(), mm, K, m.w.data(), N, false, 1, y0.data());
        GemvPanels(x.data(), mm, K, m.wp.data(), N, 1, y1.data());
        GemvPanels(x.data(), mm, K, m.wp.data(), N, 2, y2.data());
        double d = 0, d2 = 0;
        for (size_t i = 0; i < y0.size(); ++i) { d = std::max(d, (double)std::abs(y0[i] - y1[i])); d2 = std::max(d2, (double)std::abs(y1[i] - y2[i])); }
        if (d > 0 || d2 > 0) printf("K=%ld N=%ld M=%d: max|panels-rows(1t)|=%g max|panels 1t - 2t|=%g\n", K, N, mm, d, d2);
        if (N % 8 == 0) worst = std::max(worst, d);
      }
    }
    printf("bit check (N %% 8 == 0 shapes): max abs diff panels vs rows on 1 thread = %g\n", worst);
  }
  std::vector<Mat> mats;
  for (int l = 0; l < L; ++l)
    for (auto [K, N] : std::vector<std::pair<int64_t, int64_t>>{{D, QKV}, {D, D}, {D, 2 * F}, {F, D}}) {
      Mat m{K, N}; m.w.resize(K * N); for (auto& v : m.w) v = nd(rng);
      m.wp.resize(panels::PackedSize(K, N)); panels::Pack(m.w.data(), K, N, m.wp.data());
      mats.push_back(std::move(m));
    }
  double bytes = 0; for (auto& m : mats) bytes += m.K * m.N * 4.0;
  std::vector<float> x(M * F), y(M * 2 * F);
  for (auto& v : x) v = nd(rng);
  auto chain = [&](bool packed, int th) {
    double t0 = now();
    for (auto& m : mats) {
      if (packed) GemvPanels(x.data(), M, m.K, m.wp.data(), m.N, th, y.data());
      else Gemv(x.data(), M, m.K, m.w.data(), m.N, false, th, y.data());
    }
    return now() - t0;
  };
  const char* names[4] = {"rows 1t", "panels 1t", "rows 2t", "panels 2t"};
  std::vector<double> ts[4];
  double load0; getloadavg(&load0, 1);
  for (int i = 0; i < 4; ++i) chain(i & 1, i < 2 ? 1 : 2);  // warm
  for (int r = 0; r < reps; ++r)
    for (int i = 0; i < 4; ++i) ts[i].push_back(chain(i & 1, i < 2 ? 1 : 2));
  double load1; getloadavg(&load1, 1);
  double med[4];
  printf("M=%d, %.1f MB chain, medians of %d alternating, load %.2f -> %.2f\n", M, bytes / 1e6, reps, load0, load1);
  for (int i = 0; i < 4; ++i) {
    std::sort(ts[i].begin(), ts[i].end()); med[i] = ts[i][reps / 2];
    printf("  %-11s %7.2f ms %6.2f GB/s (min %.2f ms)\n", names[i], med[i] * 1e3, bytes / med[i] / 1e9, ts[i][0] * 1e3);
  }
  printf("  panels/rows: 1t %.2fx, 2t %.2fx\n", med[0] / med[1], med[2] / med[3]);
}
