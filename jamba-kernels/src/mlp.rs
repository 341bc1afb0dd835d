//! A dense SwiGLU MLP of a few rows (a decoding step's MLP layers), `down(silu(x · gate) ·
//! (x · up))`, on the expert kernels of [`crate::moe`] with one unweighted slot per row and no
//! router; and the same with the residual sums and the RMSNorm before it folded into its first
//! launch.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use burn_std::DType;

use crate::moe::{MAX_SLOTS, ResidualNorm, expert_mlp, expert_mlp_vec, takes_vector_form};

/// A dense SwiGLU MLP of a few rows, `down(silu(x · gate) · (x · up))` for `x` `[rows, hidden]`
/// and bias-free weights in Burn's `[in, out]` layout (`gate`, `up` `[hidden, inner]`, `down`
/// `[inner, hidden]`): the routed kernels with one slot per row and no router, four launches
/// (two in the vector form, for up to four rows) where the separate operations take thirteen
/// (three products of two launches each, Burn's SiLU as six element-wise launches, and the
/// product of the gate and up). Rounding as
/// [`crate::moe::routed_experts`]: each product rounded, SiLU of the rounded gate rounded, their product
/// rounded. Every tensor shares one float dtype, which the result has. Any strides.
///
/// # Panics
/// If `rows` exceeds [`MAX_SLOTS`] or the shapes disagree (the caller checks).
pub fn swiglu<R: CubeRuntime>(
    x: CubeTensor<R>,
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    down: CubeTensor<R>,
) -> CubeTensor<R> {
    let [rows, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    let inner = gate.meta.shape()[1];
    assert!(
        rows <= MAX_SLOTS,
        "swiglu: {rows} rows (at most {MAX_SLOTS})"
    );
    for (name, t, shape) in [
        ("gate", &gate, [hidden, inner]),
        ("up", &up, [hidden, inner]),
        ("down", &down, [inner, hidden]),
    ] {
        assert_eq!(t.meta.shape().as_slice(), shape, "swiglu: {name}");
    }
    let (client, device, dtype) = (x.client.clone(), x.device.clone(), x.dtype);
    let empty = |shape: Vec<usize>, dtype: DType| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape.into(), dtype)
    };
    if rows == 0 || hidden == 0 {
        return empty(vec![rows, hidden], dtype);
    }
    if inner == 0 {
        return burn_cubecl::ops::numeric::zeros_client(
            client,
            device,
            [rows, hidden].into(),
            dtype,
        );
    }
    let y = empty(vec![rows, hidden], dtype);
    // The dense kernels read no `indices`: any buffer stands in.
    let stand_in = x.clone();
    expert_mlp::<R>(x, [gate, up, down], stand_in, None, y.clone(), 1);
    y
}

/// Whether [`swiglu_normed`] takes these operands: [`takes_vector_form`]'s dense MLP of at
/// most four rows, whose normalised rows fit the gate/up launch's shared memory (`hidden` up
/// to 6,144 for one row, 1,024 for four: Jamba-v0.1's 4,096 takes one row).
pub fn takes_normed_mlp<R: CubeRuntime>(
    x: &CubeTensor<R>,
    weights: [&CubeTensor<R>; 3],
    y: &CubeTensor<R>,
) -> bool {
    let [rows, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    takes_vector_form(x, weights, y, true)
        && rows * crate::gemv::vec_stage(hidden) <= crate::gemv::VEC_STAGE_FLOATS
}

/// A dense SwiGLU MLP with the residual connection(s) and the RMSNorm before it
/// ([`ResidualNorm`]) folded into its gate/up launch: two launches where the norm and
/// [`swiglu`] take three. Every cube of the gate/up launch recomputes the rows' statistics
/// (a pass over `3 · hidden` values per row, against its `2 · hidden · columns` weights); cube
/// 0 writes the residual. Rounding as the separate operations: each sum, the normalised value
/// and its product with the norm's weight (as `add2_rms_norm`), then as [`swiglu`]. Returns
/// `(residual, mlp output)`, each `[rows, hidden]`, or `None`, having launched nothing, where
/// [`takes_normed_mlp`] refuses the operands (the caller runs the norm and [`swiglu`]).
///
/// # Panics
/// If the shapes disagree (the caller checks).
pub fn swiglu_normed<R: CubeRuntime>(
    input: ResidualNorm<R>,
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    down: CubeTensor<R>,
) -> Option<(CubeTensor<R>, CubeTensor<R>)> {
    let [rows, hidden] = input.check_shapes("swiglu_normed");
    let inner = gate.meta.shape()[1];
    for (name, t, shape) in [
        ("gate", &gate, [hidden, inner]),
        ("up", &up, [hidden, inner]),
        ("down", &down, [inner, hidden]),
    ] {
        assert_eq!(t.meta.shape().as_slice(), shape, "swiglu_normed: {name}");
    }
    let (client, device, dtype) = (
        input.x.client.clone(),
        input.x.device.clone(),
        input.x.dtype,
    );
    let [y, residual]: [CubeTensor<R>; 2] = crate::empty_many(
        &client,
        &device,
        &[(&[rows, hidden], dtype), (&[rows, hidden], dtype)],
    )
    .try_into()
    .expect("two tensors");
    if !takes_normed_mlp(&input.x, [&gate, &up, &down], &y) {
        return None;
    }
    let x = input.x.clone();
    // The dense kernels read no `indices`: any buffer stands in.
    let stand_in = x.clone();
    expert_mlp_vec::<R>(
        x,
        [gate, up, down],
        stand_in,
        None,
        y.clone(),
        1,
        Some((input, residual.clone())),
    );
    Some((residual, y))
}

