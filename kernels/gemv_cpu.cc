// Multi-threaded f32 GEMV / small-batch GEMM for decode on CPU, an XLA FFI target
// (kernels/cpu_ffi.py builds and loads it, kernels/gemv_cpu.py calls it and says why it exists).
//
//   y[M, N] = x[M, K] @ W        W stored [K, N] ("kn": the block weights) or [N, K] ("nk": the
//                                LM head, the embedding's [V, D]); accumulation in f32.
//
// Each thread streams one contiguous block of W, so every thread reads memory sequentially:
// - kn: thread t takes rows k of W [k0, k1) and produces a partial y over them (the partials
//   are summed at the end: M x N floats per thread, small next to W's K x N);
// - nk: thread t takes rows n of W [n0, n1), whole outputs, no reduction (with one row of x,
//   eight rows of W at a time);
// - kn packed into column panels of 8 (`WaferGemvPanelsF32`): thread t takes whole panels, each
//   read sequentially once, with the accumulators in registers (see gemv_panels_range).
// The vector code is compiled for AVX2 + FMA through target attributes only, and
// `wafer_cpu_kernels_supported()` (baseline code) tells Python whether this CPU runs it.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using wafer::GetPool;
using wafer::hsum;
using wafer::Pool;


// Columns of a kn partial held in L1 while rows stream past them: (M + 4 rows of W) x chunk
// floats stay within this many bytes.
constexpr int64_t kL1Bytes = 16 * 1024;

// kn, one thread: acc[M, ldacc] = x[M, k0:k1] @ W[k0:k1, :N].
WAFER_AVX2 void gemv_kn_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, int64_t k0,
                             int64_t k1, float* acc, int64_t ldacc) {
  for (int64_t b = 0; b < M; ++b) std::memset(acc + b * ldacc, 0, N * sizeof(float));
  const int64_t chunk = std::max<int64_t>(64, (kL1Bytes / (4 * (M + 4))) / 64 * 64);
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(N, c0 + chunk);
    const int64_t v1 = c0 + (c1 - c0) / 8 * 8;  // vector part [c0, v1), scalar tail [v1, c1)
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      const float* w0 = w + k * N;
      const float* w1 = w0 + N;
      const float* w2 = w1 + N;
      const float* w3 = w2 + N;
      int64_t b = 0;
      for (; b + 2 <= M; b += 2) {  // two batch rows share each load of W
        const float* xa = x + b * K + k;
        const float* xb = xa + K;
        const __m256 a0 = _mm256_broadcast_ss(xa), a1 = _mm256_broadcast_ss(xa + 1);
        const __m256 a2 = _mm256_broadcast_ss(xa + 2), a3 = _mm256_broadcast_ss(xa + 3);
        const __m256 b0 = _mm256_broadcast_ss(xb), b1 = _mm256_broadcast_ss(xb + 1);
        const __m256 b2 = _mm256_broadcast_ss(xb + 2), b3 = _mm256_broadcast_ss(xb + 3);
        float* ya = acc + b * ldacc;
        float* yb = ya + ldacc;
        for (int64_t n = c0; n < v1; n += 8) {
          const __m256 v0 = _mm256_loadu_ps(w0 + n), v1_ = _mm256_loadu_ps(w1 + n);
          const __m256 v2 = _mm256_loadu_ps(w2 + n), v3 = _mm256_loadu_ps(w3 + n);
          __m256 s = _mm256_loadu_ps(ya + n);
          __m256 t = _mm256_loadu_ps(yb + n);
          s = _mm256_fmadd_ps(a0, v0, s);
          t = _mm256_fmadd_ps(b0, v0, t);
          s = _mm256_fmadd_ps(a1, v1_, s);
          t = _mm256_fmadd_ps(b1, v1_, t);
          s = _mm256_fmadd_ps(a2, v2, s);
          t = _mm256_fmadd_ps(b2, v2, t);
          s = _mm256_fmadd_ps(a3, v3, s);
          t = _mm256_fmadd_ps(b3, v3, t);
          _mm256_storeu_ps(ya + n, s);
          _mm256_storeu_ps(yb + n, t);
        }
        for (int64_t n = v1; n < c1; ++n) {
          ya[n] += xa[0] * w0[n] + xa[1] * w1[n] + xa[2] * w2[n] + xa[3] * w3[n];
          yb[n] += xb[0] * w0[n] + xb[1] * w1[n] + xb[2] * w2[n] + xb[3] * w3[n];
        }
      }
      for (; b < M; ++b) {
        const float* xa = x + b * K + k;
        const __m256 a0 = _mm256_broadcast_ss(xa), a1 = _mm256_broadcast_ss(xa + 1);
        const __m256 a2 = _mm256_broadcast_ss(xa + 2), a3 = _mm256_broadcast_ss(xa + 3);
        float* ya = acc + b * ldacc;
        for (int64_t n = c0; n < v1; n += 8) {
          __m256 s = _mm256_loadu_ps(ya + n);
          s = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + n), s);
          s = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + n), s);
          s = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + n), s);
          s = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + n), s);
          _mm256_storeu_ps(ya + n, s);
        }
        for (int64_t n = v1; n < c1; ++n)
          ya[n] += xa[0] * w0[n] + xa[1] * w1[n] + xa[2] * w2[n] + xa[3] * w3[n];
      }
    }
    for (; k < k1; ++k) {  // rows left over from the groups of 4
      const float* wk = w + k * N;
      for (int64_t b = 0; b < M; ++b) {
        const __m256 a = _mm256_broadcast_ss(x + b * K + k);
        float* ya = acc + b * ldacc;
        int64_t n = c0;
        for (; n < v1; n += 8)
          _mm256_storeu_ps(ya + n, _mm256_fmadd_ps(a, _mm256_loadu_ps(wk + n), _mm256_loadu_ps(ya + n)));
        for (; n < c1; ++n) ya[n] += x[b * K + k] * wk[n];
      }
    }
  }
}


// nk with one row of x (the LM head at batch 1): eight rows of W at a time, so eight sequential
// streams are in flight per thread (against four in gemv_nk_rows), each load of x feeding 8 FMAs.
// Returns the first row it did not do (n1 rounded down to a multiple of 8 from n0).
WAFER_AVX2 int64_t gemv_nk_rows8(const float* x, int64_t K, const float* w, int64_t n0, int64_t n1, float* y) {
  const int64_t kv = K / 8 * 8;
  int64_t n = n0;
  for (; n + 8 <= n1; n += 8) {
    const float* r = w + n * K;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int64_t k = 0; k < kv; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), v, s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + K + k), v, s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 2 * K + k), v, s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 3 * K + k), v, s3);
      s4 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 4 * K + k), v, s4);
      s5 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 5 * K + k), v, s5);
      s6 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 6 * K + k), v, s6);
      s7 = _mm256_fmadd_ps(_mm256_loadu_ps(r + 7 * K + k), v, s7);
    }
    float sa[8] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3), hsum(s4), hsum(s5), hsum(s6), hsum(s7)};
    for (int64_t k = kv; k < K; ++k)
      for (int i = 0; i < 8; ++i) sa[i] += r[i * K + k] * x[k];
    for (int i = 0; i < 8; ++i) y[n + i] = sa[i];
  }
  return n;
}


// nk, one thread: y[:, n0:n1] = x[M, K] @ W[n0:n1, K].T (y row stride N).
WAFER_AVX2 void gemv_nk_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, int64_t n0,
                             int64_t n1, float* y) {
  const int64_t kv = K / 8 * 8;
  int64_t n = M == 1 ? gemv_nk_rows8(x, K, w, n0, n1, y) : n0;
  for (; n + 4 <= n1; n += 4) {  // four rows of W against one or two rows of x at a time
    const float* r0 = w + n * K;
    const float* r1 = r0 + K;
    const float* r2 = r1 + K;
    const float* r3 = r2 + K;
    int64_t b = 0;
    for (; b + 2 <= M; b += 2) {
      const float* xa = x + b * K;
      const float* xb = xa + K;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
      for (int64_t k = 0; k < kv; k += 8) {
        const __m256 va = _mm256_loadu_ps(xa + k), vb = _mm256_loadu_ps(xb + k);
        const __m256 w0 = _mm256_loadu_ps(r0 + k), w1 = _mm256_loadu_ps(r1 + k);
        const __m256 w2 = _mm256_loadu_ps(r2 + k), w3 = _mm256_loadu_ps(r3 + k);
        s0 = _mm256_fmadd_ps(w0, va, s0);
        s1 = _mm256_fmadd_ps(w1, va, s1);
        s2 = _mm256_fmadd_ps(w2, va, s2);
        s3 = _mm256_fmadd_ps(w3, va, s3);
        t0 = _mm256_fmadd_ps(w0, vb, t0);
        t1 = _mm256_fmadd_ps(w1, vb, t1);
        t2 = _mm256_fmadd_ps(w2, vb, t2);
        t3 = _mm256_fmadd_ps(w3, vb, t3);
      }
      float sa[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
      float sb[4] = {hsum(t0), hsum(t1), hsum(t2), hsum(t3)};
      for (int64_t k = kv; k < K; ++k)
        for (int r = 0; r < 4; ++r) {
          sa[r] += r0[r * K + k] * xa[k];
          sb[r] += r0[r * K + k] * xb[k];
        }
      for (int r = 0; r < 4; ++r) {
        y[b * N + n + r] = sa[r];
        y[(b + 1) * N + n + r] = sb[r];
      }
    }
    for (; b < M; ++b) {
      const float* xa = x + b * K;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < kv; k += 8) {
        const __m256 va = _mm256_loadu_ps(xa + k);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + k), va, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + k), va, s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + k), va, s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + k), va, s3);
      }
      float sa[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
      for (int64_t k = kv; k < K; ++k)
        for (int r = 0; r < 4; ++r) sa[r] += r0[r * K + k] * xa[k];
      for (int r = 0; r < 4; ++r) y[b * N + n + r] = sa[r];
    }
  }
  for (; n < n1; ++n) {  // rows left over from the groups of 4
    const float* r0 = w + n * K;
    for (int64_t b = 0; b < M; ++b) {
      const float* xa = x + b * K;
      __m256 s = _mm256_setzero_ps();
      for (int64_t k = 0; k < kv; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + k), _mm256_loadu_ps(xa + k), s);
      float v = hsum(s);
      for (int64_t k = kv; k < K; ++k) v += r0[k] * xa[k];
      y[b * N + n] = v;
    }
  }
}


// ---- kn packed into column panels (the block weights of the decode path, kernels/gemv_cpu.py
// `pack_panels`): W[K, N] stored as ceil(N / 8) panels of [K, 8] floats, each contiguous (panel
// p, row k at (p * K + k) * 8), the last one zero-padded. A thread streams whole panels in order,
// so W is read once and sequentially; R rows of x x C panels of accumulators stay in ymm
// registers over all of K (each load of W feeds R FMAs), and every output is one FMA chain in k
// order from zero: the same bits as gemv_kn_rows over all of K, whatever the thread count.
constexpr int64_t kPanel = 8;
// Floats ahead of the current row that the panel loop asks the cache for (4 KB).
constexpr int64_t kPanelPrefetch = 1024;

// y[0:R, panels p .. p + C) = x[0:R, :] @ panels (y rows of stride N, clipped to N).
template <int R, int C>
WAFER_AVX2 inline void panel_block(const float* x, int64_t K, const float* wp, int64_t N, int64_t p, float* y) {
  static_assert(R * C <= 12, "accumulators must stay in ymm registers");
  // Named accumulators: GCC keeps an array of __m256 in memory and stores it every row.
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a04 = a00, a05 = a00, a06 = a00,
         a07 = a00, a08 = a00, a09 = a00, a10 = a00, a11 = a00;
  const float* base = wp + p * K * kPanel;
  const int64_t stride = K * kPanel;  // between adjacent panels
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = base + k * kPanel;
    if ((k & 7) == 0)  // every 8 rows (256 bytes a panel): the 4 lines kPanelPrefetch ahead
      for (int c = 0; c < C; ++c)
        for (int l = 0; l < 4; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(wk + c * stride + kPanelPrefetch + 16 * l), _MM_HINT_T0);
    __m256 w0, w1, w2, w3;
    w0 = _mm256_loadu_ps(wk);
    if constexpr (C > 1) w1 = _mm256_loadu_ps(wk + stride);
    if constexpr (C > 2) w2 = _mm256_loadu_ps(wk + 2 * stride);
    if constexpr (C > 3) w3 = _mm256_loadu_ps(wk + 3 * stride);
#define WAFER_XV(r) \
    __m256 xv##r;   \
    if constexpr (R > r) xv##r = _mm256_broadcast_ss(x + r * K + k);
#define WAFER_FMA(r, c, A) \
    if constexpr (R > r && C > c) A = _mm256_fmadd_ps(xv##r, w##c, A);
    WAFER_XV(0) WAFER_XV(1) WAFER_XV(2) WAFER_XV(3) WAFER_XV(4) WAFER_XV(5) WAFER_XV(6) WAFER_XV(7)
    // accumulator r * C + c
    if constexpr (C == 1) {
      WAFER_FMA(0, 0, a00) WAFER_FMA(1, 0, a01) WAFER_FMA(2, 0, a02) WAFER_FMA(3, 0, a03)
      WAFER_FMA(4, 0, a04) WAFER_FMA(5, 0, a05) WAFER_FMA(6, 0, a06) WAFER_FMA(7, 0, a07)
    } else if constexpr (C == 2) {
      WAFER_FMA(0, 0, a00) WAFER_FMA(0, 1, a01) WAFER_FMA(1, 0, a02) WAFER_FMA(1, 1, a03)
      WAFER_FMA(2, 0, a04) WAFER_FMA(2, 1, a05) WAFER_FMA(3, 0, a06) WAFER_FMA(3, 1, a07)
      WAFER_FMA(4, 0, a08) WAFER_FMA(4, 1, a09) WAFER_FMA(5, 0, a10) WAFER_FMA(5, 1, a11)
    } else if constexpr (C == 3) {
      WAFER_FMA(0, 0, a00) WAFER_FMA(0, 1, a01) WAFER_FMA(0, 2, a02) WAFER_FMA(1, 0, a03)
      WAFER_FMA(1, 1, a04) WAFER_FMA(1, 2, a05) WAFER_FMA(2, 0, a06) WAFER_FMA(2, 1, a07)
      WAFER_FMA(2, 2, a08) WAFER_FMA(3, 0, a09) WAFER_FMA(3, 1, a10) WAFER_FMA(3, 2, a11)
    } else {
      WAFER_FMA(0, 0, a00) WAFER_FMA(0, 1, a01) WAFER_FMA(0, 2, a02) WAFER_FMA(0, 3, a03)
      WAFER_FMA(1, 0, a04) WAFER_FMA(1, 1, a05) WAFER_FMA(1, 2, a06) WAFER_FMA(1, 3, a07)
      WAFER_FMA(2, 0, a08) WAFER_FMA(2, 1, a09) WAFER_FMA(2, 2, a10) WAFER_FMA(2, 3, a11)
    }
#undef WAFER_FMA
#undef WAFER_XV
  }
  const __m256 acc[12] = {a00, a01, a02, a03, a04, a05, a06, a07, a08, a09, a10, a11};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const int64_t n0 = (p + c) * kPanel;
      float* yr = y + r * N + n0;
      if (n0 + kPanel <= N) {
        _mm256_storeu_ps(yr, acc[r * C + c]);
      } else {  // the padded panel
        alignas(32) float t[kPanel];
        _mm256_store_ps(t, acc[r * C + c]);
        for (int64_t j = 0; n0 + j < N; ++j) yr[j] = t[j];
      }
    }
}

// R rows of x against panels [p0, p1): C panels at a time (R * C <= 12), then one at a time.
template <int R>
WAFER_AVX2 void panel_rows(const float* x, int64_t K, const float* wp, int64_t N, int64_t p0, int64_t p1, float* y) {
  constexpr int C = R >= 7 ? 1 : R >= 5 ? 2 : R == 4 ? 3 : 4;
  int64_t p = p0;
  for (; p + C <= p1; p += C) panel_block<R, C>(x, K, wp, N, p, y);
  for (; p < p1; ++p) panel_block<R, 1>(x, K, wp, N, p, y);
}

// y[M, N] over panels [p0, p1): the rows of x in groups of 8, then the 1-7 left.
void gemv_panels_range(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, int64_t p0, int64_t p1,
                       float* y) {
  int64_t b = 0;
  for (; b + 8 <= M; b += 8) panel_rows<8>(x + b * K, K, wp, N, p0, p1, y + b * N);
  const float* xb = x + b * K;
  float* yb = y + b * N;
  switch (M - b) {
    case 1: panel_rows<1>(xb, K, wp, N, p0, p1, yb); break;
    case 2: panel_rows<2>(xb, K, wp, N, p0, p1, yb); break;
    case 3: panel_rows<3>(xb, K, wp, N, p0, p1, yb); break;
    case 4: panel_rows<4>(xb, K, wp, N, p0, p1, yb); break;
    case 5: panel_rows<5>(xb, K, wp, N, p0, p1, yb); break;
    case 6: panel_rows<6>(xb, K, wp, N, p0, p1, yb); break;
    case 7: panel_rows<7>(xb, K, wp, N, p0, p1, yb); break;
    default: break;
  }
}


// Bytes of W per chunk, at least: smaller chunks cost more in claims and (kn) partial sums.
constexpr int64_t kChunkBytes = 512 * 1024;

void GemvSerial(const float* x, int64_t M, int64_t K, const float* w, int64_t N, bool nk, float* y) {
  if (nk) gemv_nk_rows(x, M, K, w, N, 0, N, y);
  else gemv_kn_rows(x, M, K, w, N, 0, K, y, N);
}

thread_local std::vector<float> t_partials;

void Gemv(const float* x, int64_t M, int64_t K, const float* w, int64_t N, bool nk, int threads, float* y) {
  const int64_t max_chunks = nk ? 16 * threads : 4 * threads;
  const int64_t chunks = std::min<int64_t>(max_chunks, K * N * 4 / kChunkBytes);
  if (threads < 2 || chunks < 2) return GemvSerial(x, M, K, w, N, nk, y);
  Pool* pool = GetPool(threads);
  std::unique_lock<std::mutex> lk(pool->busy(), std::try_to_lock);
  if (!lk.owns_lock()) return GemvSerial(x, M, K, w, N, nk, y);  // the pool is busy elsewhere
  if (nk) {  // chunk c: outputs [lo, hi), whole
    pool->Run(chunks, [&](int64_t c) {
      const int64_t lo = N * c / chunks / 4 * 4, hi = c + 1 == chunks ? N : N * (c + 1) / chunks / 4 * 4;
      gemv_nk_rows(x, M, K, w, N, lo, hi, y);
    });
    return;
  }
  // kn chunk c: rows [lo, hi) of W, a partial y of its own; the partials are summed in chunk
  // order, so the result does not depend on which thread took which chunk.
  if (t_partials.size() < static_cast<size_t>((chunks - 1) * M * N)) t_partials.resize((chunks - 1) * M * N);
  float* partials = t_partials.data();
  pool->Run(chunks, [&](int64_t c) {
    const int64_t lo = K * c / chunks / 4 * 4, hi = c + 1 == chunks ? K : K * (c + 1) / chunks / 4 * 4;
    gemv_kn_rows(x, M, K, w, N, lo, hi, c == 0 ? y : partials + (c - 1) * M * N, N);
  });
  for (int64_t c = 1; c < chunks; ++c) {
    const float* p = partials + (c - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) y[i] += p[i];
  }
}

ffi::Error GemvImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                    bool w_nk, int64_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("wafer_gemv: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = w_nk ? wd[0] : wd[1];
  if ((w_nk ? wd[1] : wd[0]) != K) return ffi::Error::InvalidArgument("wafer_gemv: contraction sizes differ");
  Gemv(x.typed_data(), M, K, w.typed_data(), N, w_nk, static_cast<int>(std::max<int64_t>(1, threads)),
       y->typed_data());
  return ffi::Error::Success();
}

// Packed kn: chunks are whole panels (no partial sums), claimed as in Gemv.
void GemvPanels(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, int threads, float* y) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t chunks = std::min<int64_t>({4 * threads, K * N * 4 / kChunkBytes, panels});
  if (threads < 2 || chunks < 2) return gemv_panels_range(x, M, K, wp, N, 0, panels, y);
  Pool* pool = GetPool(threads);
  std::unique_lock<std::mutex> lk(pool->busy(), std::try_to_lock);
  if (!lk.owns_lock()) return gemv_panels_range(x, M, K, wp, N, 0, panels, y);
  pool->Run(chunks, [&](int64_t c) {
    gemv_panels_range(x, M, K, wp, N, panels * c / chunks, panels * (c + 1) / chunks, y);
  });
}

ffi::Error GemvPanelsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp, ffi::ResultBuffer<ffi::F32> y,
                          int64_t threads) {
  const auto xd = x.dimensions();
  const auto wd = wp.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("wafer_gemv_panels: x [M, K], panels [P, K, 8], y [M, N] expected");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  if (wd[1] != K || yd[0] != M || (N + kPanel - 1) / kPanel != wd[0])
    return ffi::Error::InvalidArgument("wafer_gemv_panels: shapes differ");
  GemvPanels(x.typed_data(), M, K, wp.typed_data(), N, static_cast<int>(std::max<int64_t>(1, threads)),
             y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WaferGemvF32, GemvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N] or [N, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<bool>("w_nk")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WaferGemvPanelsF32, GemvPanelsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W packed: [ceil(N / 8), K, 8]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int64_t>("threads"));

extern "C" int wafer_cpu_kernels_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
