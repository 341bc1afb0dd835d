//! The fused selective scan (forward), also used for the one-step state update of decoding.
//!
//! One cube owns `channels_per_cube` channels of one batch row and runs one unit per
//! (channel, state index): the unit keeps its `h[d, n]` in a register for the whole sequence,
//! so the `[seq, channels, state]` intermediate of the tensor-op path never exists. Time is
//! walked in tiles: the cube stages a tile of `Δ`, `Δ·u`, `B` and `C` in shared memory
//! (softplus and the bias computed once per channel and step, not once per state), every unit
//! advances its state through the tile and leaves `h·C` in shared memory, and the cube then sums
//! those over the state index, adds `D·u`, applies the gate and writes `y`. Three barriers per
//! tile; global traffic is the floor (read u, Δ, z, B, C once, write y once) plus the states.
//!
//! The `exp` per (channel, state, step) is the bound, as in mamba_ssm: on CUDA it is compiled
//! with reduced-precision intrinsics (`__expf`, relative error ~1e-7 on the range `Δ·A ≤ 0`;
//! the chunked kernel asks for `2^(Δ·A·log₂e)`, one multiply fewer, and on CUDA for the
//! flush-to-zero `ex2.approx.ftz.f32`, which ptxas does not wrap in a subnormal guard; see
//! [`crate::scan_chunked`]).
//!
//! [`ScanPlan`] picks the kernel: state sizes up to 16 (Jamba's) run the time-chunked kernel of
//! [`crate::scan_chunked`], which keeps the GPU full at batch 1; this tiled kernel serves larger
//! states and the backward's checkpointing forward.

use burn_cubecl::{
    CubeRuntime, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    tensor::CubeTensor,
};
use cubecl::prelude::*;
use cubecl::{ir::FastMath, prelude::Tensor as CubeArg};

/// The largest `d_state` the kernel takes (its tile must fit in shared memory).
pub const MAX_STATE: usize = 256;

/// Inputs of [`selective_scan_fwd`], all on one device.
///
/// `u`, `delta`, `z`, `b`, `c` share one float dtype (f32, f16 or bf16) and may be strided
/// views; `a`, `d`, `delta_bias` and `state` are f32.
pub struct ScanTensors<R: CubeRuntime> {
    /// `[batch, seq, channels]`.
    pub u: CubeTensor<R>,
    /// `[batch, seq, channels]`, before bias and softplus.
    pub delta: CubeTensor<R>,
    /// `A`, `[channels, state]`, f32.
    pub a: CubeTensor<R>,
    /// `[batch, seq, state]`.
    pub b: CubeTensor<R>,
    /// `[batch, seq, state]`.
    pub c: CubeTensor<R>,
    /// The skip `D`, `[channels]`, f32 (zeros for none).
    pub d: CubeTensor<R>,
    /// The gate, `[batch, seq, channels]`.
    pub z: Option<CubeTensor<R>>,
    /// `[channels]`, f32 (zeros for none).
    pub delta_bias: CubeTensor<R>,
    /// The state before the first step, `[batch, channels, state]`, f32.
    pub state: CubeTensor<R>,
    /// `Δ = softplus(δ + bias)` when true, `δ + bias` otherwise.
    pub delta_softplus: bool,
}

impl<R: CubeRuntime> Clone for ScanTensors<R> {
    fn clone(&self) -> Self {
        Self {
            u: self.u.clone(),
            delta: self.delta.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            c: self.c.clone(),
            d: self.d.clone(),
            z: self.z.clone(),
            delta_bias: self.delta_bias.clone(),
            state: self.state.clone(),
            delta_softplus: self.delta_softplus,
        }
    }
}

/// Launch geometry of the sequence kernel. A unit owns `states_per_unit` consecutive state
/// indices of one channel (their `h` in registers, their `h·C` summed before it touches shared
/// memory); a cube owns `channels_per_cube` channels, about 128 units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanGeometry {
    /// State indices per unit (divides the state size).
    pub states_per_unit: usize,
    /// Channels one cube owns.
    pub channels_per_cube: usize,
    /// Time steps staged per tile.
    pub tile: usize,
}

impl ScanGeometry {
    /// The geometry for a problem: the most state indices per unit (4, 2, else 1) that still
    /// leaves 128K units. Measured on the H200 (RESULTS.md): the kernel is throughput-bound
    /// from about 128K units, where 4 states per unit do the same work in about half the time;
    /// below it, fewer units per state hide latency worse and lose. Shared memory stays under
    /// 16 KiB (WebGPU's guaranteed minimum).
    pub fn new(batch: usize, channels: usize, state: usize) -> Self {
        let states_per_unit = [4usize, 2]
            .into_iter()
            .find(|&g| state % g == 0 && batch * channels * state / g >= 131_072)
            .unwrap_or(1);
        Self::with_states_per_unit(state, states_per_unit)
    }

    /// The geometry with a given number of state indices per unit.
    pub fn with_states_per_unit(state: usize, states_per_unit: usize) -> Self {
        let groups = state / states_per_unit;
        let channels_per_cube = (128 / groups).max(1);
        let stride = padded_stride(groups);
        // Shared floats: 2·T·cb (Δ, Δu) + 2·T·N (B, C) + T·cb·stride (partial h·C).
        let per_step = 2 * channels_per_cube + 2 * state + channels_per_cube * stride;
        let tile = (4096 / per_step).clamp(1, 32);
        Self {
            states_per_unit,
            channels_per_cube,
            tile,
        }
    }
}

/// Which forward kernel runs, and how it is cut up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanPlan {
    /// The tiled kernel: a unit per (channel, state indices) walks the whole sequence
    /// ([`ScanGeometry`]). Any state size up to [`MAX_STATE`].
    Tiled(ScanGeometry),
    /// The chunked kernel ([`crate::scan_chunked`]): a unit per (channel, chunk of time) with
    /// every state index in registers, time cut into about `chunks` chunks. State sizes up to
    /// [`crate::scan_chunked::MAX_CHUNKED_STATE`].
    Chunked {
        /// Chunks of time (clamped to the sequence length).
        chunks: usize,
    },
}

impl ScanPlan {
    /// The plan for a problem: the chunked kernel where the state fits its registers (Jamba's
    /// 16 does), with [`crate::scan_chunked::default_chunks`]; the tiled one otherwise.
    ///
    /// ```
    /// use jamba_kernels::scan::ScanPlan;
    /// assert!(matches!(ScanPlan::new(1, 8192, 4096, 16), ScanPlan::Chunked { .. }));
    /// assert!(matches!(ScanPlan::new(1, 64, 100, 64), ScanPlan::Tiled(_)));
    /// ```
    pub fn new(batch: usize, channels: usize, seq: usize, state: usize) -> Self {
        if crate::scan_chunked::supports_state(state) {
            ScanPlan::Chunked {
                chunks: crate::scan_chunked::default_chunks(batch, channels, seq),
            }
        } else {
            ScanPlan::Tiled(ScanGeometry::new(batch, channels, state))
        }
    }
}

/// Row stride of the `h·C` tile: odd, so that the units summing consecutive rows hit distinct
/// shared-memory banks.
pub(crate) fn padded_stride(state: usize) -> usize {
    if state % 2 == 0 { state + 1 } else { state }
}

/// `log(1 + eˣ)` with PyTorch's threshold, accurate for very negative `x` too: WGSL's `log1p`
/// is `log(1 + x)`, which loses everything below 1e-7, so compute it as
/// `max(x, 0) + log1p(e^{−|x|})` with the `w·log(v)/(v − 1)` correction.
#[cube]
pub fn softplus_f32(x: f32) -> f32 {
    let mut out = x;
    if x <= 20.0 {
        let w = (-x.abs()).exp();
        let v = 1.0 + w;
        let mut l = w;
        if v != 1.0 {
            l = v.ln() * w / (v - 1.0);
        }
        out = x.max(0.0) + l;
    }
    out
}

/// `x · sigmoid(x)` in f32.
#[cube]
pub fn silu_f32(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Stages `B` and `C` of steps `t0 .. t0 + steps` of batch row `row` into shared memory as f32,
/// `[tile, state]`, zeros past the end; the cube's units share the work.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn stage_bc<F: Float>(
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    s_b: &mut SharedMemory<f32>,
    s_c: &mut SharedMemory<f32>,
    row: usize,
    t0: usize,
    steps: usize,
    #[comptime] tile: usize,
    #[comptime] n_state: usize,
    #[comptime] units: usize,
) {
    let mut i = UNIT_POS_X as usize;
    while i < comptime!(tile * n_state) {
        let t = i / n_state;
        let nn = i % n_state;
        let mut bv = 0.0f32;
        let mut cv = 0.0f32;
        if t < steps {
            let tt = t0 + t;
            bv = f32::cast_from(
                bmat[row * bmat.stride(0) + tt * bmat.stride(1) + nn * bmat.stride(2)],
            );
            cv = f32::cast_from(
                cmat[row * cmat.stride(0) + tt * cmat.stride(1) + nn * cmat.stride(2)],
            );
        }
        s_b[i] = bv;
        s_c[i] = cv;
        i += units;
    }
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn scan_fwd_kernel<F: Float>(
    u: &CubeArg<F>,
    delta: &CubeArg<F>,
    z: &CubeArg<F>,
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    a: &CubeArg<f32>,
    dskip: &CubeArg<f32>,
    bias: &CubeArg<f32>,
    h0: &CubeArg<f32>,
    y: &mut CubeArg<F>,
    h_out: &mut CubeArg<f32>,
    checkpoints: &mut CubeArg<f32>,
    seq: u32,
    channels: u32,
    every: u32,
    #[comptime] n_state: usize,
    #[comptime] spu: usize,
    #[comptime] cb: usize,
    #[comptime] tile: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[comptime] save_checkpoints: bool,
    #[define(F)] _dtype: StorageType,
) {
    let groups = comptime!(n_state / spu);
    let stride = comptime!(if groups % 2 == 0 { groups + 1 } else { groups });
    let units = comptime!(cb * groups);
    let every = every as usize;
    let seq = seq as usize;
    let channels = channels as usize;
    let row = CUBE_POS_Y as usize;
    let d0 = CUBE_POS_X as usize * cb;
    let tid = UNIT_POS_X as usize;
    let c = tid / groups;
    let j = tid % groups;
    let n0 = j * spu;
    let d = d0 + c;
    let active = d < channels;

    let mut s_delta = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_du = SharedMemory::<f32>::new(comptime!(tile * cb));
    let mut s_b = SharedMemory::<f32>::new(comptime!(tile * n_state));
    let mut s_c = SharedMemory::<f32>::new(comptime!(tile * n_state));
    let mut s_p = SharedMemory::<f32>::new(comptime!(tile * cb * stride));

    let mut a_dn = Array::<f32>::new(spu);
    let mut h = Array::<f32>::new(spu);
    #[unroll]
    for q in 0..spu {
        a_dn[q] = 0.0;
        h[q] = 0.0;
        if active {
            a_dn[q] = a[d * a.stride(0) + (n0 + q) * a.stride(1)];
            h[q] = h0[row * h0.stride(0) + d * h0.stride(1) + (n0 + q) * h0.stride(2)];
        }
    }

    let (u0, u1, u2) = (u.stride(0), u.stride(1), u.stride(2));
    let (dl0, dl1, dl2) = (delta.stride(0), delta.stride(1), delta.stride(2));
    let (y0, y1, y2) = (y.stride(0), y.stride(1), y.stride(2));

    let mut t0 = 0usize;
    while t0 < seq {
        let steps = min(tile, seq - t0);

        // Stage Δ and Δ·u for the tile (zeros past the end, which leave h unchanged).
        let mut i = tid;
        while i < comptime!(tile * cb) {
            let t = i / cb;
            let dd = d0 + i % cb;
            let mut dv = 0.0f32;
            let mut duv = 0.0f32;
            if t < steps && dd < channels {
                let tt = t0 + t;
                let mut x = f32::cast_from(delta[row * dl0 + tt * dl1 + dd * dl2]) + bias[dd];
                if comptime!(softplus) {
                    x = softplus_f32(x);
                }
                dv = x;
                duv = x * f32::cast_from(u[row * u0 + tt * u1 + dd * u2]);
            }
            s_delta[i] = dv;
            s_du[i] = duv;
            i += units;
        }
        stage_bc::<F>(
            bmat, cmat, &mut s_b, &mut s_c, row, t0, steps, tile, n_state, units,
        );
        sync_cube();

        // The recurrence: `spu` register states per unit, their h·C summed in registers.
        for t in 0..steps {
            let k = t * cb + c;
            let dv = s_delta[k];
            let duv = s_du[k];
            let bc = t * n_state + n0;
            let mut part = 0.0f32;
            #[unroll]
            for q in 0..spu {
                if comptime!(save_checkpoints) {
                    let tt = t0 + t;
                    if active && tt % every == 0 {
                        checkpoints[row * checkpoints.stride(0)
                            + (tt / every) * checkpoints.stride(1)
                            + d * checkpoints.stride(2)
                            + (n0 + q) * checkpoints.stride(3)] = h[q];
                    }
                }
                let hq = (dv * a_dn[q]).exp() * h[q] + duv * s_b[bc + q];
                h[q] = hq;
                part += hq * s_c[bc + q];
            }
            s_p[k * stride + j] = part;
        }
        sync_cube();

        // y = Σ h·C + D·u, gated.
        let mut i = tid;
        while i < steps * cb {
            let t = i / cb;
            let dd = d0 + i % cb;
            if dd < channels {
                let tt = t0 + t;
                let mut acc = 0.0f32;
                for k in 0..groups {
                    acc += s_p[i * stride + k];
                }
                acc += dskip[dd] * f32::cast_from(u[row * u0 + tt * u1 + dd * u2]);
                if comptime!(has_z) {
                    let zv =
                        f32::cast_from(z[row * z.stride(0) + tt * z.stride(1) + dd * z.stride(2)]);
                    acc *= silu_f32(zv);
                }
                y[row * y0 + tt * y1 + dd * y2] = F::cast_from(acc);
            }
            i += units;
        }
        sync_cube();
        t0 += tile;
    }

    if active {
        #[unroll]
        for q in 0..spu {
            h_out[row * h_out.stride(0) + d * h_out.stride(1) + (n0 + q) * h_out.stride(2)] = h[q];
        }
    }
}

/// One decoding step (`seq == 1`), memory-bound: the state streams through once, read and
/// written with coalesced accesses. A unit per (row, channel, group of `states_per_unit` state
/// indices): the group's indices interleave (`n = g + k·groups`), so that for each `k` the units
/// of a warp touch consecutive 16-byte runs, and each unit keeps `states_per_unit` independent
/// state loads in flight. (One state index per unit left ~4 bytes in flight per thread: 700 GB/s
/// at batch 64; a whole channel per unit made every warp load touch 32 cache lines. See
/// `jamba-bench/RESULTS.md`.) The `C` contraction is summed through shared memory.
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn scan_step_kernel<F: Float>(
    u: &CubeArg<F>,
    delta: &CubeArg<F>,
    z: &CubeArg<F>,
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    a: &CubeArg<f32>,
    dskip: &CubeArg<f32>,
    bias: &CubeArg<f32>,
    h0: &CubeArg<f32>,
    y: &mut CubeArg<F>,
    h_out: &mut CubeArg<f32>,
    channels: u32,
    #[comptime] n_state: usize,
    #[comptime] states_per_unit: usize,
    #[comptime] channels_per_cube: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let groups = comptime!(n_state / states_per_unit);
    let channels = channels as usize;
    let g = UNIT_POS_X as usize;
    let local = UNIT_POS_Y as usize;
    let d = CUBE_POS_X as usize * channels_per_cube + local;
    let row = CUBE_POS_Y as usize;
    let mut partial = SharedMemory::<f32>::new(comptime!(groups * channels_per_cube));
    let active = d < channels;
    let mut contribution = 0.0f32;
    let mut uv = 0.0f32;
    if active {
        let mut x = f32::cast_from(delta[row * delta.stride(0) + d * delta.stride(2)]) + bias[d];
        if comptime!(softplus) {
            x = softplus_f32(x);
        }
        uv = f32::cast_from(u[row * u.stride(0) + d * u.stride(2)]);
        let du = x * uv;
        let hs = row * h0.stride(0) + d * h0.stride(1);
        let os = row * h_out.stride(0) + d * h_out.stride(1);
        #[unroll]
        for k in 0..states_per_unit {
            let n = g + k * groups;
            let hv = (x * a[d * a.stride(0) + n * a.stride(1)]).exp() * h0[hs + n * h0.stride(2)]
                + du * f32::cast_from(bmat[row * bmat.stride(0) + n * bmat.stride(2)]);
            h_out[os + n * h_out.stride(2)] = hv;
            contribution += hv * f32::cast_from(cmat[row * cmat.stride(0) + n * cmat.stride(2)]);
        }
    }
    partial[local * groups + g] = contribution;
    sync_cube();
    if active && g == 0 {
        let mut acc = 0.0f32;
        for i in 0..groups {
            acc += partial[local * groups + i];
        }
        acc += dskip[d] * uv;
        if comptime!(has_z) {
            acc *= silu_f32(f32::cast_from(z[row * z.stride(0) + d * z.stride(2)]));
        }
        y[row * y.stride(0) + d * y.stride(2)] = F::cast_from(acc);
    }
}

/// The decoding step with the state, `A` and the new state read and written as vectors of
/// `width` f32 (16 bytes for 4): a warp's loads of a vector index cover `32 · 16` consecutive
/// bytes, one instruction each, and each unit keeps `vectors_per_unit` of them in flight. Unit
/// `g` of a channel owns vectors `g + k · groups`. (The scalar kernel's 4 interleaved state
/// loads per unit reached 1.35 TB/s; see `jamba-bench/RESULTS.md`, session 8.)
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn scan_step_vec_kernel<F: Float, N: Size>(
    u: &CubeArg<F>,
    delta: &CubeArg<F>,
    z: &CubeArg<F>,
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    a: &CubeArg<Vector<f32, N>>,
    dskip: &CubeArg<f32>,
    bias: &CubeArg<f32>,
    h0: &CubeArg<Vector<f32, N>>,
    y: &mut CubeArg<F>,
    h_out: &mut CubeArg<Vector<f32, N>>,
    channels: u32,
    #[comptime] n_state: usize,
    #[comptime] width: usize,
    #[comptime] vectors_per_unit: usize,
    #[comptime] channels_per_cube: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let groups = comptime!(n_state / (width * vectors_per_unit));
    let channels = channels as usize;
    let g = UNIT_POS_X as usize;
    let local = UNIT_POS_Y as usize;
    let d = CUBE_POS_X as usize * channels_per_cube + local;
    let row = CUBE_POS_Y as usize;
    let mut partial = SharedMemory::<f32>::new(comptime!(groups * channels_per_cube));
    let active = d < channels;
    let mut contribution = 0.0f32;
    let mut uv = 0.0f32;
    if active {
        let mut x = f32::cast_from(delta[row * delta.stride(0) + d * delta.stride(2)]) + bias[d];
        if comptime!(softplus) {
            x = softplus_f32(x);
        }
        uv = f32::cast_from(u[row * u.stride(0) + d * u.stride(2)]);
        let du = x * uv;
        // Strides count f32; the vector tensors index whole vectors.
        let hs = (row * h0.stride(0) + d * h0.stride(1)) / width;
        let os = (row * h_out.stride(0) + d * h_out.stride(1)) / width;
        let at = d * a.stride(0) / width;
        let bs = row * bmat.stride(0);
        let cs = row * cmat.stride(0);
        #[unroll]
        for k in 0..vectors_per_unit {
            let l = g + k * groups;
            let hv = h0[hs + l];
            let av = a[at + l];
            let mut out = Vector::<f32, N>::empty();
            #[unroll]
            for i in 0..width {
                let n = l * width + i;
                let v =
                    (x * av[i]).exp() * hv[i] + du * f32::cast_from(bmat[bs + n * bmat.stride(2)]);
                out[i] = v;
                contribution += v * f32::cast_from(cmat[cs + n * cmat.stride(2)]);
            }
            h_out[os + l] = out;
        }
    }
    partial[local * groups + g] = contribution;
    sync_cube();
    if active && g == 0 {
        let mut acc = 0.0f32;
        for i in 0..groups {
            acc += partial[local * groups + i];
        }
        acc += dskip[d] * uv;
        if comptime!(has_z) {
            acc *= silu_f32(f32::cast_from(z[row * z.stride(0) + d * z.stride(2)]));
        }
        y[row * y.stride(0) + d * y.stride(2)] = F::cast_from(acc);
    }
}

/// The vector width and vectors per unit of the vectorised decoding step, when the state,
/// `A` and the new state allow it: the state size a multiple of 4, each tensor's last stride 1
/// and its other strides multiples of 4; one vector per unit.
fn step_vectors<R: CubeRuntime>(
    state: usize,
    tensors: [&CubeTensor<R>; 3],
) -> Option<(usize, usize)> {
    const WIDTH: usize = 4;
    let per_unit = 1;
    let fits = state % WIDTH == 0
        && tensors.iter().all(|t| {
            let strides = t.meta.strides();
            let last = strides.len() - 1;
            strides[last] == 1 && strides[..last].iter().all(|s| s % WIDTH == 0)
        });
    fits.then_some((WIDTH, per_unit))
}

/// State indices per unit of the decoding step: 4 where they divide the state size (16 bytes of
/// state in flight per unit), else 2, else 1.
pub fn step_states_per_unit(state: usize) -> usize {
    [4usize, 2]
        .into_iter()
        .find(|&s| state % s == 0)
        .unwrap_or(1)
}

/// Whether [`selective_scan_fwd`] takes a state of this size.
pub fn supports_state(state: usize) -> bool {
    (1..=MAX_STATE).contains(&state)
}

/// The selective scan forward in one launch. Returns `y` (`[batch, seq, channels]`, the dtype
/// of `u`) and the final state (`[batch, channels, state]`, f32).
///
/// A sequence of length 1 is the decoding state update. Shapes must agree (the caller checks
/// them); the state size must satisfy [`supports_state`].
pub fn selective_scan_fwd<R: CubeRuntime>(input: ScanTensors<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let u = &input.u;
    let shape = u.meta.shape().clone();
    let (batch, channels) = (shape[0], shape[2]);
    let state = input.a.meta.shape()[1];
    let y = empty_device_contiguous_dtype(u.client.clone(), u.device.clone(), shape, u.dtype);
    let h_out = empty_device_contiguous_dtype(
        u.client.clone(),
        u.device.clone(),
        [batch, channels, state].into(),
        input.state.dtype,
    );
    selective_scan_fwd_into(input, y.clone(), h_out.clone());
    (y, h_out)
}

/// [`selective_scan_fwd`] writing into given buffers: `y` like `u` and `state_out`
/// `[batch, channels, state]` f32, neither aliasing an input.
pub fn selective_scan_fwd_into<R: CubeRuntime>(
    input: ScanTensors<R>,
    y: CubeTensor<R>,
    state_out: CubeTensor<R>,
) {
    launch_fwd(input, y, state_out, None, 0, None);
}

/// [`selective_scan_fwd_into`] with a chosen plan instead of [`ScanPlan::new`]'s (for tests and
/// tuning; with a tiled plan, `seq == 1` takes the tiled kernel's decoding variant).
///
/// # Panics
/// If the plan does not take the state size (a chunked plan above
/// [`crate::scan_chunked::MAX_CHUNKED_STATE`], a geometry whose states per unit do not divide it).
pub fn selective_scan_fwd_with<R: CubeRuntime>(
    input: ScanTensors<R>,
    y: CubeTensor<R>,
    state_out: CubeTensor<R>,
    plan: ScanPlan,
) {
    launch_fwd(input, y, state_out, None, 0, Some(plan));
}

/// The forward launch; with `checkpoints` (`[batch, ceil(seq / every), channels, state]`, f32)
/// it also records the state before every `every`-th step, for the backward's recompute (the
/// tiled kernel, whatever the plan).
pub(crate) fn launch_fwd<R: CubeRuntime>(
    input: ScanTensors<R>,
    y: CubeTensor<R>,
    state_out: CubeTensor<R>,
    checkpoints: Option<CubeTensor<R>>,
    every: usize,
    plan: Option<ScanPlan>,
) {
    let shape = input.u.meta.shape().clone();
    let (batch, seq, channels) = (shape[0], shape[1], shape[2]);
    let state = input.a.meta.shape()[1];
    assert!(supports_state(state), "d_state {state} above {MAX_STATE}");
    if batch == 0 || channels == 0 {
        return;
    }
    // A decoding step takes the step kernel unless a plan says otherwise: it is memory-bound,
    // and the step kernel streams the state with more bytes in flight than the chunked one.
    // An explicit tiled plan also sets the step kernel's states per unit (tests run each).
    let step_spu = match plan {
        Some(ScanPlan::Tiled(g)) => g.states_per_unit,
        _ => step_states_per_unit(state),
    };
    let plan_in = plan;
    let plan = match (plan, &checkpoints) {
        (_, Some(_)) => ScanPlan::Tiled(ScanGeometry::new(batch, channels, state)),
        (Some(plan), None) => plan,
        (None, None) if seq == 1 => ScanPlan::Tiled(ScanGeometry::new(batch, channels, state)),
        (None, None) => ScanPlan::new(batch, channels, seq, state),
    };
    let geometry = match plan {
        ScanPlan::Chunked { chunks } => {
            return crate::scan_chunked::launch(input, y, state_out, chunks);
        }
        ScanPlan::Tiled(geometry) => geometry,
    };
    let u = input.u;
    let client = u.client.clone();
    let dtype = u.dtype;
    let has_z = input.z.is_some();
    let z = input.z.unwrap_or_else(|| u.clone());
    let contiguous = into_contiguous::<R>;
    let (a, d, bias) = (
        contiguous(input.a),
        contiguous(input.d),
        contiguous(input.delta_bias),
    );
    if seq == 1 && checkpoints.is_none() && plan_in.is_none() {
        if let Some((width, per_unit)) = step_vectors(state, [&a, &input.state, &state_out]) {
            // 128 units per cube, 32 channels of 4 units (ncu, b 64, d 2048, N 16: 9.63 µs,
            // against 10.11 with 256 and 10.14 with 512).
            let units = 128;
            let groups = state / (width * per_unit);
            let per_cube = (units / groups).max(1);
            let cube_dim = CubeDim::new_2d(groups as u32, per_cube as u32);
            let cube_count = CubeCount::Static(channels.div_ceil(per_cube) as u32, batch as u32, 1);
            // SAFETY: as for the scalar step kernel below; the vector tensors' strides are
            // multiples of the width and their last stride is 1 (checked), so a channel's
            // state is whole vectors and vector `l < state / width` stays inside it.
            unsafe {
                scan_step_vec_kernel::launch_unchecked::<R>(
                    &client,
                    cube_count,
                    cube_dim,
                    width,
                    u.into_tensor_arg(),
                    input.delta.into_tensor_arg(),
                    z.into_tensor_arg(),
                    input.b.into_tensor_arg(),
                    input.c.into_tensor_arg(),
                    a.into_tensor_arg(),
                    d.into_tensor_arg(),
                    bias.into_tensor_arg(),
                    input.state.into_tensor_arg(),
                    y.into_tensor_arg(),
                    state_out.into_tensor_arg(),
                    channels as u32,
                    state,
                    width,
                    per_unit,
                    per_cube,
                    has_z,
                    input.delta_softplus,
                    dtype.into(),
                );
            }
            return;
        }
    }
    if seq == 1 && checkpoints.is_none() {
        let spu = step_spu;
        assert!(
            spu >= 1 && state % spu == 0,
            "states per unit {spu} must divide d_state {state}"
        );
        let groups = state / spu;
        let per_cube = (256 / groups).max(1);
        let cube_dim = CubeDim::new_2d(groups as u32, per_cube as u32);
        let cube_count = CubeCount::Static(channels.div_ceil(per_cube) as u32, batch as u32, 1);
        // SAFETY: every index is below the extent of the tensor it reads or writes: units with
        // a channel at or past `channels` only write their own shared-memory slot, `n` runs
        // below the state size the `a`, `b`, `c` and state tensors were checked to have, and
        // the cube grid's y is the batch.
        unsafe {
            scan_step_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                u.into_tensor_arg(),
                input.delta.into_tensor_arg(),
                z.into_tensor_arg(),
                input.b.into_tensor_arg(),
                input.c.into_tensor_arg(),
                a.into_tensor_arg(),
                d.into_tensor_arg(),
                bias.into_tensor_arg(),
                input.state.into_tensor_arg(),
                y.into_tensor_arg(),
                state_out.into_tensor_arg(),
                channels as u32,
                state,
                spu,
                per_cube,
                has_z,
                input.delta_softplus,
                dtype.into(),
            );
        }
        return;
    }
    assert!(
        geometry.states_per_unit >= 1 && state % geometry.states_per_unit == 0,
        "states per unit {} must divide d_state {state}",
        geometry.states_per_unit
    );
    let cb = geometry.channels_per_cube;
    let spu = geometry.states_per_unit;
    let cube_count = CubeCount::Static(channels.div_ceil(cb) as u32, batch as u32, 1);
    let cube_dim = CubeDim::new_1d((cb * state / spu) as u32);
    // SAFETY: units index channels below `channels` (guarded by `active`/`dd < channels`), steps
    // below `seq`, state indices below the state size, and shared memory within the sizes
    // computed from the same comptime geometry.
    unsafe {
        scan_fwd_kernel::launch_unchecked::<R>(
            &client,
            cube_count,
            cube_dim,
            u.into_tensor_arg(),
            input.delta.into_tensor_arg(),
            z.into_tensor_arg(),
            input.b.into_tensor_arg(),
            input.c.into_tensor_arg(),
            a.into_tensor_arg(),
            d.into_tensor_arg(),
            bias.into_tensor_arg(),
            input.state.into_tensor_arg(),
            y.into_tensor_arg(),
            state_out.clone().into_tensor_arg(),
            checkpoints.clone().unwrap_or(state_out).into_tensor_arg(),
            seq as u32,
            channels as u32,
            every.max(1) as u32,
            state,
            spu,
            cb,
            geometry.tile,
            has_z,
            input.delta_softplus,
            checkpoints.is_some(),
            dtype.into(),
        );
    }
}
