// A direct 3D convolution for x86 CPUs with AVX-512, called from JAX through
// XLA's FFI (ffnjax/cpu_kernel.py builds and registers it).
//
// Computes y[n, z, y, x, f] = sum_{a, b, e, c} x[n, z+a, y+b, x+e, c] * w[a, b, e, c, f]
// (VALID, unit strides) for float32 N,Z,Y,X,C inputs and kz,ky,kx,C,F kernels
// with F a multiple of 16; the caller pads for SAME. One output row is cut into
// blocks of up to XB x-positions; a block keeps XB x 32 output channels (XB x 16
// for a last group of 16) in vector registers while it runs over the kernel
// taps, so every weight vector loaded serves XB positions and every input value
// broadcast serves 32 channels. For fixed (a, b) the taps along x and the input channels are one
// contiguous run of kx*C values both in the input row and in the kernel, which
// is the inner loop. Each output is a sum in a fixed order (a, b, then e and
// c), whatever the block it falls in, so a volume split into slabs gives the
// same bits as the whole.
//
// A second handler computes the kernel's gradient of the same convolution
// (what training needs besides two forward convolutions), blocked the same way.
//
// Runs on the calling thread: XLA:CPU gives each host device its own thread,
// and ffnjax.fovsplit spreads one FOV over the devices.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t yp, xp, c;  // padded input rows/row length, channels
  int64_t kz, ky, kx;
  int64_t f;          // output channels (all of them: the kernel's row length)
};

// One block of XB output positions x NV*16 output channels starting at
// channel f0. `in` points at input (z, y, x0), `out` at output (z, y, x0).
template <int XB, int NV>
inline void Block(const float* in, const float* w, float* out, const Geometry& g, int64_t f0) {
  __m512 acc[XB][NV];
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t run = g.kx * g.c;
  for (int64_t a = 0; a < g.kz; ++a) {
    for (int64_t b = 0; b < g.ky; ++b) {
      const float* r = in + (a * g.yp + b) * g.xp * g.c;
      const float* k = w + (a * g.ky + b) * run * g.f + f0;
      for (int64_t t = 0; t < run; ++t) {
        __m512 wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(k + t * g.f + 16 * v);
        for (int i = 0; i < XB; ++i) {
          const __m512 s = _mm512_set1_ps(r[i * g.c + t]);
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(s, wv[v], acc[i][v]);
        }
      }
    }
  }
  for (int i = 0; i < XB; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + i * g.f + f0 + 16 * v, acc[i][v]);
}

// Calls body(std::integral_constant<int, n>{}) for a size n in 1..N known only at
// run time, so each block size gets its own fully unrolled instance.
template <int N, class Body>
inline void WithSize(int n, Body&& body) {
  if constexpr (N > 0) {
    if (n == N) return body(std::integral_constant<int, N>{});
    WithSize<N - 1>(n, body);
  }
}

// Largest block per channel group: accumulators + weights + one broadcast
// must fit the 32 vector registers.
constexpr int kBlock1 = 16;  // 16 channels
constexpr int kBlock2 = 12;  // 32 channels

// One output row (all x, all channels). Blocks are as even as possible
// (33 positions: 11 + 11 + 11, not 12 + 12 + 9).
void Row(const float* in, const float* w, float* out, int64_t width, const Geometry& g) {
  if (width <= 0) return;
  for (int64_t f0 = 0; f0 < g.f; f0 += 32) {
    const bool pair = g.f - f0 >= 32;
    const int64_t most = pair ? kBlock2 : kBlock1;
    const int64_t blocks = (width + most - 1) / most;
    const int64_t base = width / blocks, extra = width % blocks;
    int64_t x0 = 0;
    for (int64_t j = 0; j < blocks; ++j) {
      const int n = static_cast<int>(base + (j < extra ? 1 : 0));
      const float* src = in + x0 * g.c;
      float* dst = out + x0 * g.f;
      if (pair) {
        WithSize<kBlock2>(n, [&](auto xb) { Block<decltype(xb)::value, 2>(src, w, dst, g, f0); });
      } else {
        WithSize<kBlock1>(n, [&](auto xb) { Block<decltype(xb)::value, 1>(src, w, dst, g, f0); });
      }
      x0 += n;
    }
  }
}

ffi::Error Conv3dValidImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 5 || wd.size() != 5 || yd.size() != 5) {
    return ffi::Error::InvalidArgument("conv3d_direct: x, w and y must be 5-D");
  }
  Geometry g{xd[2], xd[3], xd[4], wd[0], wd[1], wd[2], wd[4]};
  const int64_t n = xd[0], zo = yd[1], yo = yd[2], xo = yd[3];
  if (wd[3] != g.c || g.f % 16 != 0 || g.f == 0 || yd[0] != n || yd[4] != g.f ||
      zo != xd[1] - g.kz + 1 || yo != g.yp - g.ky + 1 || xo != g.xp - g.kx + 1 ||
      zo < 1 || yo < 1 || xo < 1) {
    return ffi::Error::InvalidArgument("conv3d_direct: shapes do not make a VALID convolution "
                                       "with a multiple of 16 output channels and a non-empty output");
  }
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t z = 0; z < zo; ++z) {
      for (int64_t r = 0; r < yo; ++r) {
        const float* in = xs + (((b * xd[1] + z) * g.yp + r) * g.xp) * g.c;
        float* out = ys + (((b * zo + z) * yo + r) * xo) * g.f;
        Row(in, ws, out, xo, g);
      }
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The kernel's gradient: dk[a, b, e, c, f] = sum_{n, z, y, x} x[n, z+a, y+b, x+e, c]
// * dy[n, z, y, x, f], for the same VALID convolution. For fixed (a, b) the
// taps along x and the input channels are again one contiguous run t = e*C + c,
// so a block of TB runs x 16*NV output channels is kept in registers while it
// sums over the positions of a chunk of rows (rows stay in cache across the
// blocks); each block is loaded from and stored to dk once per chunk. The sum
// runs in one fixed order (chunks, rows, x), so the result is deterministic.

template <int TB, int NV>
inline void GradBlock(const float* const* xrows, const float* const* drows, int64_t nrows,
                      int64_t width, int64_t c, int64_t f, float* dk) {
  __m512 acc[TB][NV];
  for (int i = 0; i < TB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_loadu_ps(dk + i * f + 16 * v);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* xr = xrows[r];
    const float* dr = drows[r];
    for (int64_t x = 0; x < width; ++x) {
      __m512 dv[NV];
      for (int v = 0; v < NV; ++v) dv[v] = _mm512_loadu_ps(dr + x * f + 16 * v);
      for (int i = 0; i < TB; ++i) {
        const __m512 s = _mm512_set1_ps(xr[x * c + i]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(s, dv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < TB; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(dk + i * f + 16 * v, acc[i][v]);
}

constexpr int kGradRuns = 12;
// Rows of dy summed per pass over the blocks (about 64 KiB of dy: L2-resident).
constexpr int64_t kGradChunkBytes = 64 * 1024;

ffi::Error Conv3dKernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = x.dimensions();
  const auto dd = dy.dimensions();
  const auto kd = dk->dimensions();
  if (xd.size() != 5 || dd.size() != 5 || kd.size() != 5) {
    return ffi::Error::InvalidArgument("conv3d_kernel_grad: x, dy and dk must be 5-D");
  }
  const int64_t n = xd[0], zp = xd[1], yp = xd[2], xp = xd[3], c = xd[4];
  const int64_t zo = dd[1], yo = dd[2], xo = dd[3], f = dd[4];
  const int64_t kz = kd[0], ky = kd[1], kx = kd[2];
  if (dd[0] != n || kd[3] != c || kd[4] != f || f % 16 != 0 || f == 0 || zo < 1 || yo < 1 ||
      xo < 1 || kz != zp - zo + 1 || ky != yp - yo + 1 || kx != xp - xo + 1) {
    return ffi::Error::InvalidArgument("conv3d_kernel_grad: shapes do not make the kernel "
                                       "gradient of a VALID convolution with a multiple of 16 "
                                       "output channels");
  }
  const float* xs = x.typed_data();
  const float* ds = dy.typed_data();
  float* ks = dk->typed_data();
  const int64_t run = kx * c;
  for (int64_t i = 0; i < kz * ky * run * f; ++i) ks[i] = 0.0f;
  const int64_t rows = n * zo * yo;
  const int64_t chunk = std::max<int64_t>(1, kGradChunkBytes / (xo * f * 4));
  std::vector<const float*> xrows(chunk), drows(chunk), xblock(chunk), dblock(chunk);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t nr = std::min(chunk, rows - r0);
    for (int64_t a = 0; a < kz; ++a) {
      for (int64_t b = 0; b < ky; ++b) {
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t row = r0 + r, bn = row / (zo * yo), z = (row / yo) % zo, y = row % yo;
          xrows[r] = xs + (((bn * zp + z + a) * yp + y + b) * xp) * c;
          drows[r] = ds + row * xo * f;
        }
        float* kab = ks + (a * ky + b) * run * f;
        for (int64_t t0 = 0; t0 < run; t0 += kGradRuns) {
          const int tb = static_cast<int>(std::min<int64_t>(kGradRuns, run - t0));
          for (int64_t f0 = 0; f0 < f; f0 += 32) {
            for (int64_t r = 0; r < nr; ++r) {  // each row at this block's first run / channel
              xblock[r] = xrows[r] + t0;
              dblock[r] = drows[r] + f0;
            }
            float* out = kab + t0 * f + f0;
            const float* const* xb = xblock.data();
            const float* const* db = dblock.data();
            if (f - f0 >= 32) {
              WithSize<kGradRuns>(tb, [&](auto n) {
                GradBlock<decltype(n)::value, 2>(xb, db, nr, xo, c, f, out);
              });
            } else {
              WithSize<kGradRuns>(tb, [&](auto n) {
                GradBlock<decltype(n)::value, 1>(xb, db, nr, xo, c, f, out);
              });
            }
          }
        }
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfnjaxConv3dKernelGrad, Conv3dKernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfnjaxConv3dValid, Conv3dValidImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
