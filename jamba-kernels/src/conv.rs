//! Depthwise causal conv1d with bias and optional SiLU, continuing from a conv state.
//!
//! The sequence is read as `[prefix, x]` where `prefix` holds the `d_conv − 1` inputs before
//! `x` (the cache's conv state, zeros for a fresh sequence). One launch: a unit per output
//! element, and each (row, channel)'s last-step unit also writes the new prefix (the last
//! `d_conv − 1` rows of `[prefix, x]`). With a sequence of length 1 this is the decoding update.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, ir::FastMath};

use crate::scan::silu_f32;

/// Element `p` of `[prefix, x]` along time for one batch row and channel.
#[cube]
fn padded_at<F: Float>(
    x: &CubeArg<F>,
    prefix: &CubeArg<F>,
    row: usize,
    p: usize,
    d: usize,
    #[comptime] k: usize,
) -> f32 {
    let lead = comptime!(k - 1);
    if p < lead {
        f32::cast_from(prefix[row * prefix.stride(0) + p * prefix.stride(1) + d * prefix.stride(2)])
    } else {
        let t = p - lead;
        f32::cast_from(x[row * x.stride(0) + t * x.stride(1) + d * x.stride(2)])
    }
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn conv_kernel<F: Float, W: Float>(
    x: &CubeArg<F>,
    prefix: &CubeArg<F>,
    weight: &CubeArg<W>,
    bias: &CubeArg<W>,
    out: &mut CubeArg<F>,
    state: &mut CubeArg<F>,
    batch: u32,
    seq: u32,
    channels: u32,
    #[comptime] k: usize,
    #[comptime] apply_silu: bool,
    #[define(F, W)] _dtypes: [StorageType; 2],
) {
    let seq = seq as usize;
    let channels = channels as usize;
    let pos = ABSOLUTE_POS;
    if pos >= batch as usize * seq * channels {
        terminate!();
    }
    let d = pos % channels;
    let t = (pos / channels) % seq;
    let row = pos / (channels * seq);
    // The parameters in their own dtype and layout: no cast or copy launches before this one.
    let mut acc = f32::cast_from(bias[d * bias.stride(0)]);
    #[unroll]
    for j in 0..k {
        acc += f32::cast_from(weight[d * weight.stride(0) + j * weight.stride(1)])
            * padded_at::<F>(x, prefix, row, t + j, d, k);
    }
    if comptime!(apply_silu) {
        acc = silu_f32(acc);
    }
    out[row * out.stride(0) + t * out.stride(1) + d * out.stride(2)] = F::cast_from(acc);
    // The last step's unit of each (row, channel) also writes the new prefix: the last
    // `k − 1` inputs of `[prefix, x]` (from the old prefix too when `seq < k − 1`).
    if t == seq - 1 {
        #[unroll]
        for j in 0..comptime!(k - 1) {
            state[row * state.stride(0) + j * state.stride(1) + d * state.stride(2)] =
                F::cast_from(padded_at::<F>(x, prefix, row, seq + j, d, k));
        }
    }
}

/// The new prefix alone, for an empty sequence (the conv kernel writes it otherwise).
#[cube(launch_unchecked)]
fn conv_state_kernel<F: Float>(
    x: &CubeArg<F>,
    prefix: &CubeArg<F>,
    state: &mut CubeArg<F>,
    batch: u32,
    seq: u32,
    channels: u32,
    #[comptime] k: usize,
    #[define(F)] _dtype: StorageType,
) {
    let seq = seq as usize;
    let channels = channels as usize;
    let lead = comptime!(k - 1);
    let pos = ABSOLUTE_POS;
    if pos >= batch as usize * lead * channels {
        terminate!();
    }
    let d = pos % channels;
    let j = (pos / channels) % lead;
    let row = pos / (channels * lead);
    state[row * state.stride(0) + j * state.stride(1) + d * state.stride(2)] =
        F::cast_from(padded_at::<F>(x, prefix, row, seq + j, d, k));
}

/// Inputs of [`causal_conv1d`].
pub struct ConvTensors<R: CubeRuntime> {
    /// `[batch, seq, channels]`, any float dtype, may be a strided view.
    pub x: CubeTensor<R>,
    /// The `d_conv − 1` inputs before `x`, `[batch, d_conv − 1, channels]`, the dtype of `x`.
    pub prefix: CubeTensor<R>,
    /// `[channels, d_conv]`, any float dtype and strides (read as they are, in f32 arithmetic).
    pub weight: CubeTensor<R>,
    /// `[channels]`, the dtype of `weight`, any stride (zeros for none).
    pub bias: CubeTensor<R>,
    /// Apply SiLU to the output.
    pub silu: bool,
}

/// The convolution over `x` and the new prefix: `([batch, seq, channels], [batch, d_conv − 1,
/// channels])`, both in the dtype of `x`. `d_conv` must be at least 2.
pub fn causal_conv1d<R: CubeRuntime>(input: ConvTensors<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let x = &input.x;
    let shape = x.meta.shape().clone();
    let (batch, channels) = (shape[0], shape[2]);
    let k = input.weight.meta.shape()[1];
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    let state = empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        [batch, k.max(2) - 1, channels].into(),
        x.dtype,
    );
    causal_conv1d_into(input, out.clone(), state.clone());
    (out, state)
}

/// [`causal_conv1d`] writing into given buffers (not aliasing the inputs).
pub fn causal_conv1d_into<R: CubeRuntime>(
    input: ConvTensors<R>,
    out: CubeTensor<R>,
    state: CubeTensor<R>,
) {
    let x = input.x;
    let shape = x.meta.shape().clone();
    let (batch, seq, channels) = (shape[0], shape[1], shape[2]);
    let k = input.weight.meta.shape()[1];
    assert!(k >= 2, "causal_conv1d needs d_conv ≥ 2");
    assert_eq!(
        input.bias.dtype, input.weight.dtype,
        "causal_conv1d: the bias and the weight share a dtype"
    );
    let client = x.client.clone();
    let dtypes = [x.dtype.into(), input.weight.dtype.into()];
    let cube_dim = CubeDim::new_1d(256);
    let total = batch * seq * channels;
    if total == 0 {
        // No step to read: the new prefix is the old one.
        let total_state = batch * (k - 1) * channels;
        if total_state > 0 {
            // SAFETY: units past the state's element count return at once.
            unsafe {
                conv_state_kernel::launch_unchecked::<R>(
                    &client,
                    calculate_cube_count_elemwise(&client, total_state, cube_dim),
                    cube_dim,
                    x.into_tensor_arg(),
                    input.prefix.into_tensor_arg(),
                    state.into_tensor_arg(),
                    batch as u32,
                    seq as u32,
                    channels as u32,
                    k,
                    dtypes[0],
                )
            };
        }
        return;
    }
    // SAFETY: units past the element count return at once; every other index is a (row, step,
    // channel) inside the tensor it addresses, and the state's (row, j < k − 1, channel).
    unsafe {
        conv_kernel::launch_unchecked::<R>(
            &client,
            calculate_cube_count_elemwise(&client, total, cube_dim),
            cube_dim,
            x.into_tensor_arg(),
            input.prefix.into_tensor_arg(),
            input.weight.into_tensor_arg(),
            input.bias.into_tensor_arg(),
            out.into_tensor_arg(),
            state.into_tensor_arg(),
            batch as u32,
            seq as u32,
            channels as u32,
            k,
            input.silu,
            dtypes,
        )
    };
}
