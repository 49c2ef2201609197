// What the CPU kernels (gemv_cpu.cc, decode_attention_cpu.cc) share: AVX2 helpers and the thread
// pool (one per process).
#pragma once

#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace wafer {

// Vector code is compiled for AVX2 + FMA per function, never for the whole file: the library
// loads on any x86-64 CPU, and Python runs the kernels only where the CPU has both.
#define WAFER_AVX2 __attribute__((target("avx2,fma")))

WAFER_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// A pool of worker threads that help the calling thread through a job's chunks. Chunks are
// claimed one at a time from a shared counter, so a worker that is asleep or descheduled (two
// cores shared with other processes) never holds the caller up beyond the one chunk it is
// computing: the caller takes whatever is left. Workers spin for a while after a job (the next
// GEMV of a decode step follows within microseconds), then sleep.
constexpr auto kSpin = std::chrono::microseconds(200);

class Pool {
 public:
  explicit Pool(int workers) : threads_count_(workers + 1) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { Work(); });
  }
  int threads() const { return threads_count_; }
  std::mutex& busy() { return busy_; }

  // Runs fn(chunk) for chunk in [0, chunks), the caller included; the caller holds busy().
  template <typename Fn>
  void Run(int64_t chunks, Fn&& fn) {
    job_.store(&Trampoline<std::remove_reference_t<Fn>>, std::memory_order_relaxed);
    arg_.store(&fn, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      generation_ = generation_ == 0xffffffffu ? 1 : generation_ + 1;  // 0 is the workers' start
      state_.store(generation_ << 32, std::memory_order_release);  // generation, next chunk 0
    }
    cv_.notify_all();
    int64_t mine = 0;
    for (int64_t c; (c = Claim(generation_)) >= 0; ++mine) fn(c);
    if (mine < chunks) {
      done_.fetch_add(mine, std::memory_order_acq_rel);
      while (done_.load(std::memory_order_acquire) != chunks) _mm_pause();
    }
  }

 private:
  template <typename Fn>
  static void Trampoline(void* f, int64_t c) { (*static_cast<Fn*>(f))(c); }

  // The next chunk of generation `gen`, or -1 when there is none (or the job has moved on).
  int64_t Claim(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((s >> 32) != gen || static_cast<int64_t>(s & 0xffffffffu) >= chunks_) return -1;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return static_cast<int64_t>(s & 0xffffffffu);
    }
  }

  void Work() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      uint64_t gen;
      int spins = 0;
      while ((gen = state_.load(std::memory_order_acquire) >> 32) == seen) {
        _mm_pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) >> 32) != seen; });
        }
      }
      seen = gen;
      // job_ and arg_ read before a successful claim belong to `gen`: the caller cannot finish
      // (and publish the next job) while a chunk of this one is unclaimed.
      for (;;) {
        auto job = job_.load(std::memory_order_relaxed);
        void* arg = arg_.load(std::memory_order_relaxed);
        const int64_t c = Claim(gen);
        if (c < 0) break;
        job(arg, c);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  const int threads_count_;
  std::vector<std::thread> threads_;
  uint64_t generation_ = 0;               // written by the caller only
  std::atomic<uint64_t> state_{0};        // generation << 32 | next chunk
  std::atomic<int64_t> done_{0};          // chunks finished by workers (and the caller, at the end)
  std::atomic<void (*)(void*, int64_t)> job_{nullptr};
  std::atomic<void*> arg_{nullptr};
  std::atomic<int64_t> chunks_{0};
  std::mutex m_, busy_;
  std::condition_variable cv_;
};

inline std::mutex g_pool_mutex;
inline Pool* g_pool = nullptr;  // never freed: workers live as long as the process
inline bool g_atfork = false;

// A forked child has no worker threads: it builds its own pool on first use (the parent's is
// leaked in the child, never touched).
inline void ForgetPoolInChild() {
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
}

inline Pool* GetPool(int threads) {
  std::lock_guard<std::mutex> lk(g_pool_mutex);
  if (!g_atfork) {
    pthread_atfork(nullptr, nullptr, ForgetPoolInChild);
    g_atfork = true;
  }
  if (g_pool == nullptr || g_pool->threads() != threads) g_pool = new Pool(threads - 1);
  return g_pool;
}

}  // namespace wafer
