//! The selective scan and the causal conv1d as plain loops over host memory: what the CPU
//! backends run instead of the tensor-op forms.
//!
//! On a CPU, reading a tensor's values costs a copy, and one pass over time with the state in
//! registers does `L·D·N` exponentials and nothing else, where the tensor-op forms
//! ([`crate::scan::selective_scan_chunked`]) materialise several `[L, D, N]` tensors through
//! broadcasts. Channels are split across threads (the recurrence is independent per channel);
//! within a thread a block of [`BLOCK`] channels walks time together, the lanes of a SIMD
//! register: every loop over a block is a fixed-length loop over contiguous `f32`s, and the
//! transcendental functions are polynomial forms the compiler vectorises. The loops are compiled
//! for AVX-512 and for AVX2 + FMA and picked at run time ([`simd_dispatch`]): the baseline
//! x86-64 target stops at SSE2.

use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

use crate::ops::{ConvInput, ConvOutput};
use crate::scan::{ScanInput, ScanOutput};

/// Channels a thread advances together through time: one AVX-512 register of f32, two AVX2.
const BLOCK: usize = 16;

/// Work (multiply-adds or state updates) below which a loop runs on the calling thread: a
/// decoding step's scan (a few thousand channels × 16 states) takes microseconds, less than
/// starting a thread.
const THREAD_MIN_WORK: usize = 1 << 18;

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .into_vec::<f32>()
        .expect("an f32 tensor reads back as f32")
}

/// The number of threads the host loops use (read once: `available_parallelism` reads cgroup
/// files on Linux, tens of microseconds a call).
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Splits `channels` into up to `threads()` contiguous ranges (block-aligned) and runs `f` on
/// each in its own scoped thread; `f` gets the channel range. One range on the calling thread
/// when the loop's `work` is too small to pay for threads.
fn for_channel_ranges(channels: usize, work: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let blocks = channels.div_ceil(BLOCK);
    let workers = if work < THREAD_MIN_WORK {
        1
    } else {
        threads().min(blocks).max(1)
    };
    if workers == 1 {
        return f(0..channels);
    }
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

/// Defines `fn $name(args)` whose body is compiled three times, for AVX-512, for AVX2 + FMA and
/// for the baseline target, and runs the best one the CPU supports (detected once; the check is
/// an atomic load). The body must call only `#[inline(always)]` helpers so that they are
/// compiled with the same features.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
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
/// threaded loop that streams the weight once at memory bandwidth: flex's GEMM is tuned for
/// large products. Each thread owns a band of output columns (no partial sums to merge) and
/// walks the input rows four at a time, so that every pass over its accumulators consumes four
/// weight rows. More rows, other dtypes, a weight that is not one contiguous buffer, or
/// `JAMBA_HOST_GEMV=off` (for comparisons) take Burn's `linear`.
#[cfg(feature = "flex")]
pub fn projection_flex(
    x: Tensor<burn::backend::Flex, 3>,
    weight: Tensor<burn::backend::Flex, 2>,
    bias: Option<Tensor<burn::backend::Flex, 1>>,
) -> Tensor<burn::backend::Flex, 3> {
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
    let mut out = gemv_host(&GemvArgs {
        w,
        x: &xv,
        rows,
        inputs,
        outputs,
    });
    if let Some(bias) = bias {
        let bv = values(bias);
        for row in out.chunks_exact_mut(outputs) {
            row.iter_mut().zip(&bv).for_each(|(o, b)| *o += b);
        }
    }
    Tensor::from_data(TensorData::new(out, [batch, seq, outputs]), &device)
}

/// `x · w` on the host: `[rows, outputs]`. Each thread streams one contiguous band of the
/// weight's input rows into partial sums over every output column, and the partials are added
/// at the end (`rows · outputs` adds per extra thread, nothing next to the weight). On the
/// 2-core development machine, bands of rows and session 6's bands of columns streamed a
/// decoding step's products at about the same rate; what mattered was how a band reaches the
/// other core ([`pair::join`] for two bands, rayon's pool for more).
#[cfg(feature = "flex")]
fn gemv_host(args: &GemvArgs<'_>) -> Vec<f32> {
    use rayon::prelude::*;
    let (rows, inputs, outputs) = (args.rows, args.inputs, args.outputs);
    // Bands of at least 64K weights (below that a thread costs more than it saves).
    let bands = threads()
        .min((inputs * outputs).div_ceil(1 << 16))
        .min(inputs.div_ceil(4))
        .max(1);
    if bands == 1 {
        return gemv_rows(args, 0..inputs);
    }
    // Whole groups of 4 input rows per band (the loop's unit).
    let per = inputs.div_ceil(bands).div_ceil(4) * 4;
    if bands == 2 && helper_enabled() {
        let first = std::sync::Mutex::new(Vec::new());
        let second = std::sync::Mutex::new(Vec::new());
        pair::join(
            &|| *lock(&first) = gemv_rows(args, 0..per.min(inputs)),
            &|| *lock(&second) = gemv_rows(args, per.min(inputs)..inputs),
        );
        let mut out = first.into_inner().unwrap_or_else(|e| e.into_inner());
        let second = second.into_inner().unwrap_or_else(|e| e.into_inner());
        if !second.is_empty() {
            add_assign(&mut out, &second);
        }
        return out;
    }
    let mut parts = (0..bands)
        .into_par_iter()
        .map(|t| gemv_rows(args, (t * per).min(inputs)..((t + 1) * per).min(inputs)))
        .collect::<Vec<_>>()
        .into_iter();
    let mut out = parts.next().unwrap_or_else(|| vec![0.0; rows * outputs]);
    for part in parts {
        add_assign(&mut out, &part);
    }
    out
}

/// The guard of a mutex whose holder may have panicked (the value is overwritten anyway).
#[cfg(feature = "flex")]
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `JAMBA_HOST_HELPER=off` sends two-band products to rayon's pool instead of [`pair::join`]
/// (for comparisons; read once).
#[cfg(feature = "flex")]
fn helper_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::ops::env_switch("JAMBA_HOST_HELPER", true))
}

/// Two-way splits of short host loops (a decoding step's products) on one helper thread.
///
/// Handing two jobs to rayon's pool from a thread outside it costs ~25 µs per call on the
/// 2-core development machine (the workers sleep between a decoding step's calls, and the
/// caller blocks on a latch until both are woken and done): a 512 × 256 product took 27-38 µs
/// split that way and 6.8 µs on one thread. The helper instead spins for a short while after
/// each job, so the next product of the step finds it awake, and the caller runs the other
/// half itself.
#[cfg(feature = "flex")]
mod pair {
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    const IDLE: u8 = 0;
    const POSTED: u8 = 1;
    const DONE: u8 = 2;
    const PANICKED: u8 = 3;
    /// How long the helper waits, spinning, for the next job before it parks.
    const SPIN: Duration = Duration::from_micros(300);

    /// A job whose borrow [`join`] keeps alive until the helper reports it done.
    #[derive(Clone, Copy)]
    struct Job(*const (dyn Fn() + Sync + 'static));
    // SAFETY: the pointee is `Sync`, and `join` outlives its use (it waits for `DONE`).
    unsafe impl Send for Job {}

    struct Helper {
        state: AtomicU8,
        parked: AtomicBool,
        job: Mutex<Option<Job>>,
        /// Held by the one caller using the helper; others run both halves themselves.
        busy: Mutex<()>,
        thread: std::thread::Thread,
    }

    fn helper() -> Option<&'static Helper> {
        static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();
        *HELPER.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("jamba-host-helper".into())
                .spawn(move || {
                    let helper: &'static Helper = Box::leak(Box::new(Helper {
                        state: AtomicU8::new(IDLE),
                        parked: AtomicBool::new(false),
                        job: Mutex::new(None),
                        busy: Mutex::new(()),
                        thread: std::thread::current(),
                    }));
                    let _ = tx.send(helper);
                    serve(helper)
                })
                .ok()?;
            rx.recv().ok()
        })
    }

    fn serve(h: &Helper) -> ! {
        loop {
            let mut since = Instant::now();
            while h.state.load(SeqCst) != POSTED {
                if since.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                // `join` stores `POSTED` before it reads `parked`, and this thread stores
                // `parked` before it reads the state: one of the two sees the other.
                h.parked.store(true, SeqCst);
                if h.state.load(SeqCst) != POSTED {
                    std::thread::park();
                }
                h.parked.store(false, SeqCst);
                since = Instant::now();
            }
            let job = h.job.lock().unwrap_or_else(|e| e.into_inner()).take();
            let ok = catch_unwind(AssertUnwindSafe(|| {
                if let Some(Job(f)) = job {
                    // SAFETY: `join` posted this pointer from a live borrow and does not
                    // return before `DONE` or `PANICKED` is stored below.
                    unsafe { (*f)() }
                }
            }))
            .is_ok();
            h.state.store(if ok { DONE } else { PANICKED }, SeqCst);
        }
    }

    /// Runs `a` on the calling thread and `b` on the helper, and returns when both are done
    /// (both on the calling thread if the helper is taken or could not be started). A panic
    /// in either is resumed here, after both have finished.
    pub(super) fn join(a: &(dyn Fn() + Sync), b: &(dyn Fn() + Sync)) {
        let Some(h) = helper() else {
            a();
            return b();
        };
        let Ok(_busy) = h.busy.try_lock() else {
            a();
            return b();
        };
        // SAFETY: only the lifetime is erased; this function waits below until the helper
        // has finished with `b` (whatever `a` does), so the borrow outlives every use.
        let job: *const (dyn Fn() + Sync + 'static) = unsafe {
            std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(
                b,
            )
        };
        *h.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job(job));
        h.state.store(POSTED, SeqCst);
        if h.parked.load(SeqCst) {
            h.thread.unpark();
        }
        let ran = catch_unwind(AssertUnwindSafe(a));
        let mut spins = 0u32;
        while !matches!(h.state.load(SeqCst), DONE | PANICKED) {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let helper_panicked = h.state.swap(IDLE, SeqCst) == PANICKED;
        if let Err(payload) = ran {
            resume_unwind(payload);
        }
        assert!(
            !helper_panicked,
            "a host loop panicked on the helper thread"
        );
    }
}

/// The mixture of experts of a few f32 tokens on flex, as host loops
/// ([`crate::ops::JambaBackend::routed_experts`]): the router's softmax and top-k, then each
/// chosen expert once on the rows of the tokens that chose it (column-band GEMVs), weighted
/// and summed. `None` (the tensor-op form) for more than [`GEMV_MAX_ROWS`] tokens, other
/// dtypes, weights that are not contiguous, or with the host loops turned off.
#[cfg(feature = "flex")]
pub fn routed_experts_flex(
    input: crate::ops::RoutedExperts<burn::backend::Flex>,
) -> Option<Tensor<burn::backend::Flex, 2>> {
    let crate::ops::RoutedExperts {
        x,
        router_logits,
        gate,
        up,
        down,
        top_k,
    } = input;
    let [tokens, hidden] = x.dims();
    let [experts, _, inner] = gate.dims();
    let all_f32 = [
        x.dtype(),
        router_logits.dtype(),
        gate.dtype(),
        up.dtype(),
        down.dtype(),
    ]
    .iter()
    .all(|&d| d == DType::F32);
    if tokens > GEMV_MAX_ROWS
        || !all_f32
        || top_k == 0
        || top_k > experts
        || !crate::ops::kernels_enabled()
        || !host_gemv_enabled()
    {
        return None;
    }
    let size = experts * hidden * inner;
    let (gate, up, down) = (
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
        down.into_primitive().tensor(),
    );
    let g = gate.as_slice::<f32>().filter(|s| s.len() == size)?;
    let u = up.as_slice::<f32>().filter(|s| s.len() == size)?;
    let d = down.as_slice::<f32>().filter(|s| s.len() == size)?;
    let device = x.device();
    let xv = values(x);
    let logits = values(router_logits);

    // Each token's top-k (expert, probability), the largest first, the lowest index among equals.
    let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
        for &expert in &order[..top_k] {
            chosen[expert].push((t, e[expert] / sum));
        }
    }
    let mut y = vec![0.0f32; tokens * hidden];
    let block = hidden * inner;
    for (expert, rows) in chosen.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
        let xs: Vec<f32> = rows
            .iter()
            .flat_map(|&(t, _)| xv[t * hidden..(t + 1) * hidden].iter().copied())
            .collect();
        let product = |w: &[f32], x: &[f32], inputs: usize, outputs: usize| {
            gemv_host(&GemvArgs {
                w,
                x,
                rows: rows.len(),
                inputs,
                outputs,
            })
        };
        let (ge, ue, de) = (
            &g[expert * block..][..block],
            &u[expert * block..][..block],
            &d[expert * block..][..block],
        );
        let gated = product(ge, &xs, hidden, inner);
        let upped = product(ue, &xs, hidden, inner);
        let act: Vec<f32> = gated
            .iter()
            .zip(&upped)
            .map(|(&a, &b)| silu(a) * b)
            .collect();
        let out = product(de, &act, inner, hidden);
        for (r, &(t, p)) in rows.iter().enumerate() {
            for (acc, &o) in y[t * hidden..(t + 1) * hidden]
                .iter_mut()
                .zip(&out[r * hidden..(r + 1) * hidden])
            {
                *acc += p * o;
            }
        }
    }
    Some(Tensor::from_data(
        TensorData::new(y, [tokens, hidden]),
        &device,
    ))
}

/// [`projection_flex`]'s operands.
#[cfg(feature = "flex")]
struct GemvArgs<'a> {
    /// `[inputs, outputs]`.
    w: &'a [f32],
    /// `[rows, inputs]`.
    x: &'a [f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
}

#[cfg(feature = "flex")]
simd_dispatch! {
    /// `x[:, inputs] · w[inputs, :]` over a band of input rows: partial sums, `[rows, outputs]`.
    fn gemv_rows(p: &GemvArgs<'_>, inputs: std::ops::Range<usize>) -> Vec<f32> {
        let (rows, width, outputs) = (p.rows, p.inputs, p.outputs);
        let mut out = vec![0.0f32; rows * outputs];
        let row = |i: usize| &p.w[i * outputs..][..outputs];
        let mut i = inputs.start;
        while i + 4 <= inputs.end {
            let (w0, w1, w2, w3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
            for r in 0..rows {
                let xs = &p.x[r * width + i..][..4];
                let (x0, x1, x2, x3) = (xs[0], xs[1], xs[2], xs[3]);
                let acc = &mut out[r * outputs..][..outputs];
                for c in 0..outputs {
                    acc[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
                }
            }
            i += 4;
        }
        while i < inputs.end {
            let wi = row(i);
            for r in 0..rows {
                let xv = p.x[r * width + i];
                for (a, &wv) in out[r * outputs..][..outputs].iter_mut().zip(wi) {
                    *a += xv * wv;
                }
            }
            i += 1;
        }
        out
    }
}

#[cfg(feature = "flex")]
simd_dispatch! {
    /// `out += part`, element by element.
    fn add_assign(out: &mut [f32], part: &[f32]) {
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
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
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s low mantissa bits hold k itself (its bits are those of ROUND plus k): an
    // integer read of them vectorises, where `k as i32` (a saturating conversion) does not.
    let k_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    f32::from_bits(((k_int + 127) << 23) as u32) * p
}

/// `ln(1 + t)` for `t ∈ [0, 1]` to about 1.5e-7 relative error, vectorisable:
/// `2·atanh(s)` with `s = t / (2 + t) ≤ 1/3`, the odd series to `s^11` (accurate for tiny `t`
/// too, where `ln(1 + t)` through `1 + t` would round to zero).
#[inline(always)]
fn ln_1p_unit(t: f32) -> f32 {
    let s = t / (2.0 + t);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0))))))
}

/// `ln(1 + e^x)`, as `max(x, 0) + ln(1 + e^−|x|)` (no overflow, no cancellation).
#[inline(always)]
fn softplus(x: f32) -> f32 {
    x.max(0.0) + ln_1p_unit(exp_fast(-x.abs()))
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

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

/// `Σ l` by halving (log₂ N dependent adds instead of N).
#[inline(always)]
fn tree_sum<const N: usize>(mut l: [f32; N]) -> f32 {
    let mut half = N / 2;
    let mut len = N;
    while half > 0 {
        for i in 0..half {
            l[i] += l[i + half];
        }
        if len % 2 == 1 {
            l[0] += l[len - 1];
        }
        len = half;
        half /= 2;
    }
    l[0]
}

/// `Σ a·b` in 16 independent lanes (a sequential sum would not vectorise).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
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

simd_dispatch! {
    /// `out = −exp(x)`, element-wise.
    fn neg_exp_slice(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = -exp_fast(v);
        }
    }
}

/// `−exp(x)` in f32 on the host ([`crate::ops::JambaBackend::ssm_a`]), relative error ~2e-7.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use jamba::backends::Cpu;
/// let x = Tensor::<Cpu, 2>::random([7, 16], Distribution::Uniform(-3.0, 3.0), &Default::default());
/// let fast = jamba::host::neg_exp_host(x.clone());
/// let slow = x.exp().neg();
/// assert!(((fast - slow.clone()).abs() / slow.abs()).max().into_scalar() < 1e-6);
/// ```
pub fn neg_exp_host<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    let shape = x.shape();
    let v = values(x);
    let mut out = vec![0.0f32; v.len()];
    neg_exp_slice(&v, &mut out);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// The host conv's inputs as f32 slices, and its output.
struct ConvArgs<'a> {
    /// `[batch, k − 1 + seq, channels]`: the prefix, then the input.
    padded: &'a [f32],
    /// `[k, channels]`: tap-major, so that a tap's weights for a run of channels are contiguous.
    taps: &'a [f32],
    bias: Option<&'a [f32]>,
    silu: bool,
    batch: usize,
    seq: usize,
    channels: usize,
    k: usize,
    y: &'a Shared,
}

simd_dispatch! {
    /// The convolution for the channels in `range`, every row and step.
    fn conv_channels(p: &ConvArgs<'_>, range: std::ops::Range<usize>) {
        let (seq, channels, k) = (p.seq, p.channels, p.k);
        let span = range.len();
        let mut acc = vec![0.0f32; span];
        for b in 0..p.batch {
            for t in 0..seq {
                match p.bias {
                    Some(bias) => acc.copy_from_slice(&bias[range.clone()]),
                    None => acc.fill(0.0),
                }
                for j in 0..k {
                    let src = &p.padded[(b * (k - 1 + seq) + t + j) * channels..][range.clone()];
                    let w = &p.taps[j * channels..][range.clone()];
                    for ((a, &wv), &xv) in acc.iter_mut().zip(w).zip(src) {
                        *a += wv * xv;
                    }
                }
                if p.silu {
                    for a in &mut acc {
                        *a = silu(*a);
                    }
                }
                let row = (b * seq + t) * channels + range.start;
                for (i, &v) in acc.iter().enumerate() {
                    // SAFETY: (b, t, ch) with ch in this thread's range: written once.
                    unsafe { p.y.write(row + i, v) };
                }
            }
        }
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
    // [prefix, x] per row: the convolution then reads k consecutive rows for every step.
    let rows = k - 1 + seq;
    let mut padded = Vec::with_capacity(batch * rows * channels);
    for b in 0..batch {
        padded.extend_from_slice(&prefix[b * (k - 1) * channels..][..(k - 1) * channels]);
        padded.extend_from_slice(&x[b * seq * channels..][..seq * channels]);
    }
    let mut taps = vec![0.0f32; k * channels];
    for ch in 0..channels {
        for j in 0..k {
            taps[j * channels + ch] = w[ch * k + j];
        }
    }
    let mut y = vec![0.0f32; batch * seq * channels];
    let y_out = Shared(y.as_mut_ptr());
    let args = ConvArgs {
        padded: &padded,
        taps: &taps,
        bias: bias.as_deref(),
        silu: input.silu,
        batch,
        seq,
        channels,
        k,
        y: &y_out,
    };
    for_channel_ranges(channels, batch * seq * channels * k, |range| {
        conv_channels(&args, range)
    });
    // The new prefix: the last k − 1 rows of [prefix, x].
    let mut state = Vec::with_capacity(batch * (k - 1) * channels);
    for b in 0..batch {
        state.extend_from_slice(&padded[(b * rows + seq) * channels..][..(k - 1) * channels]);
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
    fn tree_sum_matches_a_plain_sum() {
        fn check<const N: usize>() {
            let l: [f32; N] = std::array::from_fn(|i| (i as f32 * 0.37).sin());
            let exact: f64 = l.iter().map(|&x| x as f64).sum();
            assert!((tree_sum(l) as f64 - exact).abs() < 1e-5, "N {N}");
        }
        check::<1>();
        check::<3>();
        check::<7>();
        check::<16>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn pair_join_runs_both_halves_and_passes_panics_on() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (a, b) = (AtomicUsize::new(0), AtomicUsize::new(0));
        for i in 1..=200 {
            super::pair::join(&|| _ = a.fetch_add(i, Ordering::SeqCst), &|| {
                _ = b.fetch_add(2 * i, Ordering::SeqCst)
            });
        }
        assert_eq!(a.load(Ordering::SeqCst), 20_100);
        assert_eq!(b.load(Ordering::SeqCst), 40_200);
        let caught = std::panic::catch_unwind(|| super::pair::join(&|| (), &|| panic!("band")));
        assert!(caught.is_err(), "a panic on the helper reaches the caller");
        // The helper serves the next call after a panic.
        let c = AtomicUsize::new(0);
        super::pair::join(&|| _ = c.fetch_add(1, Ordering::SeqCst), &|| {
            _ = c.fetch_add(1, Ordering::SeqCst)
        });
        assert_eq!(c.load(Ordering::SeqCst), 2);
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

    #[test]
    fn softplus_and_silu_match_libm() {
        let (mut worst_sp, mut worst_silu) = (0.0f64, 0.0f64);
        let mut x = -60.0f32;
        while x <= 60.0 {
            let xf = x as f64;
            let sp = if xf > 30.0 { xf } else { xf.exp().ln_1p() };
            worst_sp = worst_sp.max((softplus(x) as f64 - sp).abs() / sp);
            let si = xf / (1.0 + (-xf).exp());
            worst_silu = worst_silu.max((silu(x) as f64 - si).abs() / si.abs().max(1e-30));
            x += 0.000_93;
        }
        assert!(
            worst_sp < 1e-6,
            "softplus: worst relative error {worst_sp:.3e}"
        );
        assert!(
            worst_silu < 1e-6,
            "silu: worst relative error {worst_silu:.3e}"
        );
    }
}
