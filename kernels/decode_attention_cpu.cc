// Decode attention on CPU, an XLA FFI target (kernels/decode_attention_cpu.py calls it):
// one new query token per sequence, G query heads per KV head, over the first n_B[b] positions
// of a [B, K, S, H] f32 cache. Only those positions are read (XLA's fused form read all S).
//
//   out[b, k, g] = softmax_j(q[b, k, g] . k_cache[b, k, j] * scale) @ v_cache[b, k, :n_B[b]]
//
// Work units are (b, k) pairs, spread over the shared pool. H must be a multiple of 32 (Python
// checks; XLA's form runs otherwise).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using wafer::GetPool;
using wafer::hsum;
using wafer::Pool;

// exp(x) for x <= 0 (scores minus their max), Cephes' polynomial as in avx_mathfun: a few ulp.
WAFER_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this, exp rounds to (nearly) zero anyway
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// o[GB, H] = p[GB, n] @ v[n, H] / l[GB], GB (1..3) query heads at a time, 32 columns at a time.
template <int GB>
WAFER_AVX2 void weighted_values(const float* p, int64_t ldp, const float* l, const float* v, int64_t n, int64_t H,
                                float* o) {
  for (int64_t h = 0; h < H; h += 32) {
    __m256 acc[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int i = 0; i < 4; ++i) acc[g][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + j * H + h;
      const __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
      const __m256 v2 = _mm256_loadu_ps(vj + 16), v3 = _mm256_loadu_ps(vj + 24);
      for (int g = 0; g < GB; ++g) {
        const __m256 pj = _mm256_broadcast_ss(p + g * ldp + j);
        acc[g][0] = _mm256_fmadd_ps(pj, v0, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(pj, v1, acc[g][1]);
        acc[g][2] = _mm256_fmadd_ps(pj, v2, acc[g][2]);
        acc[g][3] = _mm256_fmadd_ps(pj, v3, acc[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      const __m256 inv = _mm256_set1_ps(1.0f / l[g]);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + g * H + h + 8 * i, _mm256_mul_ps(acc[g][i], inv));
    }
  }
}

thread_local std::vector<float> t_scores;

// One (b, k) pair: q [G, H], k and v [n, H] (rows of H), out [G, H].
WAFER_AVX2 void attend_one(const float* q, const float* k, const float* v, int64_t n, int64_t G, int64_t H,
                           float scale, float* out) {
  if (n <= 0) {  // nothing visible: zeros, as the reference's all-masked row gives
    std::fill(out, out + G * H, 0.0f);
    return;
  }
  if (t_scores.size() < static_cast<size_t>(G * n)) t_scores.resize(G * n);
  float* s = t_scores.data();  // s[g, j]
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * H;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * H;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      for (int64_t h = 0; h < H; h += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h), _mm256_loadu_ps(kj + h), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + h + 8), _mm256_loadu_ps(kj + h + 8), a1);
      }
      s[g * n + j] = hsum(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  std::vector<float> l(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    const float m = *std::max_element(sg, sg + n);
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sg + j), mv));
      _mm256_storeu_ps(sg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (; j < n; ++j) {
      sg[j] = std::exp(sg[j] - m);
      total += sg[j];
    }
    l[g] = total;
  }
  int64_t g = 0;
  for (; g + 3 <= G; g += 3) weighted_values<3>(s + g * n, n, l.data() + g, v, n, H, out + g * H);
  if (G - g == 2) weighted_values<2>(s + g * n, n, l.data() + g, v, n, H, out + g * H);
  if (G - g == 1) weighted_values<1>(s + g * n, n, l.data() + g, v, n, H, out + g * H);
}

// Cache bytes below which a second thread costs more than it saves.
constexpr int64_t kParallelBytes = 256 * 1024;

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                               ffi::Buffer<ffi::S32> n_visible, ffi::ResultBuffer<ffi::F32> out, float scale,
                               int64_t threads) {
  const auto qd = q.dimensions();
  const auto cd = k_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || n_visible.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("wafer_decode_attention: q and caches must be 4-D, n_visible 1-D");
  const int64_t B = qd[0], K = qd[1], G = qd[2], H = qd[3], S = cd[2];
  if (cd[0] != B || cd[1] != K || cd[3] != H || H % 32 != 0 || n_visible.dimensions()[0] != B)
    return ffi::Error::InvalidArgument("wafer_decode_attention: shapes disagree (or H % 32 != 0)");
  const float* qp = q.typed_data();
  const float* kp = k_cache.typed_data();
  const float* vp = v_cache.typed_data();
  const int32_t* np_ = n_visible.typed_data();
  float* op = out->typed_data();
  auto unit = [&](int64_t u) {
    const int64_t b = u / K;
    const int64_t n = std::clamp<int64_t>(np_[b], 0, S);
    attend_one(qp + u * G * H, kp + u * S * H, vp + u * S * H, n, G, H, scale, op + u * G * H);
  };
  int64_t visible_bytes = 0;
  for (int64_t b = 0; b < B; ++b) visible_bytes += std::clamp<int64_t>(np_[b], 0, S) * K * H * 8;
  if (threads > 1 && B * K > 1 && visible_bytes >= kParallelBytes) {
    Pool* pool = GetPool(static_cast<int>(threads));
    std::unique_lock<std::mutex> lk(pool->busy(), std::try_to_lock);
    if (lk.owns_lock()) {
      pool->Run(B * K, unit);
      return ffi::Error::Success();
    }
  }
  for (int64_t u = 0; u < B * K; ++u) unit(u);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WaferDecodeAttentionF32, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, K, G, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_cache [B, K, S, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_cache [B, K, S, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // n_visible [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, K, G, H]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));
