//! The selective scan split over time: a unit per (row, channel, chunk of time), every state
//! index of its channel in registers.
//!
//! The tiled kernel of [`crate::scan`] walks the whole sequence in one unit per (channel, state
//! index), so a problem has only `batch · channels · d_state` units: at batch 1 with 8,192
//! channels that is one partly filled wave, every barrier and global load of which stalls the
//! whole GPU. Here time is cut into `K` chunks and the scan runs in three launches:
//!
//! 1. **ends**: every chunk but the last runs the recurrence from a zero state (chunk 0 from the
//!    initial state) and records its end state `Eₖ` and `Sₖ = Σ Δ` over the chunk. No output.
//! 2. **carries**: one unit per (row, channel, state index) chains them, `Hₖ = e^{A·Sₖ}·Hₖ₋₁ +
//!    Eₖ` (the decay over a chunk is `Π e^{AΔₜ} = e^{A·ΣΔₜ}`), in place of `Eₖ`.
//! 3. **output**: every chunk runs again from its true initial state `Hₖ₋₁`, producing `y`; the
//!    last one writes the final state.
//!
//! The `exp` per (channel, state, step) is done twice (steps 1 and 3), which is the price of
//! enough units to fill the device; with `K = 1` (large batches, and the decoding step) only
//! step 3 runs. A unit owning all the state indices of its channel computes `softplus` and the
//! gate once per (channel, step) and sums the `C` contraction in registers (no shared-memory
//! reduction, no barrier per step); its `Δ`, `u` and `z` loads are coalesced across units
//! (consecutive channels) and issued a group of steps ahead. `B` and `C` are common to the cube
//! and staged through shared memory a tile at a time, as vectors of 4 states (one shared load
//! per 4 states: on the H200 the kernel is bound by instruction issue, ~76% of issue slots
//! busy, the exponential unit next at ~60%). For the same reason, on CUDA its exponentials and
//! logarithms are the bare flush-to-zero instructions and its divisions the fast ones
//! (`declare_ftz_intrinsics`): 7.5 and 10.2 instructions per (channel, state, step) in the
//! two passes' loops instead of 11.0 and 14.5.

use burn_cubecl::{
    CubeRuntime, kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype,
    tensor::CubeTensor,
};
use cubecl::prelude::*;
use cubecl::{ir::FastMath, prelude::Tensor as CubeArg};

use crate::scan::{ScanTensors, silu_f32, softplus_f32};

/// The largest `d_state` of the chunked kernel (a unit keeps `2·d_state` floats in registers).
pub const MAX_CHUNKED_STATE: usize = 16;

/// Channels (units) per cube (above 128 the shared memory exceeds WebGPU's guaranteed 16 KiB).
const CHANNELS_PER_CUBE: usize = 128;

/// Steps of `B` and `C` staged per barrier pair.
const BC_TILE: usize = 32;

/// Steps whose Δ, u and z loads are issued together, a group ahead of their use (4: 3-8% faster
/// than 1 on the H200, 8 slower).
const STEP_GROUP: usize = 4;

/// Whether the decay `e^(Δ·A)` and softplus' and the gate's `exp` and `log` use CUDA's
/// flush-to-zero instructions ([`declare_ftz_intrinsics`]: 11-15% faster on the H200). The decay
/// is computed as `2^(Δ·A·log₂e)` everywhere (`__powf(2, v)`: one multiply fewer per state and
/// step than `e^v`, 4-5% faster on the H200).
fn flush_to_zero(cuda: bool) -> bool {
    cuda
}

/// The shortest chunk the default plan makes: shorter ones spend more on the carries than they
/// gain in parallelism.
const MIN_CHUNK: usize = 32;

/// The number of units the default plan aims for: about one wave of the H200 (132
/// multiprocessors, ~1,000 resident units each at this kernel's register use). With the
/// flush-to-zero intrinsics, 16 chunks beat 32 at (4, 2048, 1024) by 10% and tie at
/// (1, 8192, 4096) (`run-h200.sh scan-ftz`); session 5's sweep, with a slower kernel, had
/// preferred two waves.
const TARGET_UNITS: usize = 1 << 17;

/// The longest chunk the default plan makes: at (1, 8192, 32768) chunks of 256 steps (K = 128)
/// took 4.49 ms in bf16 against 4.74 for the 1,024 steps that `TARGET_UNITS` alone gives
/// (session 5's sweep): more units hide latency better and even out the last wave.
const MAX_CHUNK: usize = 256;

/// How many chunks to cut a `[batch, seq, channels]` problem into: enough for about
/// `TARGET_UNITS` units and none longer than `MAX_CHUNK` steps, but none shorter than
/// `MIN_CHUNK`.
///
/// ```
/// use jamba_kernels::scan_chunked::default_chunks;
/// assert_eq!(default_chunks(1, 8192, 4096), 16);
/// assert_eq!(default_chunks(1, 8192, 32768), 128);
/// assert_eq!(default_chunks(4, 2048, 1024), 16);
/// ```
pub fn default_chunks(batch: usize, channels: usize, seq: usize) -> usize {
    let rows = (batch * channels).max(1);
    TARGET_UNITS
        .div_ceil(rows)
        .max(seq.div_ceil(MAX_CHUNK))
        .clamp(1, seq.div_ceil(MIN_CHUNK).max(1))
}

/// The chunk length and the number of non-empty chunks when `seq` is cut into about `chunks`.
fn chunk_layout(seq: usize, chunks: usize) -> (usize, usize) {
    let len = seq.div_ceil(chunks.clamp(1, seq.max(1))).max(1);
    (len, seq.div_ceil(len).max(1))
}

#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision
        | FastMath::NotNaN
        | FastMath::NotInf
        | FastMath::AllowReciprocal
        | FastMath::UnsignedZero
)]
#[allow(clippy::too_many_arguments)]
fn scan_chunk_kernel<F: Float, N: Size>(
    u: &CubeArg<F>,
    delta: &CubeArg<F>,
    z: &CubeArg<F>,
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    a: &CubeArg<f32>,
    dskip: &CubeArg<f32>,
    bias: &CubeArg<f32>,
    h0: &CubeArg<f32>,
    ends: &mut CubeArg<f32>,
    sums: &mut CubeArg<f32>,
    y: &mut CubeArg<F>,
    h_out: &mut CubeArg<f32>,
    seq: u32,
    channels: u32,
    chunk_len: u32,
    chunks: u32,
    #[comptime] n_state: usize,
    #[comptime] cb: usize,
    #[comptime] tile: usize,
    #[comptime] has_z: bool,
    #[comptime] softplus: bool,
    #[comptime] ends_only: bool,
    #[comptime] direct_bc: bool,
    #[comptime] width: usize,
    #[comptime] group: usize,
    #[comptime] ftz: bool,
    #[define(F)] _dtype: StorageType,
) {
    if comptime!(ftz) {
        declare_ftz_intrinsics();
    }
    let vectors = comptime!(n_state / width);
    let seq = seq as usize;
    let channels = channels as usize;
    let chunk_len = chunk_len as usize;
    let chunks = chunks as usize;
    let row = CUBE_POS_Y as usize;
    let k = CUBE_POS_Z as usize;
    let tid = UNIT_POS_X as usize;
    let d = CUBE_POS_X as usize * cb + tid;
    let active = d < channels;
    let t_begin = k * chunk_len;
    let t_end = min(seq, t_begin + chunk_len);
    let (b0, b1, b2) = (bmat.stride(0), bmat.stride(1), bmat.stride(2));
    let (c0, c1, c2) = (cmat.stride(0), cmat.stride(1), cmat.stride(2));

    // `A` and the chunk's initial state (the scan's for chunk 0; the carry for the others in
    // the output pass, zero in the ends pass) pass through shared memory: the cube reads its
    // `[cb, n_state]` block with consecutive units on consecutive addresses, then each unit
    // takes its channel's row. (Read directly, every load instruction of a warp would touch
    // 32 cache lines; the decoding step, which does little else, spent most of its time there.)
    let d0 = CUBE_POS_X as usize * cb;
    let row_stride = comptime!(if n_state % 2 == 0 {
        n_state + 1
    } else {
        n_state
    });
    let mut s_rows = SharedMemory::<f32>::new(comptime!(cb * row_stride));
    let (e0, e1, e2, e3) = (
        ends.stride(0),
        ends.stride(1),
        ends.stride(2),
        ends.stride(3),
    );
    let mut a_n = Array::<f32>::new(n_state);
    let mut h = Array::<f32>::new(n_state);
    #[unroll]
    for j in 0..n_state {
        let e = j * cb + tid;
        let dd = d0 + e / n_state;
        let n = e % n_state;
        let mut v = 0.0f32;
        if dd < channels {
            v = a[dd * a.stride(0) + n * a.stride(1)];
        }
        s_rows[(e / n_state) * row_stride + n] = v;
    }
    sync_cube();
    // For the `2^v` form, `A·log₂e`.
    #[unroll]
    for n in 0..n_state {
        let v = s_rows[tid * row_stride + n];
        a_n[n] = v * LOG2_E;
    }
    sync_cube();
    let from_h0 = k == 0;
    let mut from_ends = false;
    if comptime!(!ends_only) {
        from_ends = k > 0;
    }
    #[unroll]
    for j in 0..n_state {
        let e = j * cb + tid;
        let dd = d0 + e / n_state;
        let n = e % n_state;
        let mut v = 0.0f32;
        if dd < channels {
            if from_h0 {
                v = h0[row * h0.stride(0) + dd * h0.stride(1) + n * h0.stride(2)];
            } else if from_ends {
                v = ends[row * e0 + (k - 1) * e1 + dd * e2 + n * e3];
            }
        }
        s_rows[(e / n_state) * row_stride + n] = v;
    }
    sync_cube();
    #[unroll]
    for n in 0..n_state {
        h[n] = s_rows[tid * row_stride + n];
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

    // Δ, u and z of the next `group` steps, loaded while the current group is computed and
    // kept in the input dtype: converting right after the load would wait for it there, and
    // the prefetch would hide nothing.
    let mut cur_dl = Array::<F>::new(group);
    let mut cur_u = Array::<F>::new(group);
    let mut cur_z = Array::<F>::new(group);
    let mut next_dl = Array::<F>::new(group);
    let mut next_u = Array::<F>::new(group);
    let mut next_z = Array::<F>::new(group);
    #[unroll]
    for p in 0..group {
        next_dl[p] = F::new(0.0);
        next_u[p] = F::new(0.0);
        next_z[p] = F::new(0.0);
        if active && t_begin + p < t_end {
            next_dl[p] = delta[dl_at + (t_begin + p) * dl1];
            next_u[p] = u[u_at + (t_begin + p) * u1];
            if comptime!(has_z && !ends_only) {
                next_z[p] = z[z_at + (t_begin + p) * z1];
            }
        }
    }

    // B and C of a tile go through shared memory as vectors of `width` states; the next
    // tile's are loaded into registers while this one is computed. (One decoding step reads
    // them directly: nothing to overlap.)
    let staged = comptime!(if direct_bc { 1 } else { tile * vectors });
    let per_unit = comptime!(staged.div_ceil(cb));
    let mut s_b = SharedMemory::<Vector<f32, N>>::new(staged);
    let mut s_c = SharedMemory::<Vector<f32, N>>::new(staged);
    let mut r_b = Array::<F>::new(comptime!(per_unit * width));
    let mut r_c = Array::<F>::new(comptime!(per_unit * width));
    if comptime!(!direct_bc) {
        load_bc_tile::<F>(
            bmat, cmat, &mut r_b, &mut r_c, row, t_begin, t_end, b0, b1, b2, c0, c1, c2, tid,
            n_state, cb, tile, width, ends_only,
        );
    }

    let mut sum_dt = 0.0f32;
    let mut t0 = t_begin;
    while t0 < t_end {
        let steps = min(tile, t_end - t0);
        if comptime!(!direct_bc) {
            #[unroll]
            for j in 0..per_unit {
                let i = tid + j * cb;
                if i < staged {
                    let mut vb = Vector::<f32, N>::empty();
                    let mut vc = Vector::<f32, N>::empty();
                    #[unroll]
                    for l in 0..width {
                        vb[l] = f32::cast_from(r_b[j * width + l]);
                        vc[l] = f32::cast_from(r_c[j * width + l]);
                    }
                    s_b[i] = vb;
                    s_c[i] = vc;
                }
            }
            sync_cube();
            load_bc_tile::<F>(
                bmat,
                cmat,
                &mut r_b,
                &mut r_c,
                row,
                t0 + tile,
                t_end,
                b0,
                b1,
                b2,
                c0,
                c1,
                c2,
                tid,
                n_state,
                cb,
                tile,
                width,
                ends_only,
            );
        }

        let mut g = 0;
        while g < steps {
            // This group's inputs out of the prefetch registers, the next group's loads issued.
            #[unroll]
            for p in 0..group {
                cur_dl[p] = next_dl[p];
                cur_u[p] = next_u[p];
                cur_z[p] = next_z[p];
            }
            #[unroll]
            for p in 0..group {
                let tn = t0 + g + group + p;
                if active && tn < t_end {
                    next_dl[p] = delta[dl_at + tn * dl1];
                    next_u[p] = u[u_at + tn * u1];
                    if comptime!(has_z && !ends_only) {
                        next_z[p] = z[z_at + tn * z1];
                    }
                }
            }
            #[unroll]
            for p in 0..group {
                let t = g + p;
                let tt = t0 + t;
                if active && t < steps {
                    let mut x = f32::cast_from(cur_dl[p]) + bias_d;
                    if comptime!(softplus) {
                        x = softplus_f32(x);
                    }
                    let uv = f32::cast_from(cur_u[p]);
                    let xu = x * uv;
                    sum_dt += x;
                    let mut acc = 0.0f32;
                    #[unroll]
                    for q in 0..vectors {
                        let mut bv = Vector::<f32, N>::empty();
                        let mut cv = Vector::<f32, N>::empty();
                        if comptime!(direct_bc) {
                            #[unroll]
                            for l in 0..width {
                                let n = q * width + l;
                                bv[l] = f32::cast_from(bmat[row * b0 + tt * b1 + n * b2]);
                                if comptime!(!ends_only) {
                                    cv[l] = f32::cast_from(cmat[row * c0 + tt * c1 + n * c2]);
                                }
                            }
                        } else {
                            bv = s_b[t * vectors + q];
                            if comptime!(!ends_only) {
                                cv = s_c[t * vectors + q];
                            }
                        }
                        // `h·C` summed per vector, then across: a shorter dependent chain.
                        let mut part = 0.0f32;
                        #[unroll]
                        for l in 0..width {
                            let n = q * width + l;
                            let hn = hardware_exp(x * a_n[n]) * h[n] + xu * bv[l];
                            h[n] = hn;
                            if comptime!(!ends_only) {
                                part += hn * cv[l];
                            }
                        }
                        acc += part;
                    }
                    if comptime!(!ends_only) {
                        acc += skip_d * uv;
                        if comptime!(has_z) {
                            acc *= silu_f32(f32::cast_from(cur_z[p]));
                        }
                        y[y_at + tt * y1] = F::cast_from(acc);
                    }
                }
            }
            g += group;
        }
        if comptime!(!direct_bc) {
            sync_cube();
        }
        t0 += tile;
    }

    // The end state back through shared memory, stored with consecutive units on consecutive
    // addresses (the branch is uniform over the cube, so its barrier is reached by all).
    let mut store_end = k + 1 == chunks;
    if comptime!(ends_only) {
        store_end = true;
    }
    if store_end {
        sync_cube();
        #[unroll]
        for n in 0..n_state {
            s_rows[tid * row_stride + n] = h[n];
        }
        sync_cube();
        #[unroll]
        for j in 0..n_state {
            let e = j * cb + tid;
            let dd = d0 + e / n_state;
            let n = e % n_state;
            if dd < channels {
                let v = s_rows[(e / n_state) * row_stride + n];
                if comptime!(ends_only) {
                    ends[row * e0 + k * e1 + dd * e2 + n * e3] = v;
                } else {
                    h_out[row * h_out.stride(0) + dd * h_out.stride(1) + n * h_out.stride(2)] = v;
                }
            }
        }
        if comptime!(ends_only) {
            if active {
                sums[row * sums.stride(0) + k * sums.stride(1) + d * sums.stride(2)] = sum_dt;
            }
        }
    }
}

/// `2^v` (its argument scaled by `log₂ e` beforehand) with the reduced-precision intrinsics.
/// CUDA's `__expf(v)` is `ex2.approx(v · log₂ e)`, a multiply more per (channel, state, step)
/// than a bare power of two; `__powf(2, v)`, what CubeCL emits here, compiles to the same SASS
/// as `exp2f(v)` and made the scan 4-5% faster on the H200. On WGSL it is `pow(2, v)`.
#[cube]
fn hardware_exp(v: f32) -> f32 {
    f32::powf(f32::new(2.0), v)
}

/// Makes the kernel's `__powf(2, v)`, `__expf` and `__logf` calls CUDA's flush-to-zero
/// `ex2.approx.ftz.f32` and `lg2.approx.ftz.f32` (CUDA only: the kernel calls `__powf` with
/// base 2 alone).
///
/// NVRTC compiles CubeCL's kernels without `-ftz`, so every `__powf`, `exp2f` or `__expf`
/// becomes `ex2.approx.f32`, which ptxas guards against subnormal results: a compare and two
/// predicated multiplies around each `MUFU.EX2` (`run-h200.sh scan-sass`, kernel `exp_forms`;
/// clamping the argument does not remove them). In this kernel, bound by instruction issue,
/// that was 3 of the ~11 instructions per (channel, state, step) of the ends pass. CubeCL has
/// no intrinsic for the bare instructions and no way to pass NVRTC flags, so the kernel carries
/// a comment that closes itself and defines the three as inline `asm`; results below 2⁻¹²⁶
/// become 0 instead of subnormals (a decay that small is already exact zero in effect, and
/// softplus' `ln(1 + e^{−|x|})` and the gate's `e^{−x}` do not care). WGSL never sees this: the
/// form is chosen on the host from the runtime's name.
#[cube]
fn declare_ftz_intrinsics() {
    comment!(
        "jamba-kernels: flush-to-zero ex2 and lg2 (scan_chunked::declare_ftz_intrinsics)\n*/\n#define jamba_ftz(op, x) ([](float jamba_v) { float jamba_r; asm(op \" %0, %1;\" : \"=f\"(jamba_r) : \"f\"(jamba_v)); return jamba_r; }(x))\n#define __powf(base, v) jamba_ftz(\"ex2.approx.ftz.f32\", v)\n#define __expf(v) jamba_ftz(\"ex2.approx.ftz.f32\", (v) * 1.44269504f)\n#define __logf(v) (jamba_ftz(\"lg2.approx.ftz.f32\", v) * 0.693147181f)\n/*"
    );
}

/// `log₂ e`, for the `2^v` form of the decay.
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Loads this unit's share of `B` and `C` for the tile of steps from `t0` (zeros past `t_end`)
/// into registers, `width` consecutive states per staged vector, in the input dtype; the loads
/// are issued together and not waited for here.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_bc_tile<F: Float>(
    bmat: &CubeArg<F>,
    cmat: &CubeArg<F>,
    r_b: &mut Array<F>,
    r_c: &mut Array<F>,
    row: usize,
    t0: usize,
    t_end: usize,
    b0: usize,
    b1: usize,
    b2: usize,
    c0: usize,
    c1: usize,
    c2: usize,
    tid: usize,
    #[comptime] n_state: usize,
    #[comptime] cb: usize,
    #[comptime] tile: usize,
    #[comptime] width: usize,
    #[comptime] ends_only: bool,
) {
    let vectors = comptime!(n_state / width);
    let staged = comptime!(tile * vectors);
    #[unroll]
    for j in 0..comptime!(staged.div_ceil(cb)) {
        let i = tid + j * cb;
        let tt = t0 + i / vectors;
        let n0 = (i % vectors) * width;
        #[unroll]
        for l in 0..width {
            r_b[j * width + l] = F::new(0.0);
            r_c[j * width + l] = F::new(0.0);
            if i < staged && tt < t_end {
                r_b[j * width + l] = bmat[row * b0 + tt * b1 + (n0 + l) * b2];
                if comptime!(!ends_only) {
                    r_c[j * width + l] = cmat[row * c0 + tt * c1 + (n0 + l) * c2];
                }
            }
        }
    }
}

/// Chains the chunk end states into true ones, in place: `ends[k] ← e^{A·sums[k]}·ends[k − 1] +
/// ends[k]` for `k ≥ 1` (`ends[0]` already started from the scan's initial state).
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
fn scan_carry_kernel(
    a: &CubeArg<f32>,
    ends: &mut CubeArg<f32>,
    sums: &CubeArg<f32>,
    channels: u32,
    entries: u32,
    #[comptime] n_state: usize,
    #[comptime] group: usize,
) {
    let channels = channels as usize;
    let entries = entries as usize;
    let row = CUBE_POS_Y as usize;
    let i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let d = i / n_state;
    let n = i % n_state;
    if d < channels {
        let a_dn = a[d * a.stride(0) + n * a.stride(1)];
        let (e1, s1) = (ends.stride(1), sums.stride(1));
        let e_at = row * ends.stride(0) + d * ends.stride(2) + n * ends.stride(3);
        let s_at = row * sums.stride(0) + d * sums.stride(2);
        let mut h = ends[e_at];
        let mut k = 1usize;
        while k < entries {
            // A group's loads first, then its stores: the loads do not wait on each other.
            let mut e = Array::<f32>::new(group);
            let mut s = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                e[g] = 0.0;
                s[g] = 0.0;
                if k + g < entries {
                    e[g] = ends[e_at + (k + g) * e1];
                    s[g] = sums[s_at + (k + g) * s1];
                }
            }
            #[unroll]
            for g in 0..group {
                if k + g < entries {
                    h = (a_dn * s[g]).exp() * h + e[g];
                    ends[e_at + (k + g) * e1] = h;
                }
            }
            k += group;
        }
    }
}

/// Whether the chunked kernel takes a state of this size.
pub fn supports_state(state: usize) -> bool {
    (1..=MAX_CHUNKED_STATE).contains(&state)
}

/// The chunked scan into `y` and `state_out` (see the module documentation), time cut into about
/// `chunks` chunks. The state size must satisfy [`supports_state`].
pub(crate) fn launch<R: CubeRuntime>(
    input: ScanTensors<R>,
    y: CubeTensor<R>,
    state_out: CubeTensor<R>,
    chunks: usize,
) {
    let shape = input.u.meta.shape().clone();
    let (batch, seq, channels) = (shape[0], shape[1], shape[2]);
    let state = input.a.meta.shape()[1];
    assert!(
        supports_state(state),
        "chunked scan: d_state {state} above {MAX_CHUNKED_STATE}"
    );
    if batch == 0 || channels == 0 || seq == 0 {
        return;
    }
    let (chunk_len, chunks) = chunk_layout(seq, chunks);
    let client = input.u.client.clone();
    let device = input.u.device.clone();
    let f32_dtype = input.state.dtype;
    let dtype = input.u.dtype;
    let has_z = input.z.is_some();
    let z = input.z.clone().unwrap_or_else(|| input.u.clone());
    let (a, d, bias) = (
        into_contiguous(input.a),
        into_contiguous(input.d),
        into_contiguous(input.delta_bias),
    );
    let cb = CHANNELS_PER_CUBE;
    let group = STEP_GROUP;
    // Whole groups per tile: a group's prefetch runs into the next tile's first steps.
    let tile = BC_TILE.next_multiple_of(group);
    // B and C staged as vectors of 4 (or 2, or 1) states: one shared-memory load each.
    let width = [4, 2, 1].into_iter().find(|w| state % w == 0).unwrap_or(1);
    let ftz = flush_to_zero(R::name(&client) == "cuda");
    let cubes_x = channels.div_ceil(cb) as u32;
    let cube_dim = CubeDim::new_1d(cb as u32);
    let entries = chunks - 1;
    let (ends, sums) = if entries > 0 {
        (
            empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                [batch, entries, channels, state].into(),
                f32_dtype,
            ),
            empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                [batch, entries, channels].into(),
                f32_dtype,
            ),
        )
    } else {
        // Unread one-element placeholders: the output pass of a single chunk starts from `h0`.
        (
            empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                [1, 1, 1, 1].into(),
                f32_dtype,
            ),
            empty_device_contiguous_dtype(
                client.clone(),
                device.clone(),
                [1, 1, 1].into(),
                f32_dtype,
            ),
        )
    };

    let pass = |ends_only: bool, count: usize| {
        // SAFETY: units index channels below `channels` (guarded by `active`), steps below
        // `seq` (chunks end at `min(seq, ..)`), state indices below the state size of `a`,
        // `h0`, `B`, `C` and the state buffers, chunk entries below `entries` (the ends pass
        // writes `k < chunks − 1`, the output pass reads `k − 1`), and shared memory within the
        // comptime sizes it was declared with.
        unsafe {
            scan_chunk_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(cubes_x, batch as u32, count as u32),
                cube_dim,
                width,
                input.u.clone().into_tensor_arg(),
                input.delta.clone().into_tensor_arg(),
                z.clone().into_tensor_arg(),
                input.b.clone().into_tensor_arg(),
                input.c.clone().into_tensor_arg(),
                a.clone().into_tensor_arg(),
                d.clone().into_tensor_arg(),
                bias.clone().into_tensor_arg(),
                input.state.clone().into_tensor_arg(),
                ends.clone().into_tensor_arg(),
                sums.clone().into_tensor_arg(),
                y.clone().into_tensor_arg(),
                state_out.clone().into_tensor_arg(),
                seq as u32,
                channels as u32,
                chunk_len as u32,
                chunks as u32,
                state,
                cb,
                tile,
                has_z,
                input.delta_softplus,
                ends_only,
                seq == 1,
                width,
                group,
                ftz,
                dtype.into(),
            );
        }
    };

    if entries > 0 {
        pass(true, entries);
        let units = channels * state;
        let per_cube = 256usize;
        // SAFETY: `i = d·state + n` is checked against `channels` before any access, the row
        // is the grid's y, and entries run below the `entries` the buffers were made with.
        unsafe {
            scan_carry_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(units.div_ceil(per_cube) as u32, batch as u32, 1),
                CubeDim::new_1d(per_cube as u32),
                a.clone().into_tensor_arg(),
                ends.clone().into_tensor_arg(),
                sums.clone().into_tensor_arg(),
                channels as u32,
                entries as u32,
                state,
                8,
            );
        }
    }
    pass(false, chunks);
}
