// What NVRTC makes of the exponential forms CubeCL can emit (compiled like NVRTC: sm_90a, no
// fast-math flags): `__expf(v)` (CubeCL's fast `exp`), `__powf(2.0f, v)` (its fast `powf` with a
// constant base) and `exp2f(v)` for comparison; then whether clamping the argument at -126 lets
// ptxas drop the subnormal guard of the non-ftz `ex2.approx.f32`, against the ftz instruction
// itself. `run-h200.sh scan-sass` prints their SASS.
extern "C" __global__ void fast_exp(const float* a, const float* x, float* out) {
    int i = threadIdx.x;
    out[i] = __expf(x[i] * a[i]);
}
extern "C" __global__ void fast_pow2(const float* a, const float* x, float* out) {
    int i = threadIdx.x;
    out[i] = __powf(2.0f, x[i] * a[i]);
}
extern "C" __global__ void plain_exp2(const float* a, const float* x, float* out) {
    int i = threadIdx.x;
    out[i] = exp2f(x[i] * a[i]);
}
extern "C" __global__ void clamped_pow2(const float* a, const float* x, float* out) {
    int i = threadIdx.x;
    out[i] = __powf(2.0f, fmaxf(x[i] * a[i], -126.0f));
}
extern "C" __global__ void ftz_ex2(const float* a, const float* x, float* out) {
    int i = threadIdx.x;
    float r, v = x[i] * a[i];
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    out[i] = r;
}
