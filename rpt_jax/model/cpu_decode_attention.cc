// One decode step's attention on the CPU: each row's single query (per query head) against its
// KV-cache row, reading only the row's live keys, each key and value once.
//
// q [B, KVH, G, Dh], k and v [B, KVH, S, Dh] (float32), live [B] (int32: keys [0, live) are
// read) -> out [B, KVH, G, Dh]. The (row, KV head) pairs are shared out in small batches to the
// calling thread and XLA's intra-op threads; the call returns once every pair is done, never
// waiting for a helper that has not started (one that starts late finds no pair left).
// Per pair: the G scores of each key (its G query heads share it), a softmax per head, then the
// value rows weighted into G accumulators. With AVX-512 and Dh % 16 == 0, G <= 8, the queries
// and accumulators stay in vector registers; otherwise plain loops.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

struct Shape {
  int64_t kvh, g, s, h;
};

// Softmax of the first n scores of each of the G rows of `scores` [G, S] in place; returns
// the G sums of exponentials in `total`.
void Softmax(float* scores, const float* max_g, int64_t g, int64_t s, int64_t n,
             float* total) {
  for (int64_t i = 0; i < g; ++i) {
    float* row = scores + i * s;
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      row[t] = std::exp(row[t] - max_g[i]);
      sum += row[t];
    }
    total[i] = sum;
  }
}

// max_g, total: [G] scratch.
void GenericPair(const float* Q, const float* K, const float* V, int64_t n, const Shape& d,
                 float* scores, float* max_g, float* total, float* O) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.h));
  std::fill(max_g, max_g + d.g, -3.0e38f);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d.g; ++i) {
      float dot = 0.f;
      for (int64_t e = 0; e < d.h; ++e) dot += Q[i * d.h + e] * K[t * d.h + e];
      scores[i * d.s + t] = dot * scale;
      max_g[i] = std::max(max_g[i], dot * scale);
    }
  }
  Softmax(scores, max_g, d.g, d.s, n, total);
  std::fill(O, O + d.g * d.h, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < d.g; ++i)
      for (int64_t e = 0; e < d.h; ++e) O[i * d.h + e] += scores[i * d.s + t] * V[t * d.h + e];
  for (int64_t i = 0; i < d.g; ++i)
    for (int64_t e = 0; e < d.h; ++e) O[i * d.h + e] /= total[i];
}

#if defined(__AVX512F__)
constexpr int64_t kMaxG = 8;

// Dh = 16 * W: a key row is W vectors; per query head, W query and W accumulator vectors.
template <int W>
void VectorPair(const float* Q, const float* K, const float* V, int64_t n, const Shape& d,
                float* scores, float* O) {
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(d.h)));
  __m512 q[kMaxG][W], acc[kMaxG][W];
  float max_g[kMaxG], total[kMaxG];
  for (int64_t i = 0; i < d.g; ++i) {
    max_g[i] = -3.0e38f;
    for (int w = 0; w < W; ++w) {
      q[i][w] = _mm512_mul_ps(_mm512_loadu_ps(Q + i * d.h + 16 * w), scale);
      acc[i][w] = _mm512_setzero_ps();
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 key[W];
    for (int w = 0; w < W; ++w) key[w] = _mm512_loadu_ps(K + t * d.h + 16 * w);
    for (int64_t i = 0; i < d.g; ++i) {
      __m512 dot = _mm512_mul_ps(q[i][0], key[0]);
      for (int w = 1; w < W; ++w) dot = _mm512_fmadd_ps(q[i][w], key[w], dot);
      const float score = _mm512_reduce_add_ps(dot);
      scores[i * d.s + t] = score;
      max_g[i] = std::max(max_g[i], score);
    }
  }
  Softmax(scores, max_g, d.g, d.s, n, total);
  for (int64_t t = 0; t < n; ++t) {
    __m512 value[W];
    for (int w = 0; w < W; ++w) value[w] = _mm512_loadu_ps(V + t * d.h + 16 * w);
    for (int64_t i = 0; i < d.g; ++i) {
      const __m512 p = _mm512_set1_ps(scores[i * d.s + t]);
      for (int w = 0; w < W; ++w) acc[i][w] = _mm512_fmadd_ps(p, value[w], acc[i][w]);
    }
  }
  for (int64_t i = 0; i < d.g; ++i) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[i]);
    for (int w = 0; w < W; ++w)
      _mm512_storeu_ps(O + i * d.h + 16 * w, _mm512_mul_ps(acc[i][w], inv));
  }
}
#endif

struct Inputs {
  const float *q, *k, *v;
  const int32_t* live;
  float* out;
  Shape d;
};

void Pairs(const Inputs& in, int64_t begin, int64_t end) {
  const Shape& d = in.d;
  const float *q = in.q, *k = in.k, *v = in.v;
  const int32_t* live = in.live;
  float* out = in.out;
  std::vector<float> scores(d.g * d.s), max_g(d.g), total(d.g);
  for (int64_t pair = begin; pair < end; ++pair) {
    const int64_t n = std::min<int64_t>(std::max<int64_t>(live[pair / d.kvh], 1), d.s);
    const float* Q = q + pair * d.g * d.h;
    const float* K = k + pair * d.s * d.h;
    const float* V = v + pair * d.s * d.h;
    float* O = out + pair * d.g * d.h;
#if defined(__AVX512F__)
    if (d.g <= kMaxG && d.h == 32) {
      VectorPair<2>(Q, K, V, n, d, scores.data(), O);
      continue;
    }
    if (d.g <= kMaxG && d.h == 64) {
      VectorPair<4>(Q, K, V, n, d, scores.data(), O);
      continue;
    }
    if (d.g <= kMaxG && d.h == 128) {
      VectorPair<8>(Q, K, V, n, d, scores.data(), O);
      continue;
    }
#endif
    GenericPair(Q, K, V, n, d, scores.data(), max_g.data(), total.data(), O);
  }
}

// Pairs handed out `batch` at a time. Shared (not on the caller's stack) so that a helper
// scheduled on XLA's pool that starts after the call returned touches only this.
struct Work {
  Inputs in;
  int64_t pairs, batch;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t begin; (begin = next.fetch_add(batch)) < pairs;) {
      const int64_t end = std::min(pairs, begin + batch);
      Pairs(in, begin, end);
      done.fetch_add(end - begin, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3])
    return ffi::Error::InvalidArgument("expected q [B, KVH, G, Dh] and k, v [B, KVH, S, Dh]");
  const Shape d{qd[1], qd[2], kd[2], qd[3]};
  const int64_t pairs = qd[0] * d.kvh;
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), pairs) - 1);
  auto work = std::make_shared<Work>();
  work->in = Inputs{q.typed_data(), k.typed_data(), v.typed_data(), live.typed_data(),
                    out->typed_data(), d};
  work->pairs = pairs;
  work->batch = std::max<int64_t>(1, pairs / (4 * (helpers + 1)));
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < pairs) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RptCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
