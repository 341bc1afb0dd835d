//! The SwiGLU gate of a prefill's MLPs in one launch: `silu(gate) · up`.
//!
//! Burn computes `silu` of a half-precision tensor in f32 as six element-wise launches between
//! two casts, then multiplies by `up` in a ninth: on the H200 a 2048-token prefill of
//! bench-jamba-1b spent ~2 ms of device time and ~70 launches there (the dense MLPs and the
//! experts' batched blocks). Here one launch reads both inputs 16 bytes at a time and writes
//! the product, rounding as the reference does: SiLU of the (already rounded) gate computed in
//! f32 and rounded to the dtype, then its product with `up` rounded.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::prelude::*;

/// Units per cube.
const UNITS: usize = 256;
/// Cubes along x (wgpu allows 65,535 per dimension); more go along y.
const MAX_CUBES_X: usize = 65_535;

#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float, N: Size>(
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: u32,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i < len as usize {
        let (g, u) = (gate[i], up[i]);
        let mut o = Vector::<F, N>::empty();
        #[unroll]
        for l in 0..width {
            let x = f32::cast_from(g[l]);
            let silu = f32::cast_from(F::cast_from(x / (1.0f32 + f32::exp(-x))));
            o[l] = F::cast_from(silu * f32::cast_from(u[l]));
        }
        out[i] = o;
    }
}

/// `silu(gate) · up` for two tensors of one shape and float dtype, contiguous and 16-byte
/// aligned, whose element count is a whole number of 16-byte vectors; `None`, having launched
/// nothing, otherwise (the caller composes it). Returns a contiguous tensor of that shape.
pub fn silu_mul<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> Option<CubeTensor<R>> {
    let width = crate::gemv::vec_width(gate.dtype)?;
    let len: usize = gate.meta.shape().iter().product();
    if gate.meta.shape() != up.meta.shape()
        || gate.dtype != up.dtype
        || len == 0
        || !len.is_multiple_of(width)
        || len / width >= u32::MAX as usize
        || ![&gate, &up]
            .iter()
            .all(|t| t.is_contiguous() && crate::gemv::aligned(t))
    {
        return None;
    }
    let client = gate.client.clone();
    let dtype = gate.dtype;
    let out = empty_device_contiguous_dtype(
        client.clone(),
        gate.device.clone(),
        gate.meta.shape().clone(),
        dtype,
    );
    let vectors = len / width;
    let cubes = vectors.div_ceil(UNITS);
    let count = CubeCount::Static(
        cubes.min(MAX_CUBES_X) as u32,
        cubes.div_ceil(MAX_CUBES_X) as u32,
        1,
    );
    // SAFETY: unit `i` below `len / width` (the guard) reads vector `i` of `gate` and `up` and
    // writes vector `i` of `out`: all three contiguous, aligned, `len` elements.
    unsafe {
        silu_mul_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_1d(UNITS as u32),
            width,
            gate.into_array_arg(),
            up.into_array_arg(),
            out.clone().into_array_arg(),
            vectors as u32,
            width,
            dtype.into(),
        );
    }
    Some(out)
}
