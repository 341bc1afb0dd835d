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
//!   `out_proj` (conv, `x_proj`, the Δ/B/C norms, `dt_proj`, the state update, the gate) in two
//!   launches instead of about fifteen.
//! - [`moe::routed_experts`]: a mixture-of-experts feed-forward for a few tokens with the
//!   router's softmax and top-k on the device (no routing read back to the host);
//!   [`moe::swiglu`]: a dense SwiGLU MLP of a few rows on the same kernels, four launches;
//!   [`moe::routed_experts_normed`]: the residual sums, norm and router before the experts
//!   taken into the routing launch.
//! - [`argmax::argmax_rows`]: each row's largest value's index (greedy decoding) in two
//!   launches.
//!
//! The functions take and return Burn's [`CubeTensor`](burn_cubecl::tensor::CubeTensor)s; the
//! `jamba` crate's `JambaBackend` trait calls them for `CubeBackend` and keeps its tensor-op
//! path for every other backend. Inputs may be f32, f16 or bf16 (where the runtime has them);
//! arithmetic is f32.

pub mod argmax;
pub mod attention;
pub mod conv;
pub mod gemv;
pub mod mamba_step;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod scan;
pub mod scan_bwd;
pub mod scan_chunked;

/// A numeric tuning knob from the environment (`JAMBA_SCAN_CHUNKS` and the like), parsed once
/// per process into `cell`: the scan reads its knobs on every launch, a decoding step launches
/// it once per Mamba layer.
pub(crate) fn env_usize(
    cell: &'static std::sync::OnceLock<Option<usize>>,
    name: &str,
) -> Option<usize> {
    *cell.get_or_init(|| std::env::var(name).ok().and_then(|v| v.parse().ok()))
}

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
