//! The backward of the selective scan, with recomputation instead of stored states.
//!
//! A forward launch records the state only at tile boundaries (every `tile` steps, `L / tile`
//! states per channel instead of `L`); the backward kernel then walks the tiles from the last
//! to the first, recomputes the tile's states from its checkpoint into shared memory, and runs
//! the adjoint recurrence backwards through it. With `r` the gradient reaching `hₜ` from later
//! steps:
//!
//! ```text
//! ∂hₜ   = r + ∂yyₜ·Cₜ                     (yy: the output before the gate)
//! ∂Cₜ  += ∂yyₜ·hₜ          ∂Bₜ += ∂hₜ·Δₜ·uₜ          (summed over channels)
//! ∂Δₜ  += ∂hₜ·(A·e^{ΔₜA}·hₜ₋₁ + Bₜ·uₜ)    ∂uₜ += ∂hₜ·Δₜ·Bₜ   (summed over states)
//! ∂A   += ∂hₜ·Δₜ·e^{ΔₜA}·hₜ₋₁             r ← ∂hₜ·e^{ΔₜA}
//! ```
//!
//! Sums over channels that cross cubes (∂B, ∂C) and over batch rows (∂A, ∂D, ∂bias) come back
//! as per-cube or per-row partials for the caller to add up (one small reduction each).

use burn_cubecl::{
    CubeRuntime,
    kernel::into_contiguous,
    ops::numeric::{empty_device_contiguous_dtype, zeros_client},
    tensor::CubeTensor,
};
use cubecl::ir::FastMath;
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;

use crate::scan::{ScanTensors, launch_fwd, padded_stride, softplus_f32, stage_bc, supports_state};

/// Tile length of the backward: its shared memory holds four `[tile, channels, state]` blocks.
pub fn backward_tile(state: usize) -> (usize, usize) {
    let channels_per_cube = (128 / state).max(1);
    let units = channels_per_cube * state;
    let stride = padded_stride(state);
    let per_step = 4 * channels_per_cube * stride + 4 * channels_per_cube + 2 * state;
    let tile = (4096usize.saturating_sub(2 * units) / per_step).clamp(1, 32);
    (channels_per_cube, tile)
}

#[cube(launch, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
fn scan_bwd_kernel<F: Float>(
    u: &CubeArg<F>,
    delta: &CubeArg<F>,
    z: &CubeArg<F>,
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    a: &CubeArg<f32>,
    dskip: &CubeArg<f32>,
    bias: &CubeArg<f32>,
    checkpoints: &CubeArg<f32>,
    grad_y: &CubeArg<F>,
    grad_state: &CubeArg<f32>,
    du: &mut CubeArg<f32>,
    ddelta: &mut CubeArg<f32>,
    dz: &mut CubeArg<f32>,
    db_part: &mut CubeArg<f32>,
    dc_part: &mut CubeArg<f32>,
    da_part: &mut CubeArg<f32>,
    dd_part: &mut CubeArg<f32>,
    dbias_part: &mut CubeArg<f32>,
    dh0: &mut CubeArg<f32>,
    seq: u32,
    channels: u32,
    #[comptime] n_state: usize,
    #[comptime] cb: usize,
    #[comptime] tile: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let stride = comptime!(if n_state % 2 == 0 {
        n_state + 1
    } else {
        n_state
    });
    let units = comptime!(cb * n_state);
    let seq = seq as usize;
    let channels = channels as usize;
    let row = CUBE_POS_Y as usize;
    let cube_x = CUBE_POS_X as usize;
    let d0 = cube_x * cb;
    let tid = UNIT_POS_X as usize;
    let c = tid / n_state;
    let n = tid % n_state;
    let d = d0 + c;
    let active = d < channels;

    let mut s_delta = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_u = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_sig = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_dyy = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_b = SharedMemory::<f32>::new(comptime!(tile * n_state));
    let mut s_c = SharedMemory::<f32>::new(comptime!(tile * n_state));
    // States of the tile, then (once read) the ∂C contributions.
    let mut s_h = SharedMemory::<f32>::new(comptime!(tile * cb * stride));
    let mut s_db = SharedMemory::<f32>::new(comptime!(tile * cb * stride));
    let mut s_ddelta = SharedMemory::<f32>::new(comptime!(tile * cb * stride));
    let mut s_du = SharedMemory::<f32>::new(comptime!(tile * cb * stride));
    let mut s_red = SharedMemory::<f32>::new(comptime!(2 * units));

    let mut a_dn = 0.0f32;
    let mut r = 0.0f32;
    if active {
        a_dn = a[d * a.stride(0) + n * a.stride(1)];
        r = grad_state
            [row * grad_state.stride(0) + d * grad_state.stride(1) + n * grad_state.stride(2)];
    }
    let mut da_acc = 0.0f32;
    let mut dd_acc = 0.0f32;
    let mut dbias_acc = 0.0f32;

    let tiles = seq.div_ceil(tile);
    let mut k = tiles;
    while k > 0 {
        k -= 1;
        let t0 = k * tile;
        let steps = min(tile, seq - t0);

        let mut i = tid;
        while i < comptime!(tile * cb) {
            let t = i / cb;
            let dd = d0 + i % cb;
            let mut dv = 0.0f32;
            let mut uv = 0.0f32;
            let mut sg = 0.0f32;
            if t < steps && dd < channels {
                let tt = t0 + t;
                let mut x = f32::cast_from(
                    delta[row * delta.stride(0) + tt * delta.stride(1) + dd * delta.stride(2)],
                ) + bias[dd];
                sg = 1.0;
                if comptime!(softplus) {
                    if x <= 20.0 {
                        sg = 1.0 / (1.0 + (-x).exp());
                    }
                    x = softplus_f32(x);
                }
                dv = x;
                uv = f32::cast_from(u[row * u.stride(0) + tt * u.stride(1) + dd * u.stride(2)]);
            }
            s_delta[i] = dv;
            s_u[i] = uv;
            s_sig[i] = sg;
            i += units;
        }
        stage_bc::<F>(
            bmat, cmat, &mut s_b, &mut s_c, row, t0, steps, tile, n_state, units,
        );
        sync_cube();

        // Recompute the tile's states from its checkpoint.
        let mut h_start = 0.0f32;
        if active {
            h_start = checkpoints[row * checkpoints.stride(0)
                + k * checkpoints.stride(1)
                + d * checkpoints.stride(2)
                + n * checkpoints.stride(3)];
        }
        let mut h = h_start;
        for t in 0..steps {
            let kk = t * cb + c;
            let dv = s_delta[kk];
            h = (dv * a_dn).exp() * h + dv * s_u[kk] * s_b[t * n_state + n];
            s_h[kk * stride + n] = h;
        }
        sync_cube();

        // Per (step, channel): the output before the gate, its gradient, ∂z, and ∂D's share.
        let mut i = tid;
        while i < steps * cb {
            let t = i / cb;
            let dd = d0 + i % cb;
            let mut dyy = 0.0f32;
            if dd < channels {
                let tt = t0 + t;
                let mut yy = 0.0f32;
                for m in 0..n_state {
                    yy += s_h[i * stride + m] * s_c[t * n_state + m];
                }
                let uv = s_u[i];
                yy += dskip[dd] * uv;
                let g = f32::cast_from(
                    grad_y[row * grad_y.stride(0) + tt * grad_y.stride(1) + dd * grad_y.stride(2)],
                );
                dyy = g;
                if comptime!(has_z) {
                    let zv =
                        f32::cast_from(z[row * z.stride(0) + tt * z.stride(1) + dd * z.stride(2)]);
                    let sg = 1.0 / (1.0 + (-zv).exp());
                    dyy = g * zv * sg;
                    dz[row * dz.stride(0) + tt * dz.stride(1) + dd * dz.stride(2)] =
                        g * yy * sg * (1.0 + zv * (1.0 - sg));
                }
                dd_acc += dyy * uv;
            }
            s_dyy[i] = dyy;
            i += units;
        }
        sync_cube();

        // The adjoint recurrence, backwards through the tile.
        let mut t = steps;
        while t > 0 {
            t -= 1;
            let kk = t * cb + c;
            let dyy = s_dyy[kk];
            let dv = s_delta[kk];
            let uv = s_u[kk];
            let bn = s_b[t * n_state + n];
            let h_t = s_h[kk * stride + n];
            let mut h_prev = h_start;
            if t > 0 {
                h_prev = s_h[(kk - cb) * stride + n];
            }
            let dh = r + dyy * s_c[t * n_state + n];
            let decay = (dv * a_dn).exp();
            s_h[kk * stride + n] = dyy * h_t;
            s_db[kk * stride + n] = dh * dv * uv;
            s_ddelta[kk * stride + n] = dh * (a_dn * decay * h_prev + bn * uv);
            s_du[kk * stride + n] = dh * dv * bn;
            da_acc += dh * dv * decay * h_prev;
            r = dh * decay;
        }
        sync_cube();

        // Per (step, channel): sums over the states.
        let mut i = tid;
        while i < steps * cb {
            let t = i / cb;
            let dd = d0 + i % cb;
            if dd < channels {
                let tt = t0 + t;
                let mut sdelta = 0.0f32;
                let mut su = 0.0f32;
                for m in 0..n_state {
                    sdelta += s_ddelta[i * stride + m];
                    su += s_du[i * stride + m];
                }
                let dx = sdelta * s_sig[i];
                du[row * du.stride(0) + tt * du.stride(1) + dd * du.stride(2)] =
                    s_dyy[i] * dskip[dd] + su;
                ddelta[row * ddelta.stride(0) + tt * ddelta.stride(1) + dd * ddelta.stride(2)] = dx;
                dbias_acc += dx;
            }
            i += units;
        }
        // Per (step, state): sums over this cube's channels.
        let mut i = tid;
        while i < steps * n_state {
            let t = i / n_state;
            let nn = i % n_state;
            let mut sb = 0.0f32;
            let mut sc = 0.0f32;
            for cc in 0..cb {
                if d0 + cc < channels {
                    let idx = (t * cb + cc) * stride + nn;
                    sb += s_db[idx];
                    sc += s_h[idx];
                }
            }
            let tt = t0 + t;
            let at = row * db_part.stride(0)
                + cube_x * db_part.stride(1)
                + tt * db_part.stride(2)
                + nn * db_part.stride(3);
            db_part[at] = sb;
            dc_part[at] = sc;
            i += units;
        }
        sync_cube();
    }

    if active {
        da_part[row * da_part.stride(0) + d * da_part.stride(1) + n * da_part.stride(2)] = da_acc;
        dh0[row * dh0.stride(0) + d * dh0.stride(1) + n * dh0.stride(2)] = r;
    }
    // ∂D and ∂bias: the units with the same `tid % cb` hold partial sums of one channel.
    s_red[tid] = dd_acc;
    s_red[units + tid] = dbias_acc;
    sync_cube();
    if tid < cb {
        let dd = d0 + tid;
        if dd < channels {
            let mut sd = 0.0f32;
            let mut sbias = 0.0f32;
            let mut j = tid;
            while j < units {
                sd += s_red[j];
                sbias += s_red[units + j];
                j += cb;
            }
            dd_part[row * dd_part.stride(0) + dd * dd_part.stride(1)] = sd;
            dbias_part[row * dbias_part.stride(0) + dd * dbias_part.stride(1)] = sbias;
        }
    }
}

/// Gradients from [`selective_scan_bwd`], all f32. The `_part` tensors are partial sums for the
/// caller to finish: `da_part`, `dd_part`, `dbias_part` over the batch (dim 0); `db_part` and
/// `dc_part` (`[batch, cubes, seq, state]`) over the cubes (dim 1).
pub struct ScanGradTensors<R: CubeRuntime> {
    /// `[batch, seq, channels]`.
    pub du: CubeTensor<R>,
    /// Gradient of `δ` before bias and softplus, `[batch, seq, channels]`.
    pub d_delta: CubeTensor<R>,
    /// `[batch, seq, channels]` when the scan had a gate.
    pub dz: Option<CubeTensor<R>>,
    /// `[batch, channels, state]`.
    pub da_part: CubeTensor<R>,
    /// `[batch, cubes, seq, state]`.
    pub db_part: CubeTensor<R>,
    /// `[batch, cubes, seq, state]`.
    pub dc_part: CubeTensor<R>,
    /// `[batch, channels]`.
    pub dd_part: CubeTensor<R>,
    /// `[batch, channels]`.
    pub dbias_part: CubeTensor<R>,
    /// Gradient of the initial state, `[batch, channels, state]`.
    pub d_state: CubeTensor<R>,
}

/// The selective scan's backward: given the forward's inputs, the gradient of `y` (dtype of
/// `u`) and optionally of the final state (f32), returns every input's gradient. Two launches:
/// a forward that records tile checkpoints, then the backward kernel.
pub fn selective_scan_bwd<R: CubeRuntime>(
    input: ScanTensors<R>,
    grad_y: CubeTensor<R>,
    grad_state: Option<CubeTensor<R>>,
) -> ScanGradTensors<R> {
    let shape = input.u.meta.shape().clone();
    let (batch, seq, channels) = (shape[0], shape[1], shape[2]);
    let state = input.a.meta.shape()[1];
    assert!(supports_state(state), "d_state {state} unsupported");
    let client = input.u.client.clone();
    let device = input.u.device.clone();
    let f32_dtype = input.state.dtype;
    let (cb, tile) = backward_tile(state);
    let cubes = channels.div_ceil(cb).max(1);
    let tiles = seq.div_ceil(tile).max(1);
    let empty = |dims: Vec<usize>| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), dims.into(), f32_dtype)
    };

    let checkpoints = empty(vec![batch, tiles, channels, state]);
    let y_scratch =
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape.clone(), input.u.dtype);
    let state_scratch = empty(vec![batch, channels, state]);
    launch_fwd(
        input.clone(),
        y_scratch,
        state_scratch,
        Some(checkpoints.clone()),
        tile,
        None,
    );

    let grad_state = grad_state.unwrap_or_else(|| {
        zeros_client(
            client.clone(),
            device.clone(),
            [batch, channels, state].into(),
            f32_dtype,
        )
    });
    let du = empty(vec![batch, seq, channels]);
    let d_delta = empty(vec![batch, seq, channels]);
    let has_z = input.z.is_some();
    let dz = if has_z {
        empty(vec![batch, seq, channels])
    } else {
        du.clone()
    };
    let db_part = empty(vec![batch, cubes, seq, state]);
    let dc_part = empty(vec![batch, cubes, seq, state]);
    let da_part = empty(vec![batch, channels, state]);
    let dd_part = empty(vec![batch, channels]);
    let dbias_part = empty(vec![batch, channels]);
    let d_state = empty(vec![batch, channels, state]);
    let z = input.z.clone().unwrap_or_else(|| input.u.clone());
    if batch > 0 && channels > 0 {
        scan_bwd_kernel::launch::<R>(
            &client,
            CubeCount::Static(cubes as u32, batch as u32, 1),
            CubeDim::new_1d((cb * state) as u32),
            input.u.clone().into_tensor_arg(),
            input.delta.clone().into_tensor_arg(),
            z.into_tensor_arg(),
            input.b.clone().into_tensor_arg(),
            input.c.clone().into_tensor_arg(),
            into_contiguous(input.a.clone()).into_tensor_arg(),
            into_contiguous(input.d.clone()).into_tensor_arg(),
            into_contiguous(input.delta_bias.clone()).into_tensor_arg(),
            checkpoints.into_tensor_arg(),
            grad_y.into_tensor_arg(),
            grad_state.into_tensor_arg(),
            du.clone().into_tensor_arg(),
            d_delta.clone().into_tensor_arg(),
            dz.clone().into_tensor_arg(),
            db_part.clone().into_tensor_arg(),
            dc_part.clone().into_tensor_arg(),
            da_part.clone().into_tensor_arg(),
            dd_part.clone().into_tensor_arg(),
            dbias_part.clone().into_tensor_arg(),
            d_state.clone().into_tensor_arg(),
            seq as u32,
            channels as u32,
            state,
            cb,
            tile,
            has_z,
            input.delta_softplus,
            input.u.dtype.into(),
        );
    }
    ScanGradTensors {
        du,
        d_delta,
        dz: has_z.then_some(dz),
        da_part,
        db_part,
        dc_part,
        dd_part,
        dbias_part,
        d_state,
    }
}
