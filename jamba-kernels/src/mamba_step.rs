//! One decoding step of the Mamba mixer between `in_proj` and `out_proj`, in one launch or two.
//!
//! A decoding step is bound by launches on a GPU (each costs the host ~8 µs to issue through
//! CubeCL, more than most of these kernels take to run). Unfused, the middle of a Mamba layer
//! is the conv and its state (2 launches), `x_proj` (2), the three norms of Δ, B and C (3),
//! `dt_proj` (2), `A = −exp(A_log)` (2) and the state update (1), plus, in half precision, a
//! cast to f32 of each small parameter (4).
//!
//! For a few rows whose `x_proj` width splits into 16-byte vectors it is one launch,
//! [`mamba_step_one_kernel`]: every cube computes the conv of all channels and all of `x_proj`
//! (each cube reads the whole `x_proj` weight, from L2 after the first), then the norms, and
//! for its own channels `dt_proj`, softplus, the state update, the C contraction, the D skip
//! and the SiLU(z) gate. Otherwise two:
//!
//! 1. [`mamba_step_front_kernel`], a cube per 128 channels and batch row: the conv window
//!    (state then the new input) with bias and SiLU, the new conv state, and that block's
//!    partial sums of `x_proj` (f32, one row of `[batch, blocks, R + 2N]`);
//! 2. [`mamba_step_scan_kernel`], a cube per 32 channels and batch row: every cube sums the
//!    blocks' partials (R + 2N values, a few KB read from L2) and normalises Δ, B and C itself,
//!    so no third launch is needed; then per channel `dt_proj`, softplus(· + bias), the state
//!    update with `A = −exp(A_log)`, the C contraction, the D skip and the SiLU(z) gate.
//!
//! Values are rounded to the model's dtype where the unfused path stores them (the conv output
//! `u`, `x_proj`'s output, the normalised and the weighted norm outputs, `dt_proj`'s output,
//! `y`), so half-precision models get the unfused path's numbers up to summation order.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use burn_std::DType;
use cubecl::ir::FastMath;
use cubecl::prelude::*;

use crate::scan::{silu_f32, softplus_f32};

/// Channels per cube of the first kernel (one unit each for the conv).
const FRONT_UNITS: usize = 128;
/// Output columns per pass of the first kernel's `x_proj` (a warp's lanes).
const LANES: usize = 32;
/// Units per cube of the second kernel.
const SCAN_UNITS: usize = 128;
/// The norms of Δ, B and C.
const NORMS: usize = 3;
/// The widest conv the first kernel unrolls.
pub const MAX_CONV: usize = 8;
/// The largest state size (as the scan kernels).
pub const MAX_STATE: usize = 256;
/// The most `x_proj` outputs (`dt_rank + 2 · d_state`): two f32 copies live in shared memory.
pub const MAX_OUTPUTS: usize = 2048;

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn mamba_step_front_kernel<F: Float>(
    xz: &crate::Strided<F>,
    conv_state: &crate::Strided<F>,
    conv_w: &crate::Strided<F>,
    conv_b: &crate::Strided<F>,
    x_proj: &crate::Strided<F>,
    u_out: &mut crate::Strided<F>,
    state_out: &mut crate::Strided<F>,
    partial: &mut crate::Strided<f32>,
    inner: u32,
    outputs: u32,
    #[comptime] k: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (inner, outputs) = (inner as usize, outputs as usize);
    let unit = UNIT_POS_X as usize;
    let block = CUBE_POS_X as usize;
    let blocks = CUBE_COUNT_X as usize;
    let row = CUBE_POS_Y as usize;
    let c = block * FRONT_UNITS + unit;

    // The conv window of channel `c`: the `k − 1` inputs of the state, then the new one.
    let mut uv = 0.0f32;
    if c < inner {
        let xv = xz.buf[row * xz.stride(0usize) + c * xz.stride(1usize)];
        let u = conv_channel::<F>(conv_state, conv_w, conv_b, xv, row, c, k, has_bias);
        shift_conv_state::<F>(conv_state, state_out, xv, row, c, k);
        u_out.buf[row * u_out.stride(0usize) + c * u_out.stride(1usize)] = u;
        uv = f32::cast_from(u);
    }
    let mut u_s = SharedMemory::<f32>::new(FRONT_UNITS);
    u_s[unit] = uv;
    sync_cube();

    // This block's share of x_proj: lanes over output columns (coalesced weight rows),
    // groups over the block's channels, summed through shared memory.
    let groups = comptime!(FRONT_UNITS / LANES);
    let lane = unit % LANES;
    let group = unit / LANES;
    let mut red = SharedMemory::<f32>::new(FRONT_UNITS);
    let mut ob = 0usize;
    while ob < outputs {
        let o = ob + lane;
        let mut acc = 0.0f32;
        if o < outputs {
            // Unrolled at compile time (each group's FRONT_UNITS / groups = LANES channels),
            // so the weight loads are in flight together: as a loop, this kernel took 32 µs
            // per Mamba layer of a bench-jamba-1b step on the H200, unrolled 24 µs.
            #[unroll]
            for ii in 0..LANES {
                let i = group + ii * groups;
                let ch = block * FRONT_UNITS + i;
                if ch < inner {
                    acc += u_s[i]
                        * f32::cast_from(
                            x_proj.buf[ch * x_proj.stride(0usize) + o * x_proj.stride(1usize)],
                        );
                }
            }
        }
        red[unit] = acc;
        sync_cube();
        if group == 0 && o < outputs {
            let mut sum = 0.0f32;
            #[unroll]
            for g in 0..groups {
                sum += red[g * LANES + lane];
            }
            partial.buf[(row * blocks + block) * outputs + o] = sum;
        }
        sync_cube();
        ob += LANES;
    }
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn mamba_step_scan_kernel<F: Float>(
    partial: &crate::Strided<f32>,
    dt_norm: &crate::Strided<F>,
    b_norm: &crate::Strided<F>,
    c_norm: &crate::Strided<F>,
    dt_proj: &crate::Strided<F>,
    dt_bias: &crate::Strided<F>,
    a_log: &crate::Strided<F>,
    dskip: &crate::Strided<F>,
    u: &crate::Strided<F>,
    xz: &crate::Strided<F>,
    h0: &crate::Strided<f32>,
    y: &mut crate::Strided<F>,
    h_out: &mut crate::Strided<f32>,
    inner: u32,
    blocks: u32,
    rank: u32,
    n_state: u32,
    eps: f32,
    #[comptime] outputs: usize,
    #[comptime] spu: usize,
    #[comptime] groups: usize,
    #[comptime] per_cube: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (inner, blocks) = (inner as usize, blocks as usize);
    let (rank, n_state) = (rank as usize, n_state as usize);
    let units = comptime!(groups * per_cube);
    let g = UNIT_POS_X as usize;
    let local = UNIT_POS_Y as usize;
    let unit = local * groups + g;
    let row = CUBE_POS_Y as usize;

    // x_proj's output for this row: the blocks' partial sums, rounded to the model dtype.
    let mut dbc = SharedMemory::<f32>::new(outputs);
    let mut o = unit;
    while o < outputs {
        let mut acc = 0.0f32;
        for b in 0..blocks {
            acc += partial.buf[(row * blocks + b) * outputs + o];
        }
        dbc[o] = f32::cast_from(F::cast_from(acc));
        o += units;
    }
    sync_cube();

    // The RMSNorm scales of Δ, B and C (as the norm kernel: f32 statistics).
    let mut scale = SharedMemory::<f32>::new(NORMS);
    if unit < NORMS {
        let mut start = 0usize;
        let mut len = rank;
        if unit == 1 {
            start = rank;
            len = n_state;
        }
        if unit == 2 {
            start = rank + n_state;
            len = n_state;
        }
        let mut ss = 0.0f32;
        for i in 0..len {
            let v = dbc[start + i];
            ss += v * v;
        }
        scale[unit] = 1.0f32 / f32::sqrt(ss / f32::cast_from(len) + eps);
    }
    sync_cube();
    let mut normed = SharedMemory::<f32>::new(outputs);
    weigh_norms::<F>(
        &dbc,
        &scale,
        dt_norm,
        b_norm,
        c_norm,
        &mut normed,
        rank,
        n_state,
        outputs,
        unit,
        units,
    );
    sync_cube();

    // Channel `d`: dt_proj, softplus, the state update over this unit's state indices.
    let d = CUBE_POS_X as usize * per_cube + local;
    let active = d < inner;
    let mut contribution = 0.0f32;
    let mut uv = 0.0f32;
    if active {
        let mut delta = 0.0f32;
        for r in 0..rank {
            delta += normed[r]
                * f32::cast_from(
                    dt_proj.buf[r * dt_proj.stride(0usize) + d * dt_proj.stride(1usize)],
                );
        }
        let mut x = f32::cast_from(F::cast_from(delta));
        if comptime!(has_bias) {
            x += f32::cast_from(dt_bias.buf[d * dt_bias.stride(0usize)]);
        }
        x = softplus_f32(x);
        uv = f32::cast_from(u.buf[row * u.stride(0usize) + d * u.stride(1usize)]);
        let du = x * uv;
        let hs = row * h0.stride(0usize) + d * h0.stride(1usize);
        let os = row * h_out.stride(0usize) + d * h_out.stride(1usize);
        let ab = d * a_log.stride(0usize);
        #[unroll]
        for k in 0..spu {
            let n = g + k * groups;
            let a = -(f32::cast_from(a_log.buf[ab + n * a_log.stride(1usize)]).exp());
            let hv = (x * a).exp() * h0.buf[hs + n * h0.stride(2usize)] + du * normed[rank + n];
            h_out.buf[os + n * h_out.stride(2usize)] = hv;
            contribution += hv * normed[rank + n_state + n];
        }
    }
    let mut part = SharedMemory::<f32>::new(units);
    part[unit] = contribution;
    sync_cube();
    if active && g == 0 {
        let mut acc = 0.0f32;
        for i in 0..groups {
            acc += part[local * groups + i];
        }
        acc += f32::cast_from(dskip.buf[d * dskip.stride(0usize)]) * uv;
        acc *= silu_f32(f32::cast_from(
            xz.buf[row * xz.stride(0usize) + (inner + d) * xz.stride(1usize)],
        ));
        y.buf[row * y.stride(0usize) + d * y.stride(1usize)] = F::cast_from(acc);
    }
}

/// Units per cube of [`mamba_step_one_kernel`] at most.
const ONE_MAX_UNITS: usize = 512;
/// `u` of channel `c` of row `row`: SiLU of the conv over the `k − 1` inputs of the state and
/// the new input `xv`, with the bias where there is one, rounded to the model dtype.
#[cube]
#[allow(clippy::too_many_arguments)]
fn conv_channel<F: Float>(
    conv_state: &crate::Strided<F>,
    conv_w: &crate::Strided<F>,
    conv_b: &crate::Strided<F>,
    xv: F,
    row: usize,
    c: usize,
    #[comptime] k: usize,
    #[comptime] has_bias: bool,
) -> F {
    let lead = comptime!(k - 1);
    let mut acc = 0.0f32;
    if comptime!(has_bias) {
        acc = f32::cast_from(conv_b.buf[c * conv_b.stride(0usize)]);
    }
    let sb = row * conv_state.stride(0usize) + c * conv_state.stride(2usize);
    #[unroll]
    for j in 0..lead {
        acc += f32::cast_from(conv_w.buf[c * conv_w.stride(0usize) + j * conv_w.stride(1usize)])
            * f32::cast_from(conv_state.buf[sb + j * conv_state.stride(1usize)]);
    }
    acc += f32::cast_from(conv_w.buf[c * conv_w.stride(0usize) + lead * conv_w.stride(1usize)])
        * f32::cast_from(xv);
    F::cast_from(silu_f32(acc))
}

/// The new conv state of channel `c` of row `row`: the window shifted by one, `xv` last.
#[cube]
fn shift_conv_state<F: Float>(
    conv_state: &crate::Strided<F>,
    state_out: &mut crate::Strided<F>,
    xv: F,
    row: usize,
    c: usize,
    #[comptime] k: usize,
) {
    let lead = comptime!(k - 1);
    let sb = row * conv_state.stride(0usize) + c * conv_state.stride(2usize);
    let so = row * state_out.stride(0usize) + c * state_out.stride(2usize);
    #[unroll]
    for j in 1..lead {
        state_out.buf[so + (j - 1) * state_out.stride(1usize)] =
            conv_state.buf[sb + j * conv_state.stride(1usize)];
    }
    state_out.buf[so + (lead - 1) * state_out.stride(1usize)] = xv;
}

/// The normalised, weighted Δ, B and C (`normed`, each value rounded to the model dtype twice
/// as the separate norm operations round it) from `x_proj`'s output `dbc` and the three
/// norms' scales; unit `first` of `units` takes every `units`-th output.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weigh_norms<F: Float>(
    dbc: &SharedMemory<f32>,
    scale: &SharedMemory<f32>,
    dt_norm: &crate::Strided<F>,
    b_norm: &crate::Strided<F>,
    c_norm: &crate::Strided<F>,
    normed: &mut SharedMemory<f32>,
    rank: usize,
    n_state: usize,
    #[comptime] outputs: usize,
    first: usize,
    #[comptime] units: usize,
) {
    let mut o = first;
    while o < outputs {
        let mut sc = scale[0];
        let mut w = 0.0f32;
        if o < rank {
            w = f32::cast_from(dt_norm.buf[o * dt_norm.stride(0usize)]);
        }
        if o >= rank && o < rank + n_state {
            sc = scale[1];
            w = f32::cast_from(b_norm.buf[(o - rank) * b_norm.stride(0usize)]);
        }
        if o >= rank + n_state {
            sc = scale[2];
            w = f32::cast_from(c_norm.buf[(o - rank - n_state) * c_norm.stride(0usize)]);
        }
        let v = f32::cast_from(F::cast_from(dbc[o] * sc));
        normed[o] = f32::cast_from(F::cast_from(v * w));
        o += units;
    }
}

/// `x_proj` weight vectors in flight per unit in [`mamba_step_one_kernel`].
const ONE_UNROLL: usize = 8;
/// The shared memory [`mamba_step_one_kernel`] may take (wgpu's software Vulkan allows 32 KB).
const ONE_SHARED_FLOATS: usize = 8192;
/// The largest batch of the one-launch form: each of its cubes computes its row's whole `x_proj`,
/// which a batch of many rows would repeat in every cube.
pub const ONE_MAX_BATCH: usize = 4;

/// The whole step in one launch, a cube per `per_cube` channels and batch row: every cube
/// computes the conv of all of its row's channels and all of `x_proj` (`inner × (R + 2N)`
/// weights, read from L2 by every cube after the first), so no second launch has to gather
/// the blocks' partial sums; then the norms, and for its own channels `dt_proj` (its rank split
/// over the channel's units), the state update, the C contraction, the D skip and the gate.
/// The units form `(lanes, slices)` for `x_proj` (`lanes` 16-byte vectors of its output row,
/// `slices` of the channels) and `(groups, per_cube)` for the state update.
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn mamba_step_one_kernel<F: Float, N: Size>(
    xz: &crate::Strided<F>,
    conv_state: &crate::Strided<F>,
    conv_w: &crate::Strided<F>,
    conv_b: &crate::Strided<F>,
    x_proj: &Array<Vector<F, N>>,
    dt_norm: &crate::Strided<F>,
    b_norm: &crate::Strided<F>,
    c_norm: &crate::Strided<F>,
    dt_proj: &crate::Strided<F>,
    dt_bias: &crate::Strided<F>,
    a_log: &crate::Strided<F>,
    dskip: &crate::Strided<F>,
    h0: &crate::Strided<f32>,
    y: &mut crate::Strided<F>,
    state_out: &mut crate::Strided<F>,
    h_out: &mut crate::Strided<f32>,
    rank: u32,
    n_state: u32,
    eps: f32,
    xrow: u32,
    #[comptime] inner: usize,
    #[comptime] outputs: usize,
    #[comptime] rank_per_unit: usize,
    #[comptime] k: usize,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] slices: usize,
    #[comptime] spu: usize,
    #[comptime] groups: usize,
    #[comptime] per_cube: usize,
    #[comptime] has_conv_bias: bool,
    #[comptime] has_dt_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (rank, n_state) = (rank as usize, n_state as usize);
    let units = comptime!(lanes * slices);
    let chans = comptime!(inner.div_ceil(lanes * slices));
    let u = UNIT_POS as usize;
    let row = CUBE_POS_Y as usize;
    let c0 = CUBE_POS_X as usize * per_cube;

    // The conv of every channel of the row; the cube's own channels write the new conv state.
    let xrow = xrow as usize;
    let mut us = SharedMemory::<f32>::new(inner);
    #[unroll]
    for t in 0..chans {
        let c = u + t * units;
        if c < inner {
            let xv = xz.buf[row * xz.stride(0usize) + c * xz.stride(1usize)];
            us[c] = f32::cast_from(conv_channel::<F>(
                conv_state,
                conv_w,
                conv_b,
                xv,
                row,
                c,
                k,
                has_conv_bias,
            ));
            if c >= c0 && c < c0 + per_cube {
                shift_conv_state::<F>(conv_state, state_out, xv, row, c, k);
            }
        }
    }
    sync_cube();

    // x_proj: lane `lane` owns 16 bytes of the output row, slice `s` every `slices`-th channel.
    let lane = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let mut acc = Array::<f32>::new(width);
    #[unroll]
    for l in 0..width {
        acc[l] = 0.0;
    }
    let mut wv = Array::<Vector<F, N>>::new(ONE_UNROLL);
    let mut cc = s;
    while cc < inner {
        #[unroll]
        for q in 0..ONE_UNROLL {
            let ch = cc + q * slices;
            if ch < inner {
                wv[q] = x_proj[ch * xrow + lane];
            }
        }
        #[unroll]
        for q in 0..ONE_UNROLL {
            let ch = cc + q * slices;
            if ch < inner {
                let (uv, wq) = (us[ch], wv[q]);
                #[unroll]
                for l in 0..width {
                    acc[l] += uv * f32::cast_from(wq[l]);
                }
            }
        }
        cc += comptime!(ONE_UNROLL * slices);
    }
    let mut red = SharedMemory::<f32>::new(comptime!(lanes * slices * width));
    let mut total = Array::<f32>::new(width);
    crate::gemv::slice_totals(&mut red, &acc, 0usize, &mut total, width, lanes, units);
    let mut dbc = SharedMemory::<f32>::new(outputs);
    if s == 0 {
        #[unroll]
        for l in 0..width {
            dbc[lane * width + l] = f32::cast_from(F::cast_from(total[l]));
        }
    }
    sync_cube();

    // The RMSNorm scales of Δ, B and C, 32 units per norm.
    let mut sq = SharedMemory::<f32>::new(comptime!(NORMS * 32));
    let mut scale = SharedMemory::<f32>::new(NORMS);
    if u < NORMS * 32 {
        let seg = u / 32;
        let mut start = 0usize;
        let mut len = rank;
        if seg == 1 {
            start = rank;
            len = n_state;
        }
        if seg == 2 {
            start = rank + n_state;
            len = n_state;
        }
        let mut ss = 0.0f32;
        let mut i = u % 32;
        while i < len {
            let v = dbc[start + i];
            ss += v * v;
            i += 32;
        }
        sq[u] = ss;
    }
    sync_cube();
    if u < NORMS {
        let mut ss = 0.0f32;
        #[unroll]
        for i in 0..32 {
            ss += sq[u * 32 + i];
        }
        let mut len = n_state;
        if u == 0 {
            len = rank;
        }
        scale[u] = 1.0f32 / f32::sqrt(ss / f32::cast_from(len) + eps);
    }
    sync_cube();
    let mut normed = SharedMemory::<f32>::new(outputs);
    weigh_norms::<F>(
        &dbc,
        &scale,
        dt_norm,
        b_norm,
        c_norm,
        &mut normed,
        rank,
        n_state,
        outputs,
        u,
        units,
    );
    sync_cube();

    // Channel `d`: dt_proj with its rank split over the channel's `groups` units.
    let g = u % groups;
    let local = u / groups;
    let d = c0 + local;
    let active = local < per_cube && d < inner;
    let mut part_delta = 0.0f32;
    if active {
        #[unroll]
        for t in 0..rank_per_unit {
            let r = g + t * groups;
            if r < rank {
                part_delta += normed[r]
                    * f32::cast_from(
                        dt_proj.buf[r * dt_proj.stride(0usize) + d * dt_proj.stride(1usize)],
                    );
            }
        }
    }
    let mut part = SharedMemory::<f32>::new(units);
    part[u] = part_delta;
    sync_cube();
    let mut delta = 0.0f32;
    if active {
        #[unroll]
        for i in 0..groups {
            delta += part[local * groups + i];
        }
    }
    sync_cube();

    // softplus, the state update over this unit's state indices, the C contraction.
    let mut contribution = 0.0f32;
    let mut uv = 0.0f32;
    if active {
        let mut x = f32::cast_from(F::cast_from(delta));
        if comptime!(has_dt_bias) {
            x += f32::cast_from(dt_bias.buf[d * dt_bias.stride(0usize)]);
        }
        x = softplus_f32(x);
        uv = us[d];
        let du = x * uv;
        let hs = row * h0.stride(0usize) + d * h0.stride(1usize);
        let os = row * h_out.stride(0usize) + d * h_out.stride(1usize);
        let ab = d * a_log.stride(0usize);
        #[unroll]
        for j in 0..spu {
            let n = g + j * groups;
            let a = -(f32::cast_from(a_log.buf[ab + n * a_log.stride(1usize)]).exp());
            let hv = (x * a).exp() * h0.buf[hs + n * h0.stride(2usize)] + du * normed[rank + n];
            h_out.buf[os + n * h_out.stride(2usize)] = hv;
            contribution += hv * normed[rank + n_state + n];
        }
    }
    part[u] = contribution;
    sync_cube();
    if active && g == 0 {
        let mut acc_y = 0.0f32;
        #[unroll]
        for i in 0..groups {
            acc_y += part[local * groups + i];
        }
        acc_y += f32::cast_from(dskip.buf[d * dskip.stride(0usize)]) * uv;
        acc_y *= silu_f32(f32::cast_from(
            xz.buf[row * xz.stride(0usize) + (inner + d) * xz.stride(1usize)],
        ));
        y.buf[row * y.stride(0usize) + d * y.stride(1usize)] = F::cast_from(acc_y);
    }
}

/// The inputs of [`mamba_step`]: one new token per batch row. Every float tensor but the SSM
/// state has the dtype of `xz`; any strides.
pub struct MambaStepTensors<R: CubeRuntime> {
    /// `in_proj`'s output, `[batch, 2 · inner]`: `x` then the gate `z`.
    pub xz: CubeTensor<R>,
    /// The conv state, `[batch, d_conv − 1, inner]`.
    pub conv_state: CubeTensor<R>,
    /// `[inner, d_conv]`.
    pub conv_weight: CubeTensor<R>,
    /// `[inner]`.
    pub conv_bias: Option<CubeTensor<R>>,
    /// `x_proj`'s weight, `[inner, dt_rank + 2 · d_state]` (Burn's `[in, out]` layout).
    pub x_proj: CubeTensor<R>,
    /// The norm weights of Δ `[dt_rank]`, B and C `[d_state]`.
    pub dt_norm: CubeTensor<R>,
    /// See `dt_norm`.
    pub b_norm: CubeTensor<R>,
    /// See `dt_norm`.
    pub c_norm: CubeTensor<R>,
    /// The norms' epsilon.
    pub eps: f64,
    /// `dt_proj`'s weight, `[dt_rank, inner]`.
    pub dt_proj: CubeTensor<R>,
    /// `dt_proj`'s bias, `[inner]` (added in f32 before softplus).
    pub dt_bias: Option<CubeTensor<R>>,
    /// `[inner, d_state]`.
    pub a_log: CubeTensor<R>,
    /// The skip `D`, `[inner]`.
    pub d: CubeTensor<R>,
    /// The SSM state, `[batch, inner, d_state]`, f32.
    pub ssm_state: CubeTensor<R>,
}

/// Whether [`mamba_step`] takes a mixer of these sizes.
pub fn supports(d_conv: usize, dt_rank: usize, d_state: usize) -> bool {
    (2..=MAX_CONV).contains(&d_conv)
        && (1..=MAX_STATE).contains(&d_state)
        && dt_rank >= 1
        && dt_rank + 2 * d_state <= MAX_OUTPUTS
}

/// The cube shape of [`mamba_step_one_kernel`].
#[derive(Clone, Copy, Debug)]
struct OneForm {
    width: usize,
    lanes: usize,
    slices: usize,
    spu: usize,
    groups: usize,
    per_cube: usize,
}

/// State indices per unit of the state update, and units per channel.
fn state_split(n_state: usize) -> (usize, usize) {
    let spu = [4usize, 2]
        .into_iter()
        .find(|s| n_state % s == 0)
        .unwrap_or(1);
    (spu, n_state / spu)
}

/// The one-launch form's cube for a batch of `batch` rows, or `None` where it does not apply:
/// more than [`ONE_MAX_BATCH`] rows, `x_proj`'s width not a whole number of 16-byte vectors,
/// or more shared memory than [`ONE_SHARED_FLOATS`] (`inner` f32 values of the conv output
/// and the slices' sums; Jamba-v0.1's 8192 channels take the two-launch form).
fn one_form(
    max_units: usize,
    batch: usize,
    inner: usize,
    rank: usize,
    n_state: usize,
    dtype: DType,
) -> Option<OneForm> {
    let outputs = rank + 2 * n_state;
    let width = crate::gemv::vec_width(dtype)?;
    if !(1..=ONE_MAX_BATCH).contains(&batch) || outputs % width != 0 {
        return None;
    }
    let lanes = outputs / width;
    let max_units = max_units.min(ONE_MAX_UNITS);
    if lanes > max_units {
        return None;
    }
    let slices = 1usize << (max_units / lanes).ilog2();
    let units = lanes * slices;
    let (spu, groups) = state_split(n_state);
    let shared = inner + units * width + 2 * outputs + NORMS * 32 + NORMS + units;
    (units >= NORMS * 32 && groups <= units && shared <= ONE_SHARED_FLOATS).then_some(OneForm {
        width,
        lanes,
        slices,
        spu,
        groups,
        per_cube: units / groups,
    })
}

/// `x_proj`'s row stride in 16-byte vectors where the one-launch form can read it: rows
/// contiguous, every row starting on a 16-byte boundary. CUDA pads a row of 96 bf16 values
/// (192 bytes) to 256, so the stride is not the width.
fn x_proj_row_vectors<R: CubeRuntime>(x_proj: &CubeTensor<R>, dtype: DType) -> Option<usize> {
    let width = crate::gemv::vec_width(dtype)?;
    let strides = x_proj.meta.strides();
    (x_proj.dtype == dtype
        && strides[1] == 1
        && strides[0] % width == 0
        && crate::gemv::aligned(x_proj))
    .then_some(strides[0] / width)
}

/// Whether [`mamba_step`] takes one launch, rather than two, for a batch of `batch` rows, a
/// state of `n_state` and this `x_proj` weight (`[inner, dt_rank + 2 · d_state]`, the step's
/// dtype) on its device.
pub fn takes_one_launch<R: CubeRuntime>(
    x_proj: &CubeTensor<R>,
    batch: usize,
    n_state: usize,
) -> bool {
    let [inner, outputs] = [x_proj.meta.shape()[0], x_proj.meta.shape()[1]];
    let Some(rank) = outputs.checked_sub(2 * n_state) else {
        return false;
    };
    let max_units = x_proj.client.properties().hardware.max_units_per_cube as usize;
    one_form(max_units, batch, inner, rank, n_state, x_proj.dtype).is_some()
        && x_proj_row_vectors(x_proj, x_proj.dtype).is_some()
}

/// One decoding step of the mixer's middle (one launch where [`takes_one_launch`], else two):
/// returns `y` (`[batch, inner]`, gated, before `out_proj`), the new conv state
/// (`[batch, d_conv − 1, inner]`) and the new SSM state (`[batch, inner, d_state]`, f32), all
/// new buffers.
///
/// # Panics
/// If the sizes fail [`supports`] or the shapes disagree (the caller checks them).
pub fn mamba_step<R: CubeRuntime>(
    t: MambaStepTensors<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let batch = t.xz.meta.shape()[0];
    let [inner, k] = [t.conv_weight.meta.shape()[0], t.conv_weight.meta.shape()[1]];
    let rank = t.dt_proj.meta.shape()[0];
    let n_state = t.a_log.meta.shape()[1];
    let outputs = rank + 2 * n_state;
    assert!(
        supports(k, rank, n_state),
        "mamba_step: d_conv {k}, dt_rank {rank}, d_state {n_state}"
    );
    assert_eq!(t.xz.meta.shape()[1], 2 * inner, "mamba_step: xz width");
    assert_eq!(
        t.x_proj.meta.shape().as_slice(),
        &[inner, outputs],
        "mamba_step: x_proj"
    );
    assert_eq!(
        t.ssm_state.dtype,
        DType::F32,
        "mamba_step: the SSM state is f32"
    );
    let client = t.xz.client.clone();
    let device = t.xz.device.clone();
    let dtype = t.xz.dtype;
    let empty = |shape: Vec<usize>, dtype| {
        empty_device_contiguous_dtype(client.clone(), device.clone(), shape.into(), dtype)
    };
    let y = empty(vec![batch, inner], dtype);
    let conv_out = empty(vec![batch, k - 1, inner], dtype);
    let h_out = empty(vec![batch, inner, n_state], DType::F32);
    if batch == 0 || inner == 0 {
        return (y, conv_out, h_out);
    }
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    let one = one_form(max_units, batch, inner, rank, n_state, dtype)
        .zip(x_proj_row_vectors(&t.x_proj, dtype));
    if let Some((form, xrow)) = one {
        launch_one(t, form, xrow, &y, &conv_out, &h_out);
        return (y, conv_out, h_out);
    }
    let blocks = inner.div_ceil(FRONT_UNITS);
    let u = empty(vec![batch, inner], dtype);
    let partial = empty(vec![batch, blocks, outputs], DType::F32);
    let has_conv_bias = t.conv_bias.is_some();
    let conv_bias = t.conv_bias.unwrap_or_else(|| t.d.clone());
    // SAFETY: units whose channel is past `inner` touch only their shared-memory slot; the
    // others read their row and channel of tensors of the checked shapes (`j < d_conv` along
    // the conv weight, `j < d_conv − 1` along the state); output columns stop below `outputs`,
    // the width of `x_proj` and of `partial`, whose block index is the cube's x position.
    unsafe {
        mamba_step_front_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(blocks as u32, batch as u32, 1),
            CubeDim::new_1d(FRONT_UNITS as u32),
            crate::strided(t.xz.clone()),
            crate::strided(t.conv_state),
            crate::strided(t.conv_weight),
            crate::strided(conv_bias),
            crate::strided(t.x_proj),
            crate::strided(u.clone()),
            crate::strided(conv_out.clone()),
            crate::strided(partial.clone()),
            inner as u32,
            outputs as u32,
            k,
            has_conv_bias,
            dtype.into(),
        );
    }
    let (spu, groups) = state_split(n_state);
    let per_cube = (SCAN_UNITS / groups).max(1);
    let has_dt_bias = t.dt_bias.is_some();
    let dt_bias = t.dt_bias.unwrap_or_else(|| t.d.clone());
    // SAFETY: the shared arrays hold `outputs` values and the loops over them stop there;
    // the norm segments (`rank`, `n_state`, `n_state` long) tile `0..outputs`; units whose
    // channel is past `inner` only write their shared slot; state indices `g + k · groups`
    // stay below `n_state = spu · groups`; `xz`'s gate half is `inner..2 · inner`.
    unsafe {
        mamba_step_scan_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(inner.div_ceil(per_cube) as u32, batch as u32, 1),
            CubeDim::new_2d(groups as u32, per_cube as u32),
            crate::strided(partial),
            crate::strided(t.dt_norm),
            crate::strided(t.b_norm),
            crate::strided(t.c_norm),
            crate::strided(t.dt_proj),
            crate::strided(dt_bias),
            crate::strided(t.a_log),
            crate::strided(t.d),
            crate::strided(u),
            crate::strided(t.xz),
            crate::strided(t.ssm_state),
            crate::strided(y.clone()),
            crate::strided(h_out.clone()),
            inner as u32,
            blocks as u32,
            rank as u32,
            n_state as u32,
            t.eps as f32,
            outputs,
            spu,
            groups,
            per_cube,
            has_dt_bias,
            dtype.into(),
        );
    }
    (y, conv_out, h_out)
}

/// [`mamba_step`] in one launch ([`mamba_step_one_kernel`]) into the given outputs.
fn launch_one<R: CubeRuntime>(
    t: MambaStepTensors<R>,
    form: OneForm,
    xrow: usize,
    y: &CubeTensor<R>,
    conv_out: &CubeTensor<R>,
    h_out: &CubeTensor<R>,
) {
    let batch = t.xz.meta.shape()[0];
    let [inner, k] = [t.conv_weight.meta.shape()[0], t.conv_weight.meta.shape()[1]];
    let rank = t.dt_proj.meta.shape()[0];
    let n_state = t.a_log.meta.shape()[1];
    let outputs = rank + 2 * n_state;
    let client = t.xz.client.clone();
    let dtype = t.xz.dtype;
    let OneForm {
        width,
        lanes,
        slices,
        spu,
        groups,
        per_cube,
    } = form;
    let has_conv_bias = t.conv_bias.is_some();
    let conv_bias = t.conv_bias.unwrap_or_else(|| t.d.clone());
    let has_dt_bias = t.dt_bias.is_some();
    let dt_bias = t.dt_bias.unwrap_or_else(|| t.d.clone());
    // SAFETY: conv units stop below `inner` and read their row of `xz`, the state and the
    // weights of the checked shapes (`j < d_conv` along the conv weight, `j < d_conv − 1`
    // along the state); `x_proj`'s rows are `xrow` vectors apart, `lanes` of them contiguous, read at channels below
    // `inner` and vector `lane < lanes`; the shared arrays hold `inner`, `units · width`,
    // `outputs` (tiled by the norm segments) and `units` values, every loop stopping there;
    // state-update units past `inner` or `per_cube` only write their shared slot; state
    // indices `g + j · groups` stay below `n_state = spu · groups`, rank indices below `rank`;
    // `xz`'s gate half is `inner..2 · inner`. `lanes · slices` is at least the 96 units the
    // norms use, `slices` a power of two as the slice sums need.
    unsafe {
        mamba_step_one_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(inner.div_ceil(per_cube) as u32, batch as u32, 1),
            CubeDim::new_2d(lanes as u32, slices as u32),
            width,
            crate::strided(t.xz),
            crate::strided(t.conv_state),
            crate::strided(t.conv_weight),
            crate::strided(conv_bias),
            t.x_proj.into_array_arg(),
            crate::strided(t.dt_norm),
            crate::strided(t.b_norm),
            crate::strided(t.c_norm),
            crate::strided(t.dt_proj),
            crate::strided(dt_bias),
            crate::strided(t.a_log),
            crate::strided(t.d),
            crate::strided(t.ssm_state),
            crate::strided(y.clone()),
            crate::strided(conv_out.clone()),
            crate::strided(h_out.clone()),
            rank as u32,
            n_state as u32,
            t.eps as f32,
            xrow as u32,
            inner,
            outputs,
            rank.div_ceil(groups),
            k,
            width,
            lanes,
            slices,
            spu,
            groups,
            per_cube,
            has_conv_bias,
            has_dt_bias,
            dtype.into(),
        );
    }
}
