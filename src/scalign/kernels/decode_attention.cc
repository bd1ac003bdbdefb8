// Decode-step attention for XLA:CPU, as one XLA FFI custom call per layer.
//
// One decode step has, per (row b, kv head k), G query vectors against the cached keys and
// values of that row and head. XLA:CPU runs q.K^T and p.V as loops of tiny batched GEMMs that
// stream the cache at ~4-5 GB/s on the 2-core machine this was written on, and its softmax
// between them as separate reductions over every slot of the buffer. This kernel does the
// whole attention of a pair in one pass over the visible slots [lo[b], hi] only, and splits
// the pairs over the intra-op thread pool XLA hands to the call. Built and loaded by
// scalign/kernels/cpu_attention.py; the layouts are the cache layouts of
// scalign/models/transformer.py:
//
//   DecodeAttention: q [B, K, G, Dh] (already scaled), keys [B, K, Dh, S],
//                    values [B, K, S, Dh], lo [B], hi [1]; attribute softcap (0 = none)
//                    -> out [B, K, G, Dh]
//     s_j   = sum_d q[b,k,g,d] * keys[b,k,d,j]          for lo[b] <= j <= hi
//     s_j   = softcap * tanh(s_j / softcap)             (Gemma 2; only if softcap > 0)
//     p_j   = exp(s_j - max_j s_j) / sum_j exp(...)     (softmax over the visible slots)
//     out   = sum_j p_j * values[b,k,j,:]
//   A row with no visible slot gets zeros. exp is a Cephes-style polynomial (relative error
//   ~1e-7, like XLA's own), written so the compiler vectorises it; sums run in slot /
//   head-dim order in float32.
//
// The (row, kv head) pairs are split into one share per thread of the pool (see ParallelFor).
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSlotBlock = 32;  // slots per register block of the scores loop
constexpr int64_t kDimBlock = 32;   // head-dim lanes per register block of the values loop

// G query rows (G = 1 or 2, so the accumulators stay in registers) of one (b, k) pair.
// Vectorisable exp for x <= 0 (softmax arguments): Cephes expf's range reduction and
// polynomial, 2^n built in the exponent bits. Underflows to 0 below -87.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * std::bit_cast<float>(bits);
}

// scores[g][j - lo] = q[g] . keys[:, j] for j in [lo, hi], G rows at a time (G = 1 or 2, so
// the accumulators of a block of slots stay in registers)
template <int64_t G>
void ScoresRows(const float* __restrict q, const float* __restrict keys, int64_t lo,
                int64_t hi, float* __restrict scores, int64_t n_vis, int64_t dh,
                int64_t slots) {
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
      for (int64_t j = 0; j < n; ++j) scores[g * n_vis + s0 - lo + j] = acc[g][j];
  }
}

// out[g] = sum_j w[g][j - lo] * values[j, :] for j in [lo, hi]
template <int64_t G>
void ValuesRows(const float* __restrict w, const float* __restrict values, int64_t lo,
                int64_t hi, float* __restrict out, int64_t n_vis, int64_t dh) {
  for (int64_t d0 = 0; d0 < dh; d0 += kDimBlock) {
    const int64_t n = dh - d0 < kDimBlock ? dh - d0 : kDimBlock;
    float acc[G][kDimBlock] = {};
    if (n == kDimBlock) {
      for (int64_t s = lo; s <= hi; ++s) {
        const float* row = values + s * dh + d0;
        for (int64_t g = 0; g < G; ++g) {
          const float p = w[g * n_vis + s - lo];
          for (int64_t j = 0; j < kDimBlock; ++j) acc[g][j] += p * row[j];
        }
      }
    } else {
      for (int64_t s = lo; s <= hi; ++s) {
        const float* row = values + s * dh + d0;
        for (int64_t g = 0; g < G; ++g) {
          const float p = w[g * n_vis + s - lo];
          for (int64_t j = 0; j < n; ++j) acc[g][j] += p * row[j];
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < n; ++j) out[g * dh + d0 + j] = acc[g][j];
  }
}

// softmax of each of the G rows of n_vis scores, in place; returns nothing, rows sum to 1
void Softmax(float* __restrict scores, int64_t rows, int64_t n_vis, float softcap) {
  for (int64_t g = 0; g < rows; ++g) {
    float* s = scores + g * n_vis;
    if (softcap > 0.0f) {  // cap * tanh(x / cap), tanh(y) = 1 - 2 / (exp(2y) + 1)
      const float inv = 1.0f / softcap;
      for (int64_t j = 0; j < n_vis; ++j) {
        const float y = s[j] * inv;
        const float e = ExpNonPositive(-2.0f * std::fabs(y));  // exp(-2|y|) in (0, 1]
        const float t = (1.0f - e) / (1.0f + e);                // tanh(|y|)
        s[j] = softcap * (y < 0.0f ? -t : t);
      }
    }
    float m = s[0];
    for (int64_t j = 1; j < n_vis; ++j) m = s[j] > m ? s[j] : m;
    float total = 0.0f;
    for (int64_t j = 0; j < n_vis; ++j) {
      s[j] = ExpNonPositive(s[j] - m);
      total += s[j];
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < n_vis; ++j) s[j] *= inv;
  }
}

struct Shape {
  int64_t kv_heads, groups, dh, slots;
};

void AttentionPairs(const float* q, const float* keys, const float* values, const int32_t* lo,
                    int32_t hi, float softcap, float* out, Shape sh, int64_t p0, int64_t p1) {
  std::vector<float> scratch;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t b = p / sh.kv_heads;
    const int64_t l = lo[b] < 0 ? 0 : lo[b];
    const int64_t h = hi >= sh.slots ? sh.slots - 1 : hi;
    float* op = out + p * sh.groups * sh.dh;
    if (l > h) {  // nothing visible
      for (int64_t i = 0; i < sh.groups * sh.dh; ++i) op[i] = 0.0f;
      continue;
    }
    const int64_t n_vis = h - l + 1;
    scratch.resize(static_cast<size_t>(sh.groups * n_vis));
    float* sc = scratch.data();
    const float* kp = keys + p * sh.dh * sh.slots;
    const float* vp = values + p * sh.slots * sh.dh;
    const float* qp = q + p * sh.groups * sh.dh;
    for (int64_t g = 0; g < sh.groups;) {
      if (sh.groups - g >= 2) {
        ScoresRows<2>(qp + g * sh.dh, kp, l, h, sc + g * n_vis, n_vis, sh.dh, sh.slots);
        g += 2;
      } else {
        ScoresRows<1>(qp + g * sh.dh, kp, l, h, sc + g * n_vis, n_vis, sh.dh, sh.slots);
        g += 1;
      }
    }
    Softmax(sc, sh.groups, n_vis, softcap);
    for (int64_t g = 0; g < sh.groups;) {
      if (sh.groups - g >= 2) {
        ValuesRows<2>(sc + g * n_vis, vp, l, h, op + g * sh.dh, n_vis, sh.dh);
        g += 2;
      } else {
        ValuesRows<1>(sc + g * n_vis, vp, l, h, op + g * sh.dh, n_vis, sh.dh);
        g += 1;
      }
    }
  }
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                     ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                     ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, float softcap,
                     ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[2] != qd[3] || vd[0] != qd[0] || vd[1] != qd[1] || vd[2] != kd[3] || vd[3] != qd[3] ||
      static_cast<int64_t>(lo.element_count()) != qd[0])
    return ffi::Error::InvalidArgument(
        "DecodeAttention: want q [B,K,G,Dh], keys [B,K,Dh,S], values [B,K,S,Dh], lo [B]");
  const Shape sh{qd[1], qd[2], qd[3], kd[3]};
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  const float* vp = values.typed_data();
  const int32_t* lp = lo.typed_data();
  const int32_t h = hi.typed_data()[0];
  float* op = out->typed_data();
  scalign::ParallelFor(pool, qd[0] * qd[1], [=](int64_t a, int64_t b) {
    AttentionPairs(qp, kp, vp, lp, h, softcap, op, sh, a, b);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalignDecodeAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
