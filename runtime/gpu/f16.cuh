// f16 <-> f32 for the kernels, without CUDA headers (NVRTC is given none): the PTX conversions
// cuda_fp16.h itself emits. runtime/gpu/nvrtc.rs puts this before every kernel source.

__device__ __forceinline__ float h2f(unsigned short h) {
  float f;
  asm("{cvt.f32.f16 %0, %1;}\n" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short f2h(float f) {
  unsigned short h;
  asm("{cvt.rn.f16.f32 %0, %1;}\n" : "=h"(h) : "f"(f));
  return h;
}
