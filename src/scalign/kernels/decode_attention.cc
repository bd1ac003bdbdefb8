// Decode-step attention products for XLA:CPU, as XLA FFI custom calls.
//
// One decode step has, per (row b, kv head k), G query vectors against the cached keys and
// values of that row and head. XLA:CPU runs these as a loop of tiny batched GEMMs that stream
// the cache at ~4-5 GB/s on the 2-core machine this was written on; these two loops stream it
// at ~6-7 GB/s and read only the visible slots [lo[b], hi] instead of the whole buffer.
// Built and loaded by scalign/kernels/cpu_attention.py; the layouts are the cache layouts of
// scalign/models/transformer.py:
//
//   DecodeScores: q [B, K, G, Dh], keys [B, K, Dh, S], lo [B], hi [1] -> scores [B, K, G, S]
//     scores[b,k,g,s] = sum_d q[b,k,g,d] * keys[b,k,d,s]   for lo[b] <= s <= hi,
//                       the lowest float32 elsewhere (masked).
//   DecodeValues: p [B, K, G, S], values [B, K, S, Dh], lo [B], hi [1] -> out [B, K, G, Dh]
//     out[b,k,g,d] = sum_{lo[b] <= s <= hi} p[b,k,g,s] * values[b,k,s,d].
//
// Sums run in slot / head-dim order in float32, as XLA's own loops do. The (b, k) pairs are
// split over the intra-op thread pool XLA hands to the call; the calling thread takes one share
// and blocks (futex wait, not a spin) until the others are done.
#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSlotBlock = 32;  // slots per register block of the scores loop
constexpr int64_t kDimBlock = 32;   // head-dim lanes per register block of the values loop
constexpr float kLowest = -3.4028234663852886e38f;

// G query rows (G = 1 or 2, so the accumulators stay in registers) of one (b, k) pair.
template <int64_t G>
void ScoresRows(const float* __restrict q, const float* __restrict keys, int64_t lo,
                int64_t hi, float* __restrict out, int64_t dh, int64_t slots) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t s = 0; s < slots; ++s) out[g * slots + s] = kLowest;
  for (int64_t s0 = lo; s0 <= hi; s0 += kSlotBlock) {
    const int64_t n = hi + 1 - s0 < kSlotBlock ? hi + 1 - s0 : kSlotBlock;
    float acc[G][kSlotBlock] = {};
    if (n == kSlotBlock) {  // full block: a fixed trip count the compiler unrolls
      for (int64_t d = 0; d < dh; ++d) {
        const float* row = keys + d * slots + s0;
        for (int64_t g = 0; g < G; ++g) {
          const float qv = q[g * dh + d];
          for (int64_t j = 0; j < kSlotBlock; ++j) acc[g][j] += qv * row[j];
        }
      }
    } else {
      for (int64_t d = 0; d < dh; ++d) {
        const float* row = keys + d * slots + s0;
        for (int64_t g = 0; g < G; ++g) {
          const float qv = q[g * dh + d];
          for (int64_t j = 0; j < n; ++j) acc[g][j] += qv * row[j];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < n; ++j) out[g * slots + s0 + j] = acc[g][j];
  }
}

template <int64_t G>
void ValuesRows(const float* __restrict p, const float* __restrict values, int64_t lo,
                int64_t hi, float* __restrict out, int64_t dh, int64_t slots) {
  for (int64_t d0 = 0; d0 < dh; d0 += kDimBlock) {
    const int64_t n = dh - d0 < kDimBlock ? dh - d0 : kDimBlock;
    float acc[G][kDimBlock] = {};
    if (n == kDimBlock) {
      for (int64_t s = lo; s <= hi; ++s) {
        const float* row = values + s * dh + d0;
        for (int64_t g = 0; g < G; ++g) {
          const float w = p[g * slots + s];
          for (int64_t j = 0; j < kDimBlock; ++j) acc[g][j] += w * row[j];
        }
      }
    } else {
      for (int64_t s = lo; s <= hi; ++s) {
        const float* row = values + s * dh + d0;
        for (int64_t g = 0; g < G; ++g) {
          const float w = p[g * slots + s];
          for (int64_t j = 0; j < n; ++j) acc[g][j] += w * row[j];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < n; ++j) out[g * dh + d0 + j] = acc[g][j];
  }
}

struct Shape {
  int64_t kv_heads, groups, dh, slots;
};

// The visible slot range of row b, clipped to the buffer; empty when lo > hi.
inline void Range(const int32_t* lo, int32_t hi, int64_t b, int64_t slots, int64_t* l,
                  int64_t* h) {
  *l = lo[b] < 0 ? 0 : lo[b];
  *h = hi >= slots ? slots - 1 : hi;
}

void ScoresPairs(const float* q, const float* keys, const int32_t* lo, int32_t hi, float* out,
                 Shape sh, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t l, h;
    Range(lo, hi, p / sh.kv_heads, sh.slots, &l, &h);
    const float* kp = keys + p * sh.dh * sh.slots;
    for (int64_t g = 0; g < sh.groups;) {
      const float* qp = q + (p * sh.groups + g) * sh.dh;
      float* op = out + (p * sh.groups + g) * sh.slots;
      if (sh.groups - g >= 2) {
        ScoresRows<2>(qp, kp, l, h, op, sh.dh, sh.slots);
        g += 2;
      } else {
        ScoresRows<1>(qp, kp, l, h, op, sh.dh, sh.slots);
        g += 1;
      }
    }
  }
}

void ValuesPairs(const float* probs, const float* values, const int32_t* lo, int32_t hi,
                 float* out, Shape sh, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t l, h;
    Range(lo, hi, p / sh.kv_heads, sh.slots, &l, &h);
    const float* vp = values + p * sh.slots * sh.dh;
    for (int64_t g = 0; g < sh.groups;) {
      const float* pp = probs + (p * sh.groups + g) * sh.slots;
      float* op = out + (p * sh.groups + g) * sh.dh;
      if (sh.groups - g >= 2) {
        ValuesRows<2>(pp, vp, l, h, op, sh.dh, sh.slots);
        g += 2;
      } else {
        ValuesRows<1>(pp, vp, l, h, op, sh.dh, sh.slots);
        g += 1;
      }
    }
  }
}

// Runs f(a, b) over [0, n) split into one share per pool thread; the caller takes the first.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t parts = pool.num_threads();
  if (parts > n) parts = n;
  if (parts <= 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> left(parts - 1);
  for (int64_t i = 1; i < parts; ++i) {
    const int64_t a = n * i / parts, b = n * (i + 1) / parts;
    pool.Schedule([&f, &left, a, b] {
      f(a, b);
      if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) left.notify_all();
    });
  }
  f(0, n / parts);
  for (int64_t v = left.load(std::memory_order_acquire); v > 0;
       v = left.load(std::memory_order_acquire))
    left.wait(v, std::memory_order_acquire);
}

ffi::Error Scores(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                  ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                  ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] || kd[2] != qd[3])
    return ffi::Error::InvalidArgument("DecodeScores: want q [B,K,G,Dh], keys [B,K,Dh,S]");
  const Shape sh{qd[1], qd[2], qd[3], kd[3]};
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const int32_t* lp = lo.typed_data();
  const int32_t h = hi.typed_data()[0];
  float* op = out->typed_data();
  ParallelFor(pool, qd[0] * qd[1],
              [=](int64_t a, int64_t b) { ScoresPairs(qp, kp, lp, h, op, sh, a, b); });
  return ffi::Error::Success();
}

ffi::Error Values(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> probs,
                  ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> lo,
                  ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> out) {
  const auto pd = probs.dimensions(), vd = values.dimensions();
  if (pd.size() != 4 || vd.size() != 4 || vd[0] != pd[0] || vd[1] != pd[1] || vd[2] != pd[3])
    return ffi::Error::InvalidArgument("DecodeValues: want p [B,K,G,S], values [B,K,S,Dh]");
  const Shape sh{pd[1], pd[2], vd[3], pd[3]};
  const float* pp = probs.typed_data();
  const float* vp = values.typed_data();
  const int32_t* lp = lo.typed_data();
  const int32_t h = hi.typed_data()[0];
  float* op = out->typed_data();
  ParallelFor(pool, pd[0] * pd[1],
              [=](int64_t a, int64_t b) { ValuesPairs(pp, vp, lp, h, op, sh, a, b); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalignDecodeScores, Scores,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalignDecodeValues, Values,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
