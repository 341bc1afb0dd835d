//! The selective scan with one `exp` per (channel, state, step): time sliced across the planes
//! of a cube, the states walked one at a time.
//!
//! The chunked kernel of [`crate::scan_chunked`] gets its parallelism at batch 1 by running
//! every chunk of time twice (once for its end state, once for the output), so it pays the
//! `exp` that bounds the scan twice. Here a cube owns 32 channels (its x, the lanes: loads of
//! `Δ`, `u`, `z` and stores of `y` stay coalesced, `B` and `C` are broadcasts) and `slices`
//! consecutive slices of `steps` time steps each (its y): a tile of `slices · steps` steps at a
//! time, walked through the sequence. For each state index `n` in turn, every unit
//!
//! 1. computes `aᵢ = e^{Δᵢ·Aₙ}` and `bᵢ = Δᵢ·uᵢ·Bᵢₙ` for its slice's steps, keeping them in
//!    registers, and runs the recurrence from zero: the slice's decay `Π aᵢ` and end state;
//! 2. after a barrier, composes the end states of the slices before its own onto the tile's
//!    incoming state (held in shared memory, double-buffered over tiles), which gives its own
//!    incoming state; the last slice also records the tile's outgoing one;
//! 3. reruns its steps from that state with the kept `aᵢ`, `bᵢ` (no second `exp`), adding
//!    `hᵢ·Cᵢₙ` to its per-step outputs.
//!
//! Then `D·u` and the gate, and `y` is written. The only repeated work is step 3's two FMAs per
//! element and step 2's composition, `O(slices)` per state and slice.

use burn_cubecl::{CubeRuntime, kernel::into_contiguous, tensor::CubeTensor};
use cubecl::prelude::*;
use cubecl::{ir::FastMath, prelude::Tensor as CubeArg};

use std::sync::OnceLock;

use crate::env_usize;
use crate::scan::{ScanTensors, silu_f32, softplus_f32};

/// The largest `d_state` of the sliced kernel (its `B`, `C` tile and incoming states sit in
/// shared memory).
pub const MAX_SLICED_STATE: usize = 16;

/// Channels per cube: the lanes of a plane.
const CHANNELS: usize = 32;

/// Whether the sliced kernel takes a state of this size.
pub fn supports_state(state: usize) -> bool {
    (1..=MAX_SLICED_STATE).contains(&state)
}

/// How a sliced launch cuts time: `slices` slices (planes) per cube of `steps` steps each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slicing {
    /// Slices of time per cube (the cube's planes), 1 to 32.
    pub slices: usize,
    /// Steps per slice (kept in registers: five floats each), 1 to 32.
    pub steps: usize,
}

impl Slicing {
    /// The default: 8 slices of 8 steps (`JAMBA_SCAN_SLICES` and `JAMBA_SCAN_SLICE_STEPS`
    /// override them, for tuning), fewer slices where shared memory is short (WebGPU
    /// guarantees 16 KiB).
    pub fn new(state: usize, max_shared_bytes: usize) -> Self {
        static SLICES: OnceLock<Option<usize>> = OnceLock::new();
        static STEPS: OnceLock<Option<usize>> = OnceLock::new();
        let steps = env_usize(&STEPS, "JAMBA_SCAN_SLICE_STEPS")
            .filter(|s| (1..=32).contains(s))
            .unwrap_or(8);
        let mut slices = env_usize(&SLICES, "JAMBA_SCAN_SLICES")
            .filter(|s| (1..=32).contains(s))
            .unwrap_or(8);
        while slices > 1 && (Self { slices, steps }).shared_bytes(state) > max_shared_bytes {
            slices /= 2;
        }
        Self { slices, steps }
    }

    /// Shared memory of a cube, in bytes: the `B` and `C` tile, the slices' (decay, end)
    /// pairs twice, the incoming states twice and `A`.
    pub fn shared_bytes(&self, state: usize) -> usize {
        let tile = self.slices * self.steps * state;
        4 * (2 * tile + 4 * self.slices * CHANNELS + 3 * state * CHANNELS)
    }
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn scan_sliced_kernel<F: Float>(
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
    seq: u32,
    channels: u32,
    #[comptime] n_state: usize,
    #[comptime] slices: usize,
    #[comptime] steps: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[define(F)] _dtype: StorageType,
) {
    let cw = comptime!(CHANNELS);
    let units = comptime!(CHANNELS * slices);
    let span = comptime!(slices * steps);
    let seq = seq as usize;
    let channels = channels as usize;
    let c = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let tid = s * cw + c;
    let row = CUBE_POS_Y as usize;
    let d0 = CUBE_POS_X as usize * cw;
    let d = d0 + c;
    let active = d < channels;

    let mut s_b = SharedMemory::<f32>::new(comptime!(span * n_state));
    let mut s_c = SharedMemory::<f32>::new(comptime!(span * n_state));
    // The slices' (decay, end state) for one state index, two buffers: state n uses n % 2, so
    // a unit still composing state n never sees state n + 1's writes (a barrier lies between
    // n + 1's writes and n + 2's, which reuse the buffer).
    let mut s_decay = SharedMemory::<f32>::new(comptime!(2 * slices * CHANNELS));
    let mut s_end = SharedMemory::<f32>::new(comptime!(2 * slices * CHANNELS));
    // The tile's incoming state, `[parity][n][channel]`: tile k reads parity k % 2 and its last
    // slice writes the other, which tile k + 1 reads.
    let mut s_in = SharedMemory::<f32>::new(comptime!(2 * n_state * CHANNELS));
    let mut s_a = SharedMemory::<f32>::new(comptime!(n_state * CHANNELS));

    let mut j = tid;
    while j < comptime!(n_state * CHANNELS) {
        let n = j / cw;
        let dd = d0 + j % cw;
        let mut av = 0.0f32;
        let mut hv = 0.0f32;
        if dd < channels {
            av = a[dd * a.stride(0) + n * a.stride(1)];
            hv = h0[row * h0.stride(0) + dd * h0.stride(1) + n * h0.stride(2)];
        }
        s_a[j] = av;
        s_in[j] = hv;
        j += units;
    }
    let mut bias_d = 0.0f32;
    let mut skip_d = 0.0f32;
    if active {
        bias_d = bias[d];
        skip_d = dskip[d];
    }
    let (u1, dl1, z1, y1) = (u.stride(1), delta.stride(1), z.stride(1), y.stride(1));
    let u_at = row * u.stride(0) + d * u.stride(2);
    let dl_at = row * delta.stride(0) + d * delta.stride(2);
    let z_at = row * z.stride(0) + d * z.stride(2);
    let y_at = row * y.stride(0) + d * y.stride(2);
    let (b0, b1, b2) = (bmat.stride(0), bmat.stride(1), bmat.stride(2));
    let (c0, c1, c2) = (cmat.stride(0), cmat.stride(1), cmat.stride(2));

    let mut dl = Array::<f32>::new(steps);
    let mut du = Array::<f32>::new(steps);
    let mut acc = Array::<f32>::new(steps);
    let mut ai = Array::<f32>::new(steps);
    let mut bi = Array::<f32>::new(steps);

    let mut parity = 0usize;
    let mut t0 = 0usize;
    while t0 < seq {
        // Stage the tile's B and C (zeros past the end).
        let mut j = tid;
        while j < comptime!(span * n_state) {
            let tt = t0 + j / n_state;
            let n = j % n_state;
            let mut bv = 0.0f32;
            let mut cv = 0.0f32;
            if tt < seq {
                bv = f32::cast_from(bmat[row * b0 + tt * b1 + n * b2]);
                cv = f32::cast_from(cmat[row * c0 + tt * c1 + n * c2]);
            }
            s_b[j] = bv;
            s_c[j] = cv;
            j += units;
        }
        // This slice's Δ and Δ·u; past the end Δ = 0, which makes the step the identity.
        let first = t0 + s * steps;
        #[unroll]
        for i in 0..steps {
            let tt = first + i;
            let mut x = 0.0f32;
            let mut xu = 0.0f32;
            if active && tt < seq {
                x = f32::cast_from(delta[dl_at + tt * dl1]) + bias_d;
                if comptime!(softplus) {
                    x = softplus_f32(x);
                }
                xu = x * f32::cast_from(u[u_at + tt * u1]);
            }
            dl[i] = x;
            du[i] = xu;
            acc[i] = 0.0;
        }
        sync_cube();

        let bc0 = s * comptime!(steps * n_state);
        for n in 0..n_state {
            let an = s_a[n * cw + c];
            // 1. The slice from a zero state, keeping every step's decay and input.
            let mut h = 0.0f32;
            let mut decay = 1.0f32;
            #[unroll]
            for i in 0..steps {
                let e = (dl[i] * an).exp();
                let b = du[i] * s_b[bc0 + i * n_state + n];
                ai[i] = e;
                bi[i] = b;
                h = e * h + b;
                decay *= e;
            }
            let buf = (n % 2) * comptime!(slices * CHANNELS);
            s_decay[buf + s * cw + c] = decay;
            s_end[buf + s * cw + c] = h;
            sync_cube();
            // 2. The incoming state: the tile's, through the slices before this one.
            let in_at = parity * comptime!(n_state * CHANNELS) + n * cw + c;
            let mut hin = s_in[in_at];
            for k in 0..s {
                hin = s_decay[buf + k * cw + c] * hin + s_end[buf + k * cw + c];
            }
            if s + 1 == slices {
                let out_at = (1 - parity) * comptime!(n_state * CHANNELS) + n * cw + c;
                s_in[out_at] = decay * hin + h;
            }
            // 3. The true states, and their C contraction.
            let mut hh = hin;
            #[unroll]
            for i in 0..steps {
                hh = ai[i] * hh + bi[i];
                acc[i] += hh * s_c[bc0 + i * n_state + n];
            }
        }

        #[unroll]
        for i in 0..steps {
            let tt = first + i;
            if active && tt < seq {
                let mut out = acc[i] + skip_d * f32::cast_from(u[u_at + tt * u1]);
                if comptime!(has_z) {
                    out *= silu_f32(f32::cast_from(z[z_at + tt * z1]));
                }
                y[y_at + tt * y1] = F::cast_from(out);
            }
        }
        // The next tile restages B and C and reads the states the last slice wrote.
        sync_cube();
        parity = 1 - parity;
        t0 += span;
    }

    // (A barrier of its own: with no step at all, the states were written by other units.)
    sync_cube();
    let mut j = tid;
    while j < comptime!(n_state * CHANNELS) {
        let n = j / cw;
        let dd = d0 + j % cw;
        if dd < channels {
            h_out[row * h_out.stride(0) + dd * h_out.stride(1) + n * h_out.stride(2)] =
                s_in[parity * comptime!(n_state * CHANNELS) + j];
        }
        j += units;
    }
}

/// The sliced scan into `y` and `state_out` (see the module documentation). The state size must
/// satisfy [`supports_state`]; `slicing` must fit the runtime's shared memory.
pub(crate) fn launch<R: CubeRuntime>(
    input: ScanTensors<R>,
    y: CubeTensor<R>,
    state_out: CubeTensor<R>,
    slicing: Slicing,
) {
    let shape = input.u.meta.shape().clone();
    let (batch, seq, channels) = (shape[0], shape[1], shape[2]);
    let state = input.a.meta.shape()[1];
    assert!(
        supports_state(state),
        "sliced scan: d_state {state} above {MAX_SLICED_STATE}"
    );
    assert!(
        (1..=32).contains(&slicing.slices) && (1..=32).contains(&slicing.steps),
        "sliced scan: {slicing:?} outside 1..=32"
    );
    if batch == 0 || channels == 0 {
        return;
    }
    let client = input.u.client.clone();
    let dtype = input.u.dtype;
    let has_z = input.z.is_some();
    let z = input.z.clone().unwrap_or_else(|| input.u.clone());
    let (a, d, bias) = (
        into_contiguous(input.a),
        into_contiguous(input.d),
        into_contiguous(input.delta_bias),
    );
    // SAFETY: units index channels below `channels` (guarded by `active` and `dd < channels`),
    // steps below `seq`, state indices below the state size of `a`, `h0`, `B`, `C` and the
    // state buffers, and shared memory within the comptime sizes it was declared with (`s`
    // below `slices`, `c` below 32, `i` below `steps`).
    unsafe {
        scan_sliced_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(channels.div_ceil(CHANNELS) as u32, batch as u32, 1),
            CubeDim::new_2d(CHANNELS as u32, slicing.slices as u32),
            input.u.into_tensor_arg(),
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
            seq as u32,
            channels as u32,
            state,
            slicing.slices,
            slicing.steps,
            has_z,
            input.delta_softplus,
            dtype.into(),
        );
    }
}
