//! RMSNorm over the last dimension in one launch: `weight · cast(x / sqrt(mean(x²) + eps))`,
//! statistics in f32 whatever the dtype of `x`, the normalised value rounded to that dtype
//! before the weight multiplies it (as transformers' `JambaRMSNorm` does).
//!
//! In tensor ops this is eight launches (cast, square, mean, add, sqrt, reciprocal, multiply,
//! cast, multiply); a Jamba decoding step runs five norms per Mamba layer, so on a GPU, where a
//! decoding step is launch-bound, the norms were about half of all launches.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::prelude::*;

/// Largest number of units that share one row.
const MAX_UNITS: usize = 256;
/// Cubes along x before rows continue along y (wgpu allows 65,535 per dimension).
const MAX_CUBES_X: usize = 65_535;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_kernel<F: Float>(
    x: &crate::Strided<F>,
    update: &crate::Strided<F>,
    second: &crate::Strided<F>,
    weight: &crate::Strided<F>,
    sum_out: &mut crate::Strided<F>,
    out: &mut crate::Strided<F>,
    rows: u32,
    seq: u32,
    width: u32,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] add: bool,
    #[comptime] add_second: bool,
    #[define(F)] _dtype: StorageType,
) {
    // A cube per row: its units stride over the row, sum their squares, and reduce through
    // shared memory; then each writes its elements. The exit below is uniform over the cube.
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let (seq, width) = (seq as usize, width as usize);
    let unit = UNIT_POS_X as usize;
    let (b, t) = (row / seq, row % seq);
    let base = b * x.stride(0usize) + t * x.stride(1usize);
    let step = x.stride(2usize);
    let u_base = b * update.stride(0usize) + t * update.stride(1usize);
    let u2_base = b * second.stride(0usize) + t * second.stride(1usize);
    let s_base = b * sum_out.stride(0usize) + t * sum_out.stride(1usize);
    let mut acc = 0.0f32;
    let mut j = unit;
    while j < width {
        let mut v = f32::cast_from(x.buf[base + j * step]);
        if comptime!(add) {
            // The residual sum, rounded to the dtype as a separate addition would store it
            // (each of two additions rounded).
            let mut sum =
                F::cast_from(v + f32::cast_from(update.buf[u_base + j * update.stride(2usize)]));
            if comptime!(add_second) {
                sum = F::cast_from(
                    f32::cast_from(sum)
                        + f32::cast_from(second.buf[u2_base + j * second.stride(2usize)]),
                );
            }
            sum_out.buf[s_base + j * sum_out.stride(2usize)] = sum;
            v = f32::cast_from(sum);
        }
        acc += v * v;
        j += units;
    }
    let mut partial = SharedMemory::<f32>::new(units);
    partial[unit] = acc;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            partial[unit] = partial[unit] + partial[unit + half];
        }
        sync_cube();
        half = half / 2;
    }
    let scale = 1.0f32 / f32::sqrt(partial[0] / f32::cast_from(width) + eps);
    let out_base = b * out.stride(0usize) + t * out.stride(1usize);
    let mut j = unit;
    while j < width {
        let mut v = f32::cast_from(x.buf[base + j * step]);
        if comptime!(add) {
            v = f32::cast_from(F::cast_from(
                v + f32::cast_from(update.buf[u_base + j * update.stride(2usize)]),
            ));
            if comptime!(add_second) {
                v = f32::cast_from(F::cast_from(
                    v + f32::cast_from(second.buf[u2_base + j * second.stride(2usize)]),
                ));
            }
        }
        let normed = F::cast_from(v * scale);
        out.buf[out_base + j * out.stride(2usize)] = F::cast_from(
            f32::cast_from(normed) * f32::cast_from(weight.buf[j * weight.stride(0usize)]),
        );
        j += units;
    }
}

/// Units per row for a row of `width`: a power of two from 32 to [`MAX_UNITS`].
fn units_for(width: usize) -> usize {
    width.next_power_of_two().clamp(32, MAX_UNITS)
}

/// RMSNorm of `x` `[batch, seq, width]` (any float dtype, may be a strided view) with `weight`
/// `[width]` in the dtype of `x`; returns `[batch, seq, width]` in that dtype.
pub fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> CubeTensor<R> {
    let shape = x.meta.shape().clone();
    let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    rms_norm_into(x, weight, eps, out.clone());
    out
}

/// The residual sum `x + update` and its RMSNorm, in one launch (a pre-norm layer's residual
/// connection followed by the next norm): returns `(x + update, rms_norm(x + update))`, the sum
/// rounded to the dtype of `x` before it is normalised, as the two operations give.
/// `update` has the shape and dtype of `x`; either may be a strided view.
pub fn add_rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    update: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    assert_eq!(
        x.meta.shape(),
        update.meta.shape(),
        "add_rms_norm: x and update"
    );
    let (sum, out) = sum_and_out(&x);
    launch(
        x,
        Some((update, None, sum.clone())),
        weight,
        eps,
        out.clone(),
    );
    (sum, out)
}

/// [`add_rms_norm`] of two updates: returns `(s, rms_norm(s))` for `s = (x + first) + second`,
/// each sum rounded to the dtype of `x` as two additions give (a layer's input residual
/// connection left pending for a consumer that normalised it on the fly, then the mixer's
/// output). `first` and `second` have the shape and dtype of `x`; any may be a strided view.
pub fn add2_rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    first: CubeTensor<R>,
    second: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
) -> (CubeTensor<R>, CubeTensor<R>) {
    for (name, t) in [("first", &first), ("second", &second)] {
        assert_eq!(
            x.meta.shape(),
            t.meta.shape(),
            "add2_rms_norm: x and {name}"
        );
    }
    let (sum, out) = sum_and_out(&x);
    launch(
        x,
        Some((first, Some(second), sum.clone())),
        weight,
        eps,
        out.clone(),
    );
    (sum, out)
}

/// The residual sum's and the norm's outputs, the shape and dtype of `x`.
fn sum_and_out<R: CubeRuntime>(x: &CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let shape = x.meta.shape().to_vec();
    let [sum, out]: [CubeTensor<R>; 2] = crate::empty_many(
        &x.client,
        &x.device,
        &[(&shape, x.dtype), (&shape, x.dtype)],
    )
    .try_into()
    .expect("two tensors");
    (sum, out)
}

/// [`rms_norm`] writing into `out` (`[batch, seq, width]` in the dtype of `x`, any strides, not
/// aliasing `x`).
pub fn rms_norm_into<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f64,
    out: CubeTensor<R>,
) {
    launch(x, None, weight, eps, out);
}

/// The norm of `x`, or with `add` `(update, second, sum)`, of `x + update (+ second)`, also
/// written to `sum`.
fn launch<R: CubeRuntime>(
    x: CubeTensor<R>,
    add: Option<(CubeTensor<R>, Option<CubeTensor<R>>, CubeTensor<R>)>,
    weight: CubeTensor<R>,
    eps: f64,
    out: CubeTensor<R>,
) {
    let shape = x.meta.shape().clone();
    let (batch, seq, width) = (shape[0], shape[1], shape[2]);
    let rows = batch * seq;
    if rows == 0 || width == 0 {
        return;
    }
    let units = units_for(width);
    let count = CubeCount::Static(
        rows.min(MAX_CUBES_X) as u32,
        rows.div_ceil(MAX_CUBES_X) as u32,
        1,
    );
    let client = x.client.clone();
    let dtype = x.dtype;
    let adds = add.is_some();
    // Without `add`, the kernel reads no `update` and writes no `sum`: `x` and `out` stand in
    // (and for an absent second update, `x`).
    let (update, second, sum) = add.unwrap_or_else(|| (x.clone(), None, out.clone()));
    let adds_second = second.is_some();
    let second = second.unwrap_or_else(|| x.clone());
    // SAFETY: a cube whose row is past the end returns before touching memory; every other
    // index is an element of its row in a tensor of that shape (`update`, `second` and `sum`
    // have the shape of `x`), and `units` matches the cube dimension and the shared buffer.
    unsafe {
        rms_norm_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_1d(units as u32),
            crate::strided(x),
            crate::strided(update),
            crate::strided(second),
            crate::strided(weight),
            crate::strided(sum),
            crate::strided(out),
            rows as u32,
            seq as u32,
            width as u32,
            eps as f32,
            units,
            adds,
            adds_second,
            dtype.into(),
        )
    };
}
