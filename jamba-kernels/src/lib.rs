//! CubeCL kernels for Jamba's Mamba mixer, on any CubeCL runtime (CUDA, wgpu, ...).
//!
//! - [`scan::selective_scan_fwd`]: the fused selective scan (softplus(δ + bias), exp(Δ·A),
//!   Δ·B·u, the recurrence, the C contraction, the D skip and the SiLU(z) gate in one pass),
//!   taking an initial state and returning the final one. A length-1 sequence is the decoding
//!   state update. Jamba's state size runs the time-chunked kernel of [`scan_chunked`]
//!   (a unit per channel and chunk of time, the chunks chained by their end states); other
//!   sizes the tiled kernel.
//! - [`scan_bwd::selective_scan_bwd`]: its backward, recomputing the states from tile
//!   checkpoints instead of storing `[seq, state]` per channel.
//! - [`conv::causal_conv1d`]: depthwise causal conv1d + bias + SiLU over a sequence, continuing
//!   from a conv state and returning the new one (length 1: the decoding update).
//! - [`norm::rms_norm`]: RMSNorm with f32 statistics in one launch instead of eight;
//!   [`norm::add_rms_norm`] and [`norm::add2_rms_norm`]: residual additions and the norm after
//!   them in one.
//! - [`gemv::gemv`]: products of a few rows by a weight (a decoding step's projections) at
//!   memory bandwidth, f32 accumulation; [`gemv::gemv_normed`]: the same of an RMSNorm's
//!   output, the norm computed inside the product's launch.
//! - [`mamba_step::mamba_step`]: a Mamba mixer's decoding step between `in_proj` and
//!   `out_proj` (conv, `x_proj`, the Δ/B/C norms, `dt_proj`, the state update, the gate) in one
//!   launch (a few rows) or two instead of about fifteen.
//! - [`moe::routed_experts`]: a mixture-of-experts feed-forward for a few tokens with the
//!   router's softmax and top-k on the device (no routing read back to the host);
//!   [`moe::routed_experts_normed`]: the residual sums, norm and router before the experts
//!   taken into the routing launch; [`moe::route`]: the router's softmax and top-k of many
//!   tokens (a prefill's grouped experts).
//! - [`mlp::swiglu`]: a dense SwiGLU MLP of a few rows on the expert kernels;
//!   [`mlp::swiglu_normed`]: with the residual sums and the norm before it in its first launch.
//! - [`attention::decode_attention`]: one new query per row over the cached keys and values.
//! - [`activation::silu_mul`]: the SwiGLU gate `silu(gate) · up` of a prefill in one launch.
//! - [`matmul::matmul_f32`]: f32 products kept off TF32 tensor cores;
//!   [`matmul::matmul_tma`]: half-precision products of many rows on cubek's TMA kernel.
//! - [`argmax::argmax_rows`]: each row's largest value's index (greedy decoding) in two
//!   launches.
//!
//! The few-row products and expert MLPs have a vector form (16-byte weight loads, one launch
//! per product; [`gemv::takes_vector_form`], [`moe::takes_vector_form`]). The decoding step's
//! kernels take [`Strided`] or `Array` arguments, not CubeCL `Tensor`s, whose launch metadata
//! costs a CUDA launch ~6 µs of host time.
//!
//! The functions take and return Burn's [`CubeTensor`](burn_cubecl::tensor::CubeTensor)s; the
//! `jamba` crate calls them for `CubeBackend` (the model's `JambaBackend` for the scan and the
//! convolution, the inference engine's `EngineBackend` for the rest) and keeps its tensor-op
//! path for every other backend. Each kernel's tests, against an f64 host loop on fresh
//! seeded inputs, are in `tests/`, a file per kernel. Inputs may be f32, f16 or bf16 (where the runtime has them);
//! arithmetic is f32.

pub mod activation;
pub mod argmax;
pub mod attention;
pub mod conv;
pub mod gemv;
pub mod mamba_step;
pub mod matmul;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod scan;
pub mod scan_bwd;
pub mod scan_chunked;

use cubecl::prelude::*;

/// Contiguous tensors of the given shapes and dtypes, each its own allocation: a kernel's
/// outputs and scratch buffers in one call.
///
/// (Carving them from one reservation, `ComputeClient::empty_tensors` with several layouts, so
/// that CubeCL's device thread gets one allocation task instead of one per buffer, measured
/// no faster on the H200: b1 bf16 617.6 / 618.0 tokens/s with it, 633.5 / 629.0 without,
/// `jamba-bench/RESULTS.md`, session 16. Separate buffers also free separately.)
pub(crate) fn empty_many<R: burn_cubecl::CubeRuntime>(
    client: &cubecl::client::ComputeClient<R>,
    device: &R::Device,
    specs: &[(&[usize], burn_std::DType)],
) -> Vec<burn_cubecl::tensor::CubeTensor<R>> {
    specs
        .iter()
        .map(|(shape, dtype)| {
            burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                burn_std::Shape::from(shape.to_vec()),
                *dtype,
            )
        })
        .collect()
}

/// A buffer and its strides (up to four): what a kernel needs of a CubeCL `Tensor` argument,
/// launched as an `Array` and four scalars.
///
/// A `Tensor` argument's shape and strides travel in the launch's dynamic metadata, which
/// CubeCL 0.10's CUDA runtime uploads through its memory pool at every launch: 13.7-14.8 µs of
/// host time per launch of an 8-buffer probe against 7.9-8.9 µs with `Array` arguments
/// (`jamba-bench launch`, H200, `jamba-bench/RESULTS.md`, session 17). Scalars travel as kernel
/// parameters. Index the buffer with `x.buf[i]`; `x.stride(d)` as a `Tensor`'s.
#[derive(CubeLaunch, CubeType)]
pub struct Strided<F: CubePrimitive> {
    /// The elements, from the tensor's first (its handle's offset).
    pub buf: Array<F>,
    s0: u32,
    s1: u32,
    s2: u32,
    s3: u32,
}

#[cube]
impl<F: CubePrimitive> Strided<F> {
    /// The stride of dimension `dim` (0 past the tensor's rank).
    pub fn stride(&self, #[comptime] dim: usize) -> usize {
        if comptime!(dim == 0) {
            self.s0 as usize
        } else if comptime!(dim == 1) {
            self.s1 as usize
        } else if comptime!(dim == 2) {
            self.s2 as usize
        } else {
            self.s3 as usize
        }
    }
}

/// `t` as a [`Strided`] launch argument.
///
/// # Panics
/// If `t` has more than four dimensions or a stride past `u32`.
pub fn strided<R: burn_cubecl::CubeRuntime, F: CubePrimitive>(
    t: burn_cubecl::tensor::CubeTensor<R>,
) -> StridedLaunch<F, R> {
    let strides = t.meta.strides();
    assert!(
        strides.len() <= 4,
        "a strided argument of rank {}",
        strides.len()
    );
    let s = |d: usize| u32::try_from(strides.get(d).copied().unwrap_or(0)).expect("a u32 stride");
    let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
    StridedLaunch::new(t.into_array_arg(), s0, s1, s2, s3)
}
