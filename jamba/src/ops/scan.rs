//! The selective scan: Mamba's linear recurrence over time.
//!
//! For every batch row `b`, channel `d` and state index `n`:
//!
//! ```text
//! Δₜ = softplus(δₜ + δ_bias)                   (when requested)
//! hₜ = exp(Δₜ·A[d,n]) · hₜ₋₁ + Δₜ · B[t,n] · uₜ
//! yₜ = Σₙ C[t,n] · hₜ + D[d] · uₜ
//! yₜ ← yₜ · silu(zₜ)                           (when a gate is given)
//! ```
//!
//! Two tensor-op implementations share one signature, [`ScanInput`] → [`ScanOutput`], so a fused
//! kernel can replace either ([`JambaBackend::selective_scan`](super::JambaBackend)):
//! [`selective_scan_reference`] walks time step by step (the definition, used by tests) and
//! [`selective_scan_chunked`] is the parallel form whose work is linear in the sequence length.
//! Both take an initial state and return the final one, which is what the inference cache and
//! chunked prefill need. Everything is computed in f32.

use burn::tensor::{DType, Tensor, activation::silu, backend::Backend};

/// Inputs of a selective scan, in the time-major-within-batch layout the model produces.
#[derive(Debug, Clone)]
pub struct ScanInput<B: Backend> {
    /// `u`, the conv output, `[batch, seq, channels]`.
    pub u: Tensor<B, 3>,
    /// `δ`, the time step before bias and softplus, `[batch, seq, channels]`.
    pub delta: Tensor<B, 3>,
    /// `A = −exp(A_log)`, `[channels, state]`.
    pub a: Tensor<B, 2>,
    /// `B`, `[batch, seq, state]`.
    pub b: Tensor<B, 3>,
    /// `C`, `[batch, seq, state]`.
    pub c: Tensor<B, 3>,
    /// The skip `D`, `[channels]`.
    pub d: Option<Tensor<B, 1>>,
    /// The gate `z`, `[batch, seq, channels]`; the output is multiplied by `silu(z)`.
    pub z: Option<Tensor<B, 3>>,
    /// Added to `δ` before the softplus, `[channels]`.
    pub delta_bias: Option<Tensor<B, 1>>,
    /// Whether `Δ = softplus(δ + bias)` (Jamba: always) or `Δ = δ + bias`.
    pub delta_softplus: bool,
    /// The state before the first step, `[batch, channels, state]`; zeros when absent.
    pub initial_state: Option<Tensor<B, 3>>,
}

/// Result of a selective scan.
#[derive(Debug, Clone)]
pub struct ScanOutput<B: Backend> {
    /// `y`, `[batch, seq, channels]`, f32.
    pub y: Tensor<B, 3>,
    /// The state after the last step, `[batch, channels, state]`, f32.
    pub state: Tensor<B, 3>,
}

/// `softplus` with PyTorch's threshold: `x` itself above 20, where `log1p(exp(x))` is `x` to
/// within f32 rounding and `exp` would overflow for large `x`.
pub fn softplus<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let large = x.clone().greater_elem(20.0);
    let soft = x.clone().clamp_max(20.0).exp().log1p();
    soft.mask_where(large, x)
}

/// The inputs in f32 with `Δ` resolved.
struct Prepared<B: Backend> {
    u: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    a: Tensor<B, 2>,
    b: Tensor<B, 3>,
    c: Tensor<B, 3>,
    state: Tensor<B, 3>,
}

fn prepare<B: Backend>(input: &ScanInput<B>) -> Prepared<B> {
    let f32 = |t: Tensor<B, 3>| t.cast(DType::F32);
    let [batch, _, channels] = input.u.dims();
    let state_size = input.a.dims()[1];
    let mut delta = f32(input.delta.clone());
    if let Some(bias) = &input.delta_bias {
        delta = delta + bias.clone().cast(DType::F32).unsqueeze::<3>();
    }
    if input.delta_softplus {
        delta = softplus(delta);
    }
    let state = match &input.initial_state {
        Some(s) => s.clone().cast(DType::F32),
        None => Tensor::zeros(
            [batch, channels, state_size],
            (&input.u.device(), DType::F32),
        ),
    };
    Prepared {
        u: f32(input.u.clone()),
        delta,
        a: input.a.clone().cast(DType::F32),
        b: f32(input.b.clone()),
        c: f32(input.c.clone()),
        state,
    }
}

/// `y + D·u`, then the gate.
fn finish<B: Backend>(input: &ScanInput<B>, u: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    let mut y = y;
    if let Some(d) = &input.d {
        y = y + u * d.clone().cast(DType::F32).unsqueeze::<3>();
    }
    if let Some(z) = &input.z {
        y = y * silu(z.clone().cast(DType::F32));
    }
    y
}

/// The recurrence one time step at a time: the definition, used as the reference in tests and
/// for single-token decoding. Its cost is `seq` small steps.
pub fn selective_scan_reference<B: Backend>(input: ScanInput<B>) -> ScanOutput<B> {
    let p = prepare(&input);
    let [batch, seq, channels] = p.u.dims();
    let state_size = p.a.dims()[1];
    let a = p.a.clone().unsqueeze::<3>(); // [1, D, N]
    let mut h = p.state;
    let mut ys = Vec::with_capacity(seq);
    for t in 0..seq {
        let step = |x: &Tensor<B, 3>, w: usize| x.clone().slice([0..batch, t..t + 1, 0..w]);
        let delta = step(&p.delta, channels).reshape([batch, channels, 1]);
        let u = step(&p.u, channels).reshape([batch, channels, 1]);
        let b = step(&p.b, state_size).reshape([batch, 1, state_size]);
        let c = step(&p.c, state_size).reshape([batch, 1, state_size]);
        let decay = (delta.clone() * a.clone()).exp();
        h = decay * h + (delta * u) * b;
        ys.push((h.clone() * c).sum_dim(2).reshape([batch, 1, channels]));
    }
    let y = Tensor::cat(ys, 1);
    ScanOutput {
        y: finish(&input, p.u, y),
        state: h,
    }
}

/// A chunk length for the chunked scan: about 2·√seq. The two sequential loops (`T` steps inside
/// the chunks, `seq / T` across them) balance at √seq, but the steps inside the chunks work on
/// one contiguous block each while the carry steps slice across chunks, so longer chunks win
/// (measured on flex at 1,024 steps: chunks of 64 beat chunks of 32 by 1.2×).
pub fn default_chunk_len(seq: usize) -> usize {
    ((2.0 * (seq as f64).sqrt()).ceil() as usize).clamp(1, 256)
}

/// The parallel scan in chunks of `chunk_len` steps (`None`: [`default_chunk_len`]).
///
/// All chunks are scanned at once from a zero state (`chunk_len` steps over the whole sequence),
/// then the chunk boundary states are carried across chunks (`seq / chunk_len` small steps), then
/// each position adds its carried-in state times its cumulative decay. Work is linear in `seq`;
/// every factor that multiplies a state is a product of `exp(Δ·A) ≤ 1`, so nothing overflows
/// however long the chunk (unlike a cumulative sum of `exp(−ΣΔA)`). Memory holds a few
/// `[batch, seq, channels, state]` tensors; feed long prompts in pieces to bound it.
pub fn selective_scan_chunked<B: Backend>(
    input: ScanInput<B>,
    chunk_len: Option<usize>,
) -> ScanOutput<B> {
    let p = prepare(&input);
    let [batch, seq, channels] = p.u.dims();
    let state_size = p.a.dims()[1];
    let chunk = chunk_len
        .unwrap_or_else(|| default_chunk_len(seq))
        .clamp(1, seq.max(1));
    let chunks = seq.div_ceil(chunk);
    let padded = chunks * chunk;
    let device = p.u.device();

    // The big [.., D, N] tensors are laid out [step-in-chunk, batch, chunk, D, N]: one step of
    // every chunk is one contiguous block at the front, so the per-step slices below are plain
    // sub-buffers (CPU backends run element-wise ops on them at full speed; a slice along an
    // inner dimension is a strided view that takes their slow path). Only the small
    // [batch, seq, D] inputs are permuted. Padding steps have Δ = 0, so exp(Δ·A) = 1 and
    // Δ·B·u = 0: they leave the state unchanged.
    let by_step = |x: Tensor<B, 3>| {
        let [b, _, w] = x.dims();
        let x = if padded == seq {
            x
        } else {
            Tensor::cat(
                vec![
                    x,
                    Tensor::zeros([b, padded - seq, w], (&device, DType::F32)),
                ],
                1,
            )
        };
        // [T, b, chunks, w], materialised: merging the permuted dims cannot be a view.
        x.reshape([b, chunks, chunk, w])
            .permute([2, 0, 1, 3])
            .reshape([chunk * b * chunks, w])
            .reshape([chunk, b, chunks, w])
    };
    let delta = by_step(p.delta); // [T, b, chunks, D]
    let u = by_step(p.u.clone());
    let rows = chunk * batch * chunks;
    let b3 = by_step(p.b).reshape([rows, 1, state_size]);
    let c4 = by_step(p.c).reshape([chunk, batch * chunks, state_size, 1]);
    let a = p.a.reshape([1, 1, 1, channels, state_size]);
    let decay = (delta.clone().unsqueeze_dim::<5>(4) * a).exp(); // [T, b, chunks, D, N]
    // Δ·u ⊗ B as a batched outer product (a matmul with inner size 1, not a broadcast).
    let drive = (delta * u)
        .reshape([rows, channels, 1])
        .matmul(b3)
        .reshape([chunk, batch, chunks, channels, state_size]);

    // 1. Every chunk from a zero state; `cumulative` is the product of decays since chunk start.
    let at = |x: &Tensor<B, 5>, t: usize| x.clone().slice([t..t + 1]);
    let mut h = at(&drive, 0);
    let mut cumulative = at(&decay, 0);
    let mut hs = Vec::with_capacity(chunk);
    let mut cs = Vec::with_capacity(chunk);
    hs.push(h.clone());
    cs.push(cumulative.clone());
    for t in 1..chunk {
        let a_t = at(&decay, t);
        h = a_t.clone() * h + at(&drive, t);
        cumulative = cumulative * a_t;
        hs.push(h.clone());
        cs.push(cumulative.clone());
    }
    drop((decay, drive));

    // 2. Carry the boundary states across chunks: `h` and `cumulative` now hold each chunk's
    //    end state and total decay, [1, b, chunks, D, N].
    let mut carry = p.state.reshape([1, batch, 1, channels, state_size]);
    let mut carried = Vec::with_capacity(chunks);
    for c in 0..chunks {
        carried.push(carry.clone());
        let pick = |x: &Tensor<B, 5>| x.clone().slice([0..1, 0..batch, c..c + 1]);
        carry = pick(&cumulative) * carry + pick(&h);
    }
    let carried = Tensor::cat(carried, 2); // [1, b, chunks, D, N]

    // 3. Every position adds its carried-in state, decayed to it, and contracts with C (a
    //    batched matrix-vector product).
    let ys: Vec<Tensor<B, 3>> = hs
        .into_iter()
        .zip(cs)
        .enumerate()
        .map(|(t, (h, cum))| {
            let c_t = c4
                .clone()
                .slice([t..t + 1])
                .reshape([batch * chunks, state_size, 1]);
            (h + cum * carried.clone())
                .reshape([batch * chunks, channels, state_size])
                .matmul(c_t)
                .reshape([1, batch * chunks, channels])
        })
        .collect();
    let y = Tensor::cat(ys, 0) // [T, b · chunks, D]
        .reshape([chunk, batch, chunks, channels])
        .permute([1, 2, 0, 3])
        .reshape([batch, padded, channels])
        .slice([0..batch, 0..seq]);
    let state = carry.reshape([batch, channels, state_size]);
    ScanOutput {
        y: finish(&input, p.u, y),
        state,
    }
}

/// The tensor-op scan a backend without kernels uses: step by step for a few tokens
/// (decoding), chunked otherwise. `y` comes back in the dtype of `u`.
pub fn selective_scan_tensor_ops<B: Backend>(input: ScanInput<B>) -> ScanOutput<B> {
    let dtype = input.u.dtype();
    let out = if input.u.dims()[1] <= 4 {
        selective_scan_reference(input)
    } else {
        selective_scan_chunked(input, None)
    };
    ScanOutput {
        y: out.y.cast(dtype),
        state: out.state,
    }
}

/// Gradients of a selective scan, one per input of [`ScanInput`], each in its input's dtype.
#[derive(Debug, Clone)]
pub struct ScanGrads<B: Backend> {
    /// `∂u`.
    pub u: Tensor<B, 3>,
    /// `∂δ` (before bias and softplus).
    pub delta: Tensor<B, 3>,
    /// `∂A`.
    pub a: Tensor<B, 2>,
    /// `∂B`.
    pub b: Tensor<B, 3>,
    /// `∂C`.
    pub c: Tensor<B, 3>,
    /// `∂D`.
    pub d: Tensor<B, 1>,
    /// `∂z`, when there is a gate.
    pub z: Option<Tensor<B, 3>>,
    /// `∂bias`.
    pub delta_bias: Tensor<B, 1>,
    /// `∂` initial state.
    pub initial_state: Tensor<B, 3>,
}
