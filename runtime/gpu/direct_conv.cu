// Direct 3x3 convolution, padding 1, NCHW, f16 storage with f32 accumulation, for convs with few
// channels (the WAE encoder's full-resolution convs and its stride-2 split), where candle's
// im2col + GEMM builds a large column buffer for a very skinny GEMM. Compiled at run time by
// NVRTC for the device's own architecture, after f16.cuh (h2f, f2h). runtime/gpu/direct_conv.rs
// holds the launch shape and a CPU twin of this loop nest.

#define OUT_TILE 8

// One thread: one output pixel, OUT_TILE output channels (blockIdx.y picks which). The block's
// weights and biases for its channel tile sit in shared memory as f32.
extern "C" __global__ void conv3x3_direct(
    const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
    const unsigned short* __restrict__ b, unsigned short* __restrict__ y,
    int n, int cin, int h, int wd, int cout, int ho, int wo, int stride, int relu) {
  extern __shared__ float sw[];  // [OUT_TILE][cin][9], then [OUT_TILE] biases
  const int co0 = blockIdx.y * OUT_TILE;
  const int tile = min(OUT_TILE, cout - co0);
  const int per = cin * 9;
  for (int i = threadIdx.x; i < tile * per; i += blockDim.x) {
    sw[i] = h2f(w[co0 * per + i]);
  }
  float* sb = sw + OUT_TILE * per;
  for (int i = threadIdx.x; i < tile; i += blockDim.x) {
    sb[i] = h2f(b[co0 + i]);
  }
  __syncthreads();

  const long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = (long long)n * ho * wo;
  if (pix >= total) return;
  const int ox = (int)(pix % wo);
  const int oy = (int)((pix / wo) % ho);
  const int img = (int)(pix / ((long long)wo * ho));

  float acc[OUT_TILE];
#pragma unroll
  for (int t = 0; t < OUT_TILE; ++t) acc[t] = 0.f;

  const int iy0 = oy * stride - 1;
  const int ix0 = ox * stride - 1;
  for (int ci = 0; ci < cin; ++ci) {
    const unsigned short* plane = x + ((long long)img * cin + ci) * h * wd;
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      const int iy = iy0 + ky;
      if (iy < 0 || iy >= h) continue;
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        const int ix = ix0 + kx;
        if (ix < 0 || ix >= wd) continue;
        const float v = h2f(plane[iy * wd + ix]);
        const float* wk = sw + ci * 9 + ky * 3 + kx;
#pragma unroll
        for (int t = 0; t < OUT_TILE; ++t) {
          if (t < tile) acc[t] += v * wk[t * per];
        }
      }
    }
  }
  const long long plane_out = (long long)ho * wo;
  unsigned short* out = y + ((long long)img * cout + co0) * plane_out + (long long)oy * wo + ox;
#pragma unroll
  for (int t = 0; t < OUT_TILE; ++t) {
    if (t < tile) {
      float v = acc[t] + sb[t];
      if (relu && v < 0.f) v = 0.f;
      out[t * plane_out] = f2h(v);
    }
  }
}
