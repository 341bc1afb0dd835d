//! The selective scan on the host: one pass over time with each block of channels' state in
//! registers, the channels split across threads (the recurrence is independent per channel).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::math::{dot, exp_fast, silu, softplus, tree_sum};
use super::{BLOCK, Shared, for_channel_ranges, values};
use crate::ops::{ScanInput, ScanOutput};

/// The host scan's inputs as f32 slices, and its outputs.
struct ScanArgs<'a> {
    u: &'a [f32],
    delta: &'a [f32],
    z: Option<&'a [f32]>,
    b: &'a [f32],
    c: &'a [f32],
    a: &'a [f32],
    d: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    h_in: &'a [f32],
    softplus: bool,
    batch: usize,
    seq: usize,
    channels: usize,
    state: usize,
    y: &'a Shared,
    h: &'a Shared,
}

/// One step's per-channel inputs for a block of [`BLOCK`] channels starting at flat index `row`
/// (`width` of them real, the rest padded): `Δ` (bias added, softplus applied if asked), `u`,
/// and the gate `silu(z)` (ones without `z`). The channels are the lanes.
#[inline(always)]
fn block_inputs(
    p: &ScanArgs<'_>,
    row: usize,
    width: usize,
    bias: &[f32; BLOCK],
) -> ([f32; BLOCK], [f32; BLOCK], [f32; BLOCK]) {
    let (mut dt, mut x, mut gate) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [1.0f32; BLOCK]);
    dt[..width].copy_from_slice(&p.delta[row..row + width]);
    x[..width].copy_from_slice(&p.u[row..row + width]);
    if let Some(z) = p.z {
        gate[..width].copy_from_slice(&z[row..row + width]);
        for g in &mut gate {
            *g = silu(*g);
        }
    }
    for (d, bv) in dt.iter_mut().zip(bias) {
        *d += bv;
    }
    if p.softplus {
        for d in &mut dt {
            *d = softplus(*d);
        }
    }
    (dt, x, gate)
}

simd_dispatch! {
    /// The recurrence for the channels in `range`, every row, all steps. Jamba's 16 states get
    /// a fixed-size form (the block's state and `A` in local arrays the compiler keeps in
    /// registers, where a runtime-sized buffer goes through memory at every step).
    fn scan_channels(p: &ScanArgs<'_>, range: std::ops::Range<usize>) {
        if p.state == 16 {
            long_scan::<16>(p, range)
        } else {
            long_scan::<0>(p, range)
        }
    }
}

/// [`scan_channels`]'s loop; `N` is the state size, or 0 for "read it from `p`".
#[inline(always)]
fn long_scan<const N: usize>(p: &ScanArgs<'_>, range: std::ops::Range<usize>) {
    const W: usize = BLOCK;
    let (seq, channels) = (p.seq, p.channels);
    let n_state = if N > 0 { N } else { p.state };
    // State-major within a block: `h[n]` holds state n of the block's W channels, so every
    // update below is one W-wide operation.
    let mut h_heap = vec![[0.0f32; W]; if N > 0 { 0 } else { n_state }];
    let mut at_heap = vec![[0.0f32; W]; if N > 0 { 0 } else { n_state }];
    let (mut h_fixed, mut at_fixed) = ([[0.0f32; W]; N], [[0.0f32; W]; N]);
    let (h, at): (&mut [[f32; W]], &mut [[f32; W]]) = if N > 0 {
        (&mut h_fixed, &mut at_fixed)
    } else {
        (&mut h_heap, &mut at_heap)
    };
    for b in 0..p.batch {
        for lo in range.clone().step_by(W) {
            let width = W.min(range.end - lo);
            // Lanes past `width` run with A = 0, Δu = 0: a state that stays zero.
            let (mut bias, mut dskip) = ([0.0f32; W], [0.0f32; W]);
            for n in 0..n_state {
                h[n] = [0.0; W];
                at[n] = [0.0; W];
            }
            for j in 0..width {
                let ch = lo + j;
                bias[j] = p.bias.map_or(0.0, |v| v[ch]);
                dskip[j] = p.d.map_or(0.0, |v| v[ch]);
                for n in 0..n_state {
                    at[n][j] = p.a[ch * n_state + n];
                    h[n][j] = p.h_in[(b * channels + ch) * n_state + n];
                }
            }
            for t in 0..seq {
                let row = (b * seq + t) * channels + lo;
                let (dt, x, gate) = block_inputs(p, row, width, &bias);
                let mut du = [0.0f32; W];
                for j in 0..W {
                    du[j] = dt[j] * x[j];
                }
                let bt = &p.b[(b * seq + t) * n_state..][..n_state];
                let ct = &p.c[(b * seq + t) * n_state..][..n_state];
                let mut acc = [0.0f32; W];
                for n in 0..n_state {
                    let (bn, cn, hn, an) = (bt[n], ct[n], &mut h[n], &at[n]);
                    for j in 0..W {
                        hn[j] = exp_fast(dt[j] * an[j]) * hn[j] + du[j] * bn;
                        acc[j] += hn[j] * cn;
                    }
                }
                for j in 0..width {
                    let v = (acc[j] + dskip[j] * x[j]) * gate[j];
                    // SAFETY: (b, t, ch) with ch in this thread's range: written once.
                    unsafe { p.y.write(row + j, v) };
                }
            }
            for j in 0..width {
                let dst = (b * channels + lo + j) * n_state;
                for n in 0..n_state {
                    // SAFETY: this thread's channels only.
                    unsafe { p.h.write(dst + n, h[n][j]) };
                }
            }
        }
    }
}

/// Sequences up to this length take [`scan_channels_short`]: the channel-block loop transposes
/// each block's `A` and state in and out, which a decoding step (one step) cannot amortise.
const SHORT_SEQ: usize = 4;

simd_dispatch! {
    /// The recurrence for short sequences: a channel at a time, its state indices the vector
    /// lanes (`A`, the state and `B`, `C` are contiguous along them). Jamba's 16 states get a
    /// fixed-size loop (one AVX-512 register); other sizes a loop over slices.
    fn scan_channels_short(p: &ScanArgs<'_>, range: std::ops::Range<usize>) {
        if p.state == 16 {
            short_scan::<16>(p, range)
        } else {
            short_scan::<0>(p, range)
        }
    }
}

/// [`scan_channels_short`]'s loop; `N` is the state size, or 0 for "read it from `p`".
///
/// Channels go in blocks of [`BLOCK`]: the per-channel scalar work (softplus, `Δ·u`, the gate,
/// the skip) is done for the block at once with the channels as lanes, and the block's state
/// and `A` rows are contiguous runs copied in and out; each channel's update then has the state
/// indices as lanes. Done one channel at a time, the chain softplus → exp → update → sum →
/// gate left the core waiting on latency (~500 cycles a channel, measured).
#[inline(always)]
fn short_scan<const N: usize>(p: &ScanArgs<'_>, range: std::ops::Range<usize>) {
    const W: usize = BLOCK;
    let (seq, channels) = (p.seq, p.channels);
    let n_state = if N > 0 { N } else { p.state };
    let mut h = vec![0.0f32; W * n_state];
    let mut lanes = vec![0.0f32; n_state];
    for b in 0..p.batch {
        for lo in range.clone().step_by(W) {
            let width = W.min(range.end - lo);
            let span = width * n_state;
            let base = (b * channels + lo) * n_state;
            h[..span].copy_from_slice(&p.h_in[base..base + span]);
            let a = &p.a[lo * n_state..][..span];
            let (mut bias, mut dskip) = ([0.0f32; W], [0.0f32; W]);
            if let Some(v) = p.bias {
                bias[..width].copy_from_slice(&v[lo..lo + width]);
            }
            if let Some(v) = p.d {
                dskip[..width].copy_from_slice(&v[lo..lo + width]);
            }
            for t in 0..seq {
                let row = (b * seq + t) * channels + lo;
                let (dt, x, gate) = block_inputs(p, row, width, &bias);
                let bt = &p.b[(b * seq + t) * n_state..][..n_state];
                let ct = &p.c[(b * seq + t) * n_state..][..n_state];
                let mut acc = [0.0f32; W];
                for j in 0..width {
                    let (hj, aj) = (
                        &mut h[j * n_state..][..n_state],
                        &a[j * n_state..][..n_state],
                    );
                    let du = dt[j] * x[j];
                    acc[j] = if N > 0 {
                        // Fixed-size views: no bounds checks, no tails, a tree sum.
                        let (hj, aj, bt, ct): (&mut [f32; N], &[f32; N], &[f32; N], &[f32; N]) = (
                            hj.try_into().unwrap(),
                            aj.try_into().unwrap(),
                            bt.try_into().unwrap(),
                            ct.try_into().unwrap(),
                        );
                        let mut l = [0.0f32; N];
                        for n in 0..N {
                            hj[n] = exp_fast(dt[j] * aj[n]) * hj[n] + du * bt[n];
                            l[n] = hj[n] * ct[n];
                        }
                        tree_sum(l)
                    } else {
                        for n in 0..n_state {
                            hj[n] = exp_fast(dt[j] * aj[n]) * hj[n] + du * bt[n];
                            lanes[n] = hj[n];
                        }
                        dot(&lanes, ct)
                    };
                }
                for j in 0..width {
                    let v = (acc[j] + dskip[j] * x[j]) * gate[j];
                    // SAFETY: (b, t, ch) with ch in this thread's range: written once.
                    unsafe { p.y.write(row + j, v) };
                }
            }
            for (i, &hv) in h[..span].iter().enumerate() {
                // SAFETY: this thread's channels only.
                unsafe { p.h.write(base + i, hv) };
            }
        }
    }
}

/// The scan's recurrence ([`ScanInput`]) in one pass over time on the host, f32 throughout.
/// `y` comes back in the dtype of `u`, the state in f32.
pub(crate) fn selective_scan<B: Backend>(input: ScanInput<B>) -> ScanOutput<B> {
    let device = input.u.device();
    let dtype = input.u.dtype();
    let [batch, seq, channels] = input.u.dims();
    let state = input.a.dims()[1];
    let u = values(input.u);
    let delta = values(input.delta);
    let a = values(input.a);
    let bm = values(input.b);
    let cm = values(input.c);
    let d = input.d.map(values);
    let z = input.z.map(values);
    let bias = input.delta_bias.map(values);
    let h_in = match input.initial_state {
        Some(s) => values(s),
        None => vec![0.0; batch * channels * state],
    };
    // Every (row, channel, state) of `h` and (row, step, channel) of `y` is written below.
    let mut h = vec![0.0f32; batch * channels * state];
    let mut y = vec![0.0f32; batch * seq * channels];
    let (y_out, h_out) = (Shared(y.as_mut_ptr()), Shared(h.as_mut_ptr()));
    let args = ScanArgs {
        u: &u,
        delta: &delta,
        z: z.as_deref(),
        b: &bm,
        c: &cm,
        a: &a,
        d: d.as_deref(),
        bias: bias.as_deref(),
        h_in: &h_in,
        softplus: input.delta_softplus,
        batch,
        seq,
        channels,
        state,
        y: &y_out,
        h: &h_out,
    };
    let work = batch * seq * channels * state;
    for_channel_ranges(channels, work, |range| {
        if seq <= SHORT_SEQ {
            scan_channels_short(&args, range)
        } else {
            scan_channels(&args, range)
        }
    });
    ScanOutput {
        y: Tensor::<B, 3>::from_data(TensorData::new(y, [batch, seq, channels]), &device)
            .cast(dtype),
        state: Tensor::from_data(TensorData::new(h, [batch, channels, state]), &device),
    }
}

