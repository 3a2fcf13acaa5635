// The two kernels around the GEMM of a wider 3x3 conv (padding 1), f16. im2col writes the
// column matrix as [C*9][N*Ho*Wo], so that weight [Cout][C*9] times it is [Cout][N*Ho*Wo]: at
// batch 1 that is NCHW already, with no transposing copy. bias_act_nchw then adds the bias,
// applies ReLU and lays the result out as NCHW in one pass. Compiled by NVRTC after f16.cuh
// (h2f, f2h); runtime/gpu/gemm_conv.rs holds the CPU twins and the shapes.

// One thread per column-matrix element; consecutive threads walk a row (k), so both the
// writes and, within an output row, the reads are coalesced.
extern "C" __global__ void im2col_kn(const unsigned short* __restrict__ x,
                                     unsigned short* __restrict__ col, int n, int c, int h,
                                     int w, int ho, int wo, int stride) {
  const long long cols = (long long)n * ho * wo;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= cols * c * 9) return;
  const int k = (int)(idx / cols);
  const long long p = idx % cols;
  const int ox = (int)(p % wo);
  const int oy = (int)((p / wo) % ho);
  const int img = (int)(p / ((long long)wo * ho));
  const int ci = k / 9, ky = (k % 9) / 3, kx = k % 3;
  const int iy = oy * stride - 1 + ky, ix = ox * stride - 1 + kx;
  unsigned short v = 0;  // +0.0 in f16
  if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
    v = x[(((long long)img * c + ci) * h + iy) * w + ix];
  }
  col[idx] = v;
}

// y [Cout][N*plane] -> out [N][Cout][plane], plus bias, then ReLU if asked.
extern "C" __global__ void bias_act_nchw(const unsigned short* __restrict__ y,
                                         const unsigned short* __restrict__ b,
                                         unsigned short* __restrict__ out, int n, int cout,
                                         long long plane, int relu) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)n * cout * plane) return;
  const long long q = idx % plane;
  const int co = (int)((idx / plane) % cout);
  const int img = (int)(idx / (plane * cout));
  float v = h2f(y[(long long)co * n * plane + (long long)img * plane + q]) + h2f(b[co]);
  if (relu && v < 0.f) v = 0.f;
  out[idx] = f2h(v);
}
