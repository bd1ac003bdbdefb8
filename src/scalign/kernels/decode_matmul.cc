// Few-row float32 products for XLA:CPU decode steps, as an XLA FFI custom call.
//
// A decode step multiplies R rows (the batch, one token each: R = 8..128 typically) by every
// weight matrix of the model once. XLA:CPU runs each product through Eigen, which re-packs the
// weight into its own panel layout on every call. Here the weight is packed once (by the
// sampler, `scalign.kernels.cpu_matmul.pack_panels`) into panels of kPanel = 16 output
// columns, the reduction axis major inside a panel:
//
//   PanelMatmul: x [R, K], wp [P, K, 16] -> y [R, P * 16]
//     wp[p, k, j] = W[k, p * 16 + j]                 (W [K, N] the stored weight, N = P * 16)
//     y[r, p * 16 + j] = sum_k x[r, k] * wp[p, k, j] (float32, k in order)
//
// so a panel streams from memory once per call as consecutive 64-byte rows. The register
// tile is kRows rows x 16 columns: per k, two 8-wide loads of the panel and kRows broadcasts
// of x, 2 * kRows fused multiply-adds into 2 * kRows accumulators that stay in registers. x is
// first re-laid as [R / kRows][K][kRows] so the broadcasts of one k are adjacent. While the
// row tiles of one panel run, they prefetch the next panel between them, so the weights stream
// from memory during compute instead of before it. Written with GCC vector extensions
// (compiled with -march=native: AVX2/FMA here, NEON elsewhere); the panels are split over the
// intra-op thread pool XLA hands to the call (ParallelFor).
//
// Measured on the 2-core AMD EPYC (AVX2/FMA, no AVX-512) this was written on: the tile runs at
// ~85-92 GFLOP/s per core with its operands in L1 (one core's FMA peak: ~130); the 57 products
// of a sample_llama_small step (32 rows, 115 MB of weights) in 16-21 ms against 18-32 ms for
// XLA's W x^T, alternating in one process (the machine's speed drifts 10-20%). Tried and not
// measurably better: 6-row tiles, 24-column panels, x read in place, k in chunks of 64-256,
// no prefetch (0.78-0.85 of XLA's time vs ~0.70-0.75 with it). Not faster than XLA for the
// 2048 rows of a prefill (70-80 vs 83-96 GFLOP/s), which keeps XLA's dots.
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // output columns per packed panel (two 8-wide vectors)
constexpr int64_t kRows = 4;    // rows of x per register tile

typedef float V8 __attribute__((vector_size(32)));
typedef float V8U __attribute__((vector_size(32), aligned(4)));  // unaligned loads / stores

// y[r, 0:16] = sum_k xt[k, r] * wp[k, 0:16] for the ROWS rows of one tile (xt [K][kRows]).
template <int64_t ROWS>
inline void Tile(const float* __restrict xt, const float* __restrict wp, int64_t K,
                 float* __restrict y, int64_t ldy, const float* pf, int64_t pf_every) {
  V8 acc[ROWS][2];
#pragma GCC unroll 8
  for (int64_t r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = V8{};
  int64_t countdown = pf_every;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const V8 w0 = *reinterpret_cast<const V8U*>(wp + k * kPanel);
    const V8 w1 = *reinterpret_cast<const V8U*>(wp + k * kPanel + 8);
    if (--countdown == 0) {  // one 64-byte row of the next panel into the caches
      __builtin_prefetch(pf, 0, 3);
      pf += kPanel;
      countdown = pf_every;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < ROWS; ++r) {
      const float s = xt[k * kRows + r];
      acc[r][0] += w0 * s;
      acc[r][1] += w1 * s;
    }
  }
#pragma GCC unroll 8
  for (int64_t r = 0; r < ROWS; ++r) {
    *reinterpret_cast<V8U*>(y + r * ldy) = acc[r][0];
    *reinterpret_cast<V8U*>(y + r * ldy + 8) = acc[r][1];
  }
}

// Panels [p0, p1) of y for all R rows; xt: x re-laid as [ceil(R / kRows)][K][kRows].
void Panels(const float* xt, const float* wp, float* y, int64_t R, int64_t K, int64_t N,
            int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = wp + p * K * kPanel;
    float* yp = y + p * kPanel;
    // the tiles of this panel prefetch the next one between them, one of its K rows every
    // `tiles` steps of k, so memory streams while the tiles compute (the first tile of a
    // panel would otherwise wait on memory and the others leave it idle)
    const float* next = w + (p + 1 < p1 ? K * kPanel : 0);
    const int64_t tiles = (R + kRows - 1) / kRows;
    const int64_t per_tile = (K + tiles - 1) / tiles;  // next-panel rows each tile prefetches
    int64_t r = 0;
    for (int64_t t = 0; r + kRows <= R; r += kRows, ++t)
      Tile<kRows>(xt + r * K, w, K, yp + r * N, N, next + t * per_tile * kPanel, tiles);
    const float* xr = xt + r * K;
    const float* pf = next + (r / kRows) * per_tile * kPanel;
    switch (R - r) {  // the last rows (kRows = 4: up to 3)
      case 3: Tile<3>(xr, w, K, yp + r * N, N, pf, tiles); break;
      case 2: Tile<2>(xr, w, K, yp + r * N, N, pf, tiles); break;
      case 1: Tile<1>(xr, w, K, yp + r * N, N, pf, tiles); break;
      default: break;
    }
  }
}

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] ||
      wd[2] != kPanel || yd[0] != xd[0] || yd[1] != wd[0] * kPanel)
    return ffi::Error::InvalidArgument(
        "PanelMatmul: want x [R, K], wp [P, K, 16] and y [R, P * 16]");
  const int64_t R = xd[0], K = xd[1], P = wd[0], N = P * kPanel;
  if (R == 0 || P == 0) return ffi::Error::Success();
  // x re-laid tile by tile: xt[t][k][i] = x[t * kRows + i, k]. The lanes past the last row
  // are never read (the last tile is a Tile<R mod kRows>), so the buffer is only grown, not
  // cleared, on this per-step path.
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>((R + kRows - 1) / kRows * kRows * K));
  float* xt = scratch.data();
  const float* xs = x.typed_data();
  for (int64_t r = 0; r < R; ++r) {
    float* dst = xt + (r / kRows) * K * kRows + r % kRows;
    const float* src = xs + r * K;
    for (int64_t k = 0; k < K; ++k) dst[k * kRows] = src[k];
  }
  const float* w = wp.typed_data();
  float* out = y->typed_data();
  scalign::ParallelFor(pool, P, [=](int64_t a, int64_t b) { Panels(xt, w, out, R, K, N, a, b); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScalignPanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
