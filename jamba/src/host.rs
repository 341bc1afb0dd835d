//! The selective scan and the causal conv1d as plain loops over host memory: what the CPU
//! backends run instead of the tensor-op forms.
//!
//! On a CPU, reading a tensor's values costs a copy, and one pass over time with the state in
//! registers does `L·D·N` exponentials and nothing else, where the tensor-op forms
//! ([`crate::scan::selective_scan_chunked`]) materialise several `[L, D, N]` tensors through
//! broadcasts. Channels are split across threads (the recurrence is independent per channel);
//! within a thread a block of channels walks time together, so each step reads a contiguous run
//! of every input.

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

use crate::ops::{ConvInput, ConvOutput};
use crate::scan::{ScanInput, ScanOutput};

/// Channels a thread advances together through time (16 f32 = one cache line per input row).
const BLOCK: usize = 16;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .into_vec::<f32>()
        .expect("an f32 tensor reads back as f32")
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Splits `channels` into `threads()` contiguous ranges (block-aligned) and runs `f` on each in
/// its own scoped thread; `f` gets the channel range.
fn for_channel_ranges(channels: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let blocks = channels.div_ceil(BLOCK);
    let workers = threads().min(blocks).max(1);
    let per = blocks.div_ceil(workers);
    std::thread::scope(|s| {
        for w in 0..workers {
            let lo = (w * per * BLOCK).min(channels);
            let hi = ((w + 1) * per * BLOCK).min(channels);
            if lo < hi {
                let f = &f;
                s.spawn(move || f(lo..hi));
            }
        }
    });
}

/// A shared output buffer that threads write at disjoint indices.
struct Shared(*mut f32);
// SAFETY: every writer touches a disjoint set of indices (its own channel range), and the
// buffer outlives the scope that the writers run in.
unsafe impl Sync for Shared {}
impl Shared {
    /// # Safety
    /// `i` is in bounds and no other thread writes `i`.
    unsafe fn write(&self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
    }
}

/// Rows up to which [`projection_flex`] runs its own loop (decoding: a row per sequence).
pub const GEMV_MAX_ROWS: usize = 8;

/// `x [batch, seq, in] · weight [in, out] (+ bias)` on flex. For a few rows (decoding), a
/// threaded loop that streams the weight once: flex's GEMM (single-threaded without its `rayon`
/// feature, and tuned for large products) left one core reading the weights while the other
/// waited. Each thread owns a contiguous band of the weight's input rows and accumulates into
/// its own output rows; the partial outputs are summed. More rows, other dtypes, a weight that
/// is not one contiguous buffer, or `JAMBA_HOST_GEMV=off` (for comparisons) take Burn's `linear`.
#[cfg(feature = "flex")]
pub fn projection_flex(
    x: Tensor<burn::backend::Flex, 3>,
    weight: Tensor<burn::backend::Flex, 2>,
    bias: Option<Tensor<burn::backend::Flex, 1>>,
) -> Tensor<burn::backend::Flex, 3> {
    use rayon::prelude::*;
    let [batch, seq, inputs] = x.dims();
    let outputs = weight.dims()[1];
    let rows = batch * seq;
    if rows > GEMV_MAX_ROWS
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || !crate::ops::kernels_enabled()
        || !host_gemv_enabled()
    {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let w_prim = weight.clone().into_primitive().tensor();
    let Some(w) = w_prim
        .as_slice::<f32>()
        .filter(|w| w.len() == inputs * outputs)
    else {
        return burn::tensor::module::linear(x, weight, bias);
    };
    let device = x.device();
    let xv = values(x);
    // Bands of at least 64K weights: below that a thread costs more than it saves.
    let bands = threads()
        .min((inputs * outputs).div_ceil(1 << 16))
        .clamp(1, inputs.max(1));
    let per = inputs.div_ceil(bands);
    let band = |lo: usize, hi: usize| {
        let mut acc = vec![0.0f32; rows * outputs];
        for i in lo..hi {
            let wi = &w[i * outputs..(i + 1) * outputs];
            for r in 0..rows {
                let xv = xv[r * inputs + i];
                for (a, &wv) in acc[r * outputs..(r + 1) * outputs].iter_mut().zip(wi) {
                    *a += xv * wv;
                }
            }
        }
        acc
    };
    let mut out = if bands == 1 {
        band(0, inputs)
    } else {
        (0..bands)
            .into_par_iter()
            .map(|t| band((t * per).min(inputs), ((t + 1) * per).min(inputs)))
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![0.0; rows * outputs])
    };
    if let Some(bias) = bias {
        let bv = values(bias);
        for row in out.chunks_exact_mut(outputs) {
            row.iter_mut().zip(&bv).for_each(|(o, b)| *o += b);
        }
    }
    Tensor::from_data(TensorData::new(out, [batch, seq, outputs]), &device)
}

/// `JAMBA_HOST_GEMV=off` turns [`projection_flex`]'s loop off (read once: it is on the path of
/// every decoding projection).
#[cfg(feature = "flex")]
fn host_gemv_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| crate::ops::env_switch("JAMBA_HOST_GEMV", true))
}

/// `exp(x)` to about 2e-7 relative error, in a form the compiler vectorises (the standard
/// library's `exp` is a call per element): `2^k · e^r` with `k = round(x / ln 2)` and a degree-6
/// polynomial for `e^r`, `|r| ≤ ln 2 / 2`. Clamps its argument to [−87, 88] (below, it returns
/// `e^−87` ≈ 1.6e-38 where the true value is smaller still: a decay that is zero either way).
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(((k as i32 + 127) << 23) as u32) * p
}

/// `Σ a·b` in four independent lanes (a sequential sum would not vectorise).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f32 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a4.zip(b4) {
        for l in 0..4 {
            lanes[l] += x[l] * y[l];
        }
    }
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// [`crate::scan`]'s recurrence in one pass over time on the host, f32 throughout. `y` comes
/// back in the dtype of `u`, the state in f32.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use jamba::backends::Cpu;
/// use jamba::scan::{ScanInput, selective_scan_reference};
/// let dev = Default::default();
/// let r = |s: [usize; 3]| Tensor::<Cpu, 3>::random(s, Distribution::Normal(0.0, 1.0), &dev);
/// let input = ScanInput {
///     u: r([1, 9, 5]), delta: r([1, 9, 5]), b: r([1, 9, 4]), c: r([1, 9, 4]),
///     a: Tensor::random([5, 4], Distribution::Uniform(-2.0, -0.5), &dev),
///     d: None, z: Some(r([1, 9, 5])), delta_bias: None, delta_softplus: true,
///     initial_state: None,
/// };
/// let fast = jamba::host::selective_scan_host(input.clone());
/// let slow = selective_scan_reference(input);
/// let err = (fast.y - slow.y).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn selective_scan_host<B: Backend>(input: ScanInput<B>) -> ScanOutput<B> {
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
    for_channel_ranges(channels, |range| {
        let mut hb = vec![0.0f32; BLOCK * state];
        let mut decay = vec![0.0f32; state];
        for b in 0..batch {
            for lo in range.clone().step_by(BLOCK) {
                let width = BLOCK.min(range.end - lo);
                for j in 0..width {
                    let src = (b * channels + lo + j) * state;
                    hb[j * state..(j + 1) * state].copy_from_slice(&h_in[src..src + state]);
                }
                for t in 0..seq {
                    let row = (b * seq + t) * channels;
                    let (bt, ct) = (
                        &bm[(b * seq + t) * state..][..state],
                        &cm[(b * seq + t) * state..][..state],
                    );
                    for j in 0..width {
                        let ch = lo + j;
                        let mut dt = delta[row + ch] + bias.as_ref().map_or(0.0, |v| v[ch]);
                        if input.delta_softplus {
                            dt = softplus(dt);
                        }
                        let x = u[row + ch];
                        let du = dt * x;
                        let ar = &a[ch * state..][..state];
                        let hj = &mut hb[j * state..(j + 1) * state];
                        for (e, &a) in decay.iter_mut().zip(ar) {
                            *e = exp_fast(dt * a);
                        }
                        for ((h, &e), &b) in hj.iter_mut().zip(&decay).zip(bt) {
                            *h = e * *h + du * b;
                        }
                        let mut acc = dot(hj, ct);
                        if let Some(d) = &d {
                            acc += d[ch] * x;
                        }
                        if let Some(z) = &z {
                            acc *= silu(z[row + ch]);
                        }
                        // SAFETY: (b, t, ch) with ch in this thread's range: written once.
                        unsafe { y_out.write(row + ch, acc) };
                    }
                }
                for j in 0..width {
                    let dst = (b * channels + lo + j) * state;
                    for n in 0..state {
                        // SAFETY: this thread's channels only.
                        unsafe { h_out.write(dst + n, hb[j * state + n]) };
                    }
                }
            }
        }
    });
    ScanOutput {
        y: Tensor::<B, 3>::from_data(TensorData::new(y, [batch, seq, channels]), &device)
            .cast(dtype),
        state: Tensor::from_data(TensorData::new(h, [batch, channels, state]), &device),
    }
}

/// Depthwise causal conv1d + bias (+ SiLU) continuing from the prefix, on the host. `y` and the
/// new prefix come back in the dtype of `x`.
pub fn causal_conv1d_host<B: Backend>(input: ConvInput<B>) -> ConvOutput<B> {
    let device = input.x.device();
    let dtype = input.x.dtype();
    let [batch, seq, channels] = input.x.dims();
    let k = input.weight.dims()[1];
    let x = values(input.x);
    let w = values(input.weight);
    let bias = input.bias.map(values);
    let prefix = match input.prefix {
        Some(p) => values(p),
        None => vec![0.0; batch * (k - 1) * channels],
    };
    // [prefix, x] per row, as the kernel sees it: position p < k − 1 is the prefix.
    let at = |b: usize, p: usize, ch: usize| {
        if p < k - 1 {
            prefix[(b * (k - 1) + p) * channels + ch]
        } else {
            x[(b * seq + p - (k - 1)) * channels + ch]
        }
    };
    let mut y = vec![0.0f32; batch * seq * channels];
    for b in 0..batch {
        for t in 0..seq {
            let out = &mut y[(b * seq + t) * channels..][..channels];
            for (ch, o) in out.iter_mut().enumerate() {
                let mut acc = bias.as_ref().map_or(0.0, |v| v[ch]);
                for j in 0..k {
                    acc += w[ch * k + j] * at(b, t + j, ch);
                }
                *o = if input.silu { silu(acc) } else { acc };
            }
        }
    }
    let mut state = vec![0.0f32; batch * (k - 1) * channels];
    for b in 0..batch {
        for p in 0..k - 1 {
            for ch in 0..channels {
                state[(b * (k - 1) + p) * channels + ch] = at(b, seq + p, ch);
            }
        }
    }
    ConvOutput {
        y: Tensor::<B, 3>::from_data(TensorData::new(y, [batch, seq, channels]), &device)
            .cast(dtype),
        state: Tensor::<B, 3>::from_data(TensorData::new(state, [batch, k - 1, channels]), &device)
            .cast(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_accurate_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_fast(x) as f64) - exact).abs() / exact);
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst:.3e}");
        assert!(exp_fast(-1000.0) < 2e-38 && exp_fast(0.0) == 1.0);
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        for n in [1usize, 3, 4, 7, 16, 33] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-5, "n {n}");
        }
    }
}
