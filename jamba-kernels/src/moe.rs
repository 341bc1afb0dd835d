//! A mixture-of-experts feed-forward for a few tokens (a decoding step) with the routing on the
//! device: `Σⱼ pⱼ · down[eⱼ](silu(gate[eⱼ](x)) · up[eⱼ](x))` over each token's top-k experts `eⱼ`
//! of the softmax router, `pⱼ` not renormalised.
//!
//! The grouped form (sort the (token, slot) pairs by expert, run each expert on its block)
//! needs the routing on the host: one device-to-host read per MoE layer, then three products
//! and a few element-wise launches per active expert, ~40 launches for one token. Here every
//! (token, slot) pair is a row that reads its own expert's weights, chosen on the device: five
//! launches whatever the routing (the router's softmax and top-k; the gate and up products of
//! every slot, paired; their SiLU gate; the down products; the weighted sum over the slots).
//! A slot streams its expert's weights on its own, so an expert chosen by two tokens is read
//! twice: this is for few tokens ([`MAX_SLOTS`]), where launches, not bytes, bound the step.
//!
//! The products are cut like [`crate::gemv`]'s: a unit per (column, slice of `k`, slot)
//! accumulating in f32, a second launch summing the slices. Where the widths split into
//! 16-byte vectors and the weights are contiguous ([`takes_vector_form`]), each stage is one
//! launch instead: a unit loads 16 bytes of a weight row at once and a cube holds all of `k`
//! for its columns, so the slices meet in shared memory (three launches with the routing).
//!
//! Rounding follows the reference in the tensors' dtype: each product rounded, SiLU of the
//! rounded gate rounded, their product rounded; each expert's output rounded, times its
//! rounded routing weight, rounded.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use burn_std::DType;
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;

use crate::gemv::{COLS, SLICES, load_weight_rows, plan, slice_totals};

/// The most (token, slot) pairs [`routed_experts`] takes.
pub const MAX_SLOTS: usize = 64;
/// The most experts a token may take ([`routed_experts`]'s `top_k`).
pub const MAX_TOP_K: usize = 8;
/// Cubes along x (wgpu allows 65,535 per dimension).
const MAX_CUBES_X: usize = 65_535;

#[cube(launch_unchecked)]
fn route_kernel<F: Float>(
    logits: &CubeArg<F>,
    weights: &mut CubeArg<F>,
    indices: &mut CubeArg<u32>,
    tokens: u32,
    #[comptime] top_k: usize,
    #[define(F)] _dtype: StorageType,
) {
    // A unit per token: the softmax in f32 over its experts; an expert's rank is the number of
    // experts ahead of it (a larger logit, or an equal one at a lower index), and the experts
    // ranked below k fill the token's k slots in rank order. (No selection state to carry
    // between passes: each expert's rank is counted on its own.)
    let t = ABSOLUTE_POS;
    if t >= tokens as usize {
        terminate!();
    }
    let experts = logits.shape(1);
    let base = t * logits.stride(0);
    let step = logits.stride(1);
    let mut max = f32::cast_from(logits[base]);
    for e in 1..experts {
        max = max.max(f32::cast_from(logits[base + e * step]));
    }
    let mut sum = 0.0f32;
    for e in 0..experts {
        sum += f32::exp(f32::cast_from(logits[base + e * step]) - max);
    }
    for e in 0..experts {
        let value = f32::cast_from(logits[base + e * step]);
        let mut rank = 0usize;
        for o in 0..experts {
            let other = f32::cast_from(logits[base + o * step]);
            if other > value || (other == value && o < e) {
                rank += 1;
            }
        }
        if rank < top_k {
            weights[t * top_k + rank] = F::cast_from(f32::exp(value - max) / sum);
            indices[t * top_k + rank] = e as u32;
        }
    }
}

/// The most units a cube of [`route_normed_kernel`] takes (wgpu's limit).
const ROUTE_UNITS: usize = 256;
/// The widest hidden state [`routed_experts_normed`] takes: its cube keeps a token's hidden
/// state in shared memory (f32).
pub const ROUTE_MAX_HIDDEN: usize = 8192;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn route_normed_kernel<F: Float>(
    x: &crate::Strided<F>,
    first: &crate::Strided<F>,
    second: &crate::Strided<F>,
    norm: &crate::Strided<F>,
    router: &crate::Strided<F>,
    residual: &mut crate::Strided<F>,
    normed: &mut crate::Strided<F>,
    logits: &mut crate::Strided<F>,
    weights: &mut crate::Strided<F>,
    indices: &mut crate::Strided<u32>,
    eps: f32,
    #[comptime] hidden: usize,
    #[comptime] experts: usize,
    #[comptime] units: usize,
    #[comptime] top_k: usize,
    #[comptime] add_first: bool,
    #[define(F)] _dtype: StorageType,
) {
    // A cube per token. Its units stride over the hidden state: the residual sum (each
    // addition rounded to the dtype), its sum of squares halved down the cube, the normalised
    // value (rounded, times the weight, rounded), kept in shared memory. Then the router's
    // product: unit u sums expert u mod `experts` over every `units`-th weight of the
    // `[hidden, experts]` matrix (`experts` divides `units`, both powers of two), eight loads
    // in flight at a time; halving the cube down to `experts` adds each expert's partial sums.
    // Last, unit e < experts rounds its logit and ranks it against the others (softmax in
    // f32; ties to the lower index), as `route_kernel` does.
    let t = CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let mut state = SharedMemory::<f32>::new(hidden);
    let mut part = SharedMemory::<f32>::new(units);
    let mut sq = 0.0f32;
    let mut j = u;
    while j < hidden {
        let mut v = f32::cast_from(x.buf[t * x.stride(0usize) + j * x.stride(1usize)]);
        if comptime!(add_first) {
            v = f32::cast_from(F::cast_from(
                v + f32::cast_from(first.buf[t * first.stride(0usize) + j * first.stride(1usize)]),
            ));
        }
        let sum = F::cast_from(
            v + f32::cast_from(second.buf[t * second.stride(0usize) + j * second.stride(1usize)]),
        );
        residual.buf[t * residual.stride(0usize) + j * residual.stride(1usize)] = sum;
        v = f32::cast_from(sum);
        state[j] = v;
        sq += v * v;
        j += units;
    }
    part[u] = sq;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if u < half {
            part[u] = part[u] + part[u + half];
        }
        sync_cube();
        half /= 2;
    }
    let inv = 1.0f32 / f32::sqrt(part[0] / f32::cast_from(hidden) + eps);
    sync_cube();
    let mut j = u;
    while j < hidden {
        let scaled = F::cast_from(state[j] * inv);
        let value = F::cast_from(
            f32::cast_from(scaled) * f32::cast_from(norm.buf[j * norm.stride(0usize)]),
        );
        normed.buf[t * normed.stride(0usize) + j * normed.stride(1usize)] = value;
        state[j] = f32::cast_from(value);
        j += units;
    }
    sync_cube();
    let total = hidden * experts;
    let e = u % experts;
    let (rs0, rs1) = (router.stride(0usize), router.stride(1usize));
    let mut acc = 0.0f32;
    let mut i = u;
    while i + 7 * units < total {
        let mut w = Array::<f32>::new(8usize);
        #[unroll]
        for q in 0..8usize {
            w[q] = f32::cast_from(router.buf[((i + q * units) / experts) * rs0 + e * rs1]);
        }
        #[unroll]
        for q in 0..8usize {
            acc += state[(i + q * units) / experts] * w[q];
        }
        i += 8 * units;
    }
    while i < total {
        acc += state[i / experts] * f32::cast_from(router.buf[(i / experts) * rs0 + e * rs1]);
        i += units;
    }
    part[u] = acc;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half >= experts {
        if u < half {
            part[u] = part[u] + part[u + half];
        }
        sync_cube();
        half /= 2;
    }
    let mut scores = SharedMemory::<f32>::new(experts);
    if u < experts {
        let logit = F::cast_from(part[u]);
        logits.buf[t * logits.stride(0usize) + u * logits.stride(1usize)] = logit;
        scores[u] = f32::cast_from(logit);
    }
    sync_cube();
    if u < experts {
        let value = scores[u];
        let mut max = scores[0];
        let mut rank = 0usize;
        for o in 0..experts {
            let other = scores[o];
            max = max.max(other);
            if other > value || (other == value && o < u) {
                rank += 1;
            }
        }
        if rank < top_k {
            let mut sum = 0.0f32;
            for o in 0..experts {
                sum += f32::exp(scores[o] - max);
            }
            weights.buf[t * top_k + rank] = F::cast_from(f32::exp(value - max) / sum);
            indices.buf[t * top_k + rank] = u as u32;
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn routed_partial_kernel<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    w2: &CubeArg<F>,
    indices: &CubeArg<u32>,
    partial: &mut CubeArg<f32>,
    k: u32,
    n: u32,
    k_per_slice: u32,
    slots_per_row: u32,
    #[comptime] paired: bool,
    #[comptime] dense: bool,
    #[define(F)] _dtype: StorageType,
) {
    // Unit: (column, slice of k) within the cube grid's x and y, the slot along z. Slot s
    // multiplies row s / slots_per_row of x by the weight of expert indices[s] (and, paired, by
    // the second weight of the same expert).
    let (k, n, k_per_slice) = (k as usize, n as usize, k_per_slice as usize);
    let col = (CUBE_POS_X * COLS as u32 + UNIT_POS_X) as usize;
    let slice = (CUBE_POS_Y * SLICES as u32 + UNIT_POS_Y) as usize;
    let slot = CUBE_POS_Z as usize;
    if col >= n {
        terminate!();
    }
    let (slots, slices) = (
        CUBE_COUNT_Z as usize,
        (CUBE_COUNT_Y * SLICES as u32) as usize,
    );
    let row = slot / slots_per_row as usize;
    let k0 = slice * k_per_slice;
    let k1 = min(k0 + k_per_slice, k);
    // Dense (a plain MLP): the weights are `[k, n]`, one for every slot.
    let mut w_base = col * w.stride(1);
    let mut w_step = w.stride(0);
    let mut w2_base = col * w2.stride(1);
    let mut w2_step = w2.stride(0);
    if comptime!(!dense) {
        let expert = indices[slot] as usize;
        w_base = expert * w.stride(0) + col * w.stride(2);
        w_step = w.stride(1);
        w2_base = expert * w2.stride(0) + col * w2.stride(2);
        w2_step = w2.stride(1);
    }
    let x_base = row * x.stride(0);
    let mut acc = 0.0f32;
    let mut acc2 = 0.0f32;
    let xs = x.stride(1);
    let mut kk = k0;
    // Four steps' loads issued before their products (the H200's MoE and MLP products: 208
    // → 196 µs per bench-jamba-1b step; the same by hand in the GEMV was slower).
    while kk + 4 <= k1 {
        let x0 = f32::cast_from(x[x_base + kk * xs]);
        let x1 = f32::cast_from(x[x_base + (kk + 1) * xs]);
        let x2 = f32::cast_from(x[x_base + (kk + 2) * xs]);
        let x3 = f32::cast_from(x[x_base + (kk + 3) * xs]);
        let wb = w_base + kk * w_step;
        acc += x0 * f32::cast_from(w[wb])
            + x1 * f32::cast_from(w[wb + w_step])
            + x2 * f32::cast_from(w[wb + 2 * w_step])
            + x3 * f32::cast_from(w[wb + 3 * w_step]);
        if comptime!(paired) {
            let wb2 = w2_base + kk * w2_step;
            acc2 += x0 * f32::cast_from(w2[wb2])
                + x1 * f32::cast_from(w2[wb2 + w2_step])
                + x2 * f32::cast_from(w2[wb2 + 2 * w2_step])
                + x3 * f32::cast_from(w2[wb2 + 3 * w2_step]);
        }
        kk += 4;
    }
    while kk < k1 {
        let xv = f32::cast_from(x[x_base + kk * xs]);
        acc += xv * f32::cast_from(w[w_base + kk * w_step]);
        if comptime!(paired) {
            acc2 += xv * f32::cast_from(w2[w2_base + kk * w2_step]);
        }
        kk += 1;
    }
    partial[(slice * slots + slot) * n + col] = acc;
    if comptime!(paired) {
        partial[((slices + slice) * slots + slot) * n + col] = acc2;
    }
}

/// Unit `(lane, group)` of a cube of `COLS × groups` sums slices `group, group + groups, …` of
/// `partial[s · stride + i]` for `i = base + lane` (0 where `!active`); the cube adds its
/// groups in shared memory and returns the total to the units of group 0. (One unit summing
/// every slice alone waited one load latency per slice: 31 µs for a MoE layer's 2 × 128
/// slices on the H200.)
#[cube]
fn cube_slice_sum(
    partial: &CubeArg<f32>,
    base: usize,
    stride: usize,
    slices: usize,
    active: bool,
    #[comptime] groups: usize,
) -> f32 {
    let lane = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let mut sum = 0.0f32;
    if active {
        let mut s = group;
        while s < slices {
            sum += partial[s * stride + base + lane];
            s += groups;
        }
    }
    let mut shared = SharedMemory::<f32>::new(groups * COLS);
    shared[group * COLS + lane] = sum;
    sync_cube();
    let mut total = 0.0f32;
    if group == 0 {
        #[unroll]
        for g in 0..groups {
            total += shared[g * COLS + lane];
        }
    }
    sync_cube();
    total
}

#[cube(launch_unchecked)]
fn gate_up_reduce_kernel<F: Float>(
    partial: &CubeArg<f32>,
    act: &mut CubeArg<F>,
    slots: u32,
    n: u32,
    slices: u32,
    #[comptime] groups: usize,
    #[define(F)] _dtype: StorageType,
) {
    // `silu(gate) · up` of one (slot, column) per lane (a cube per 32 of them): each product
    // rounded, the SiLU of the rounded gate rounded, the product of the two rounded.
    let (slots, n, slices) = (slots as usize, n as usize, slices as usize);
    let base = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * COLS;
    let i = base + UNIT_POS_X as usize;
    let active = i < slots * n;
    let stride = slots * n;
    let gate = cube_slice_sum(partial, base, stride, slices, active, groups);
    let up = cube_slice_sum(
        partial,
        slices * stride + base,
        stride,
        slices,
        active,
        groups,
    );
    if active && UNIT_POS_Y == 0 {
        let gate = f32::cast_from(F::cast_from(gate));
        let silu = f32::cast_from(F::cast_from(gate / (1.0f32 + f32::exp(-gate))));
        act[i] = F::cast_from(silu * f32::cast_from(F::cast_from(up)));
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn down_reduce_kernel<F: Float>(
    partial: &CubeArg<f32>,
    weights: &CubeArg<F>,
    y: &mut CubeArg<F>,
    tokens: u32,
    n: u32,
    slices: u32,
    #[comptime] top_k: usize,
    #[comptime] weighted: bool,
    #[comptime] groups: usize,
    #[define(F)] _dtype: StorageType,
) {
    // One (token, column) per lane, a cube per token and 32 columns: the token's experts'
    // outputs, each rounded and weighted, summed (unweighted: a dense MLP's one output).
    let (tokens, n, slices) = (tokens as usize, n as usize, slices as usize);
    let t = CUBE_POS_Y as usize;
    let base = CUBE_POS_X as usize * COLS;
    let col = base + UNIT_POS_X as usize;
    let active = col < n;
    let slots = tokens * top_k;
    let mut acc = 0.0f32;
    #[unroll]
    for j in 0..top_k {
        let slot = t * top_k + j;
        let out = cube_slice_sum(partial, slot * n + base, slots * n, slices, active, groups);
        let mut term = f32::cast_from(F::cast_from(out));
        if comptime!(weighted) {
            term = f32::cast_from(F::cast_from(term * f32::cast_from(weights[slot])));
        }
        acc += term;
    }
    if active && UNIT_POS_Y == 0 {
        y[t * y.stride(0) + col * y.stride(1)] = F::cast_from(acc);
    }
}

/// The experts' weights in Burn's `[in, out]` layout, stacked over the experts.
#[derive(Debug, Clone)]
pub struct ExpertWeights<R: CubeRuntime> {
    /// `[experts, hidden, intermediate]`.
    pub gate: CubeTensor<R>,
    /// `[experts, hidden, intermediate]`.
    pub up: CubeTensor<R>,
    /// `[experts, intermediate, hidden]`.
    pub down: CubeTensor<R>,
}

/// The router's softmax and top-k for any number of tokens: `logits` `[tokens, experts]` (any
/// strides, any float dtype) gives each token's `top_k` routing weights, softmax
/// probabilities in f32 rounded to the logits' dtype and not renormalised, `[tokens · top_k]`
/// in the logits' dtype, and their experts `[tokens · top_k]` (u32), slot order (largest
/// first; an equal logit at a lower index ranks first). One launch, a unit per token: for a
/// prefill's grouped experts, whose sort by expert is then the only read back to the host.
///
/// # Panics
/// If `top_k` is 0 or exceeds the number of experts (the caller checks).
pub fn route<R: CubeRuntime>(
    logits: CubeTensor<R>,
    top_k: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [tokens, experts] = [logits.meta.shape()[0], logits.meta.shape()[1]];
    assert!(
        (1..=experts).contains(&top_k),
        "route: top {top_k} of {experts} experts"
    );
    let (client, device, dtype) = (logits.client.clone(), logits.device.clone(), logits.dtype);
    let [weights, indices]: [CubeTensor<R>; 2] = crate::empty_many(
        &client,
        &device,
        &[(&[tokens * top_k], dtype), (&[tokens * top_k], DType::U32)],
    )
    .try_into()
    .expect("two tensors");
    if tokens == 0 {
        return (weights, indices);
    }
    let cubes = tokens.div_ceil(64);
    let (x, y) = (cubes.min(MAX_CUBES_X), cubes.div_ceil(MAX_CUBES_X));
    // SAFETY: units past `tokens` return first; the others read their row of `logits` (its
    // own strides) and write their `top_k` entries of `weights` and `indices`, `[tokens · top_k]`.
    unsafe {
        route_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(x as u32, y as u32, 1),
            CubeDim::new_1d(64),
            logits.into_tensor_arg(),
            weights.clone().into_tensor_arg(),
            indices.clone().into_tensor_arg(),
            tokens as u32,
            top_k,
            dtype.into(),
        );
    }
    (weights, indices)
}

/// The mixture of experts of `x` `[tokens, hidden]` given the router's `logits`
/// `[tokens, experts]`: returns `[tokens, hidden]`. Every tensor shares one float dtype,
/// which the result has; arithmetic is f32. Any strides.
///
/// # Panics
/// If `tokens · top_k` exceeds [`MAX_SLOTS`], `top_k` exceeds [`MAX_TOP_K`] or the number of
/// experts, or the shapes disagree (the caller checks).
pub fn routed_experts<R: CubeRuntime>(
    x: CubeTensor<R>,
    logits: CubeTensor<R>,
    weights: ExpertWeights<R>,
    top_k: usize,
) -> CubeTensor<R> {
    routed_experts_stages(x, logits, weights, top_k).y
}

/// Every intermediate buffer of [`routed_experts`], for tests that locate a wrong stage.
#[doc(hidden)]
#[derive(Debug)]
pub struct RoutedStages<R: CubeRuntime> {
    /// `[tokens · top_k]` routing weights, slot order.
    pub routing: CubeTensor<R>,
    /// `[tokens · top_k]` (u32) experts, slot order.
    pub indices: CubeTensor<R>,
    /// `[2, slices, slots, inner]` f32 partial sums of the gate and up products.
    pub gate_up_partial: Option<CubeTensor<R>>,
    /// `[slots, inner]`.
    pub act: Option<CubeTensor<R>>,
    /// `[slices, slots, hidden]` f32 partial sums of the down products.
    pub down_partial: Option<CubeTensor<R>>,
    /// `[tokens, hidden]`.
    pub y: CubeTensor<R>,
}

/// [`routed_experts`] keeping its intermediate buffers.
#[doc(hidden)]
pub fn routed_experts_stages<R: CubeRuntime>(
    x: CubeTensor<R>,
    logits: CubeTensor<R>,
    weights: ExpertWeights<R>,
    top_k: usize,
) -> RoutedStages<R> {
    let [tokens, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    let experts = logits.meta.shape()[1];
    let inner = weights.gate.meta.shape()[2];
    let slots = tokens * top_k;
    assert!(
        slots <= MAX_SLOTS && (1..=MAX_TOP_K.min(experts)).contains(&top_k),
        "routed_experts: {tokens} tokens, top {top_k} of {experts} experts"
    );
    for (name, t, shape) in [
        ("gate", &weights.gate, [experts, hidden, inner]),
        ("up", &weights.up, [experts, hidden, inner]),
        ("down", &weights.down, [experts, inner, hidden]),
    ] {
        assert_eq!(t.meta.shape().as_slice(), shape, "routed_experts: {name}");
    }
    let (client, device, dtype) = (x.client.clone(), x.device.clone(), x.dtype);
    // The routing (one launch; nothing for no tokens), then the experts on its slots.
    let (routing, indices) = route(logits, top_k);
    // Contiguous, not the runtime's preferred layout: CUDA pads each row of an `empty` tensor
    // to a power of two of bytes (a `[slots, 72]` f32 buffer gets rows of 128), and these
    // buffers are written by linear index. (That padding was session 7's "wrong on CUDA for
    // widths that are not powers of two": `act` written densely, read back through its padded
    // row stride.)
    let [y]: [CubeTensor<R>; 1] =
        crate::empty_many(&client, &device, &[(&[tokens, hidden], dtype)])
            .try_into()
            .expect("one tensor");
    let stages = |y| RoutedStages {
        routing: routing.clone(),
        indices: indices.clone(),
        gate_up_partial: None,
        act: None,
        down_partial: None,
        y,
    };
    if tokens == 0 || hidden == 0 {
        return stages(y);
    }
    if inner == 0 {
        return stages(burn_cubecl::ops::numeric::zeros_client(
            client,
            device,
            [tokens, hidden].into(),
            dtype,
        ));
    }

    let (gate_up_partial, act, down_partial) = expert_mlp::<R>(
        x,
        [weights.gate, weights.up, weights.down],
        indices.clone(),
        Some(routing.clone()),
        y.clone(),
        top_k,
    );
    RoutedStages {
        gate_up_partial,
        act: Some(act),
        down_partial,
        ..stages(y)
    }
}

/// The residual connection(s) and the RMSNorm before a layer's feed-forward block, for
/// [`crate::mlp::swiglu_normed`] and [`routed_experts_normed`]: the residual `s = (x + first) + second`,
/// each sum rounded to the dtype, and the block's input `rms_norm(s)`.
#[derive(Debug, Clone)]
pub struct ResidualNorm<R: CubeRuntime> {
    /// The residual stream `[rows, hidden]` (a row per token).
    pub x: CubeTensor<R>,
    /// Added to `x` first, when present (the previous layer's feed-forward output, still
    /// pending).
    pub first: Option<CubeTensor<R>>,
    /// The mixer's output, `[rows, hidden]`, added second.
    pub second: CubeTensor<R>,
    /// The norm's weight, `[hidden]`.
    pub norm: CubeTensor<R>,
    /// The norm's epsilon.
    pub eps: f64,
}

impl<R: CubeRuntime> ResidualNorm<R> {
    /// `[rows, hidden]`, the shape of `x`.
    ///
    /// # Panics
    /// If an update's shape is not that of `x` or the norm's weight is not `[hidden]`; `what`
    /// names the caller.
    pub(crate) fn check_shapes(&self, what: &str) -> [usize; 2] {
        let [rows, hidden] = [self.x.meta.shape()[0], self.x.meta.shape()[1]];
        for t in self.first.iter().chain([&self.second]) {
            assert_eq!(t.meta.shape(), self.x.meta.shape(), "{what}: updates");
        }
        assert_eq!(self.norm.meta.shape()[0], hidden, "{what}: norm");
        [rows, hidden]
    }
}

/// A MoE layer's input side fused for a decoding step: the residual connection(s) before the
/// layer's pre-feed-forward RMSNorm, the norm, and the router's product (`[hidden, experts]`,
/// no bias) run in the route kernel's launch, a cube per token, instead of three launches
/// (the norm, the router's GEMV, the routing).
#[derive(Debug, Clone)]
pub struct NormedRouting<R: CubeRuntime> {
    /// The residual sums and the norm, a row per token.
    pub sum: ResidualNorm<R>,
    /// The router's weight, `[hidden, experts]`.
    pub router: CubeTensor<R>,
}

/// What [`routed_experts_normed`] returns, each `[tokens, ·]` in the dtype of `x`.
#[derive(Debug, Clone)]
pub struct NormedRoutedOutput<R: CubeRuntime> {
    /// `x (+ first) + second`: the residual stream after the mixer.
    pub residual: CubeTensor<R>,
    /// The mixture's output, `[tokens, hidden]`.
    pub y: CubeTensor<R>,
    /// The router's logits, `[tokens, experts]`.
    pub logits: CubeTensor<R>,
}

/// Whether [`routed_experts_normed`] takes this shape: `experts` a power of two up to 256,
/// `hidden` up to [`ROUTE_MAX_HIDDEN`], and [`routed_experts`]'s limits.
pub fn supports_normed_routing(tokens: usize, hidden: usize, experts: usize, top_k: usize) -> bool {
    experts.is_power_of_two()
        && experts <= ROUTE_UNITS
        && (1..=ROUTE_MAX_HIDDEN).contains(&hidden)
        && tokens * top_k <= MAX_SLOTS
        && (1..=MAX_TOP_K.min(experts)).contains(&top_k)
}

/// The residual sum, the RMSNorm and the router of a MoE layer's input ([`NormedRouting`])
/// and then its mixture of experts, as [`routed_experts`] of the normalised input and the
/// router's logits: five launches (three in the vector form) where the separate norm and
/// router took seven. Rounding as the separate operations: each sum, the normalised value and
/// its product with the norm's weight, and the logits rounded to the dtype.
///
/// # Panics
/// If [`supports_normed_routing`] refuses the shape or the shapes disagree (the caller checks).
pub fn routed_experts_normed<R: CubeRuntime>(
    input: NormedRouting<R>,
    weights: ExpertWeights<R>,
    top_k: usize,
) -> NormedRoutedOutput<R> {
    let [tokens, hidden] = input.sum.check_shapes("routed_experts_normed");
    let NormedRouting { sum, router } = input;
    let experts = router.meta.shape()[1];
    assert!(
        tokens > 0 && supports_normed_routing(tokens, hidden, experts, top_k),
        "routed_experts_normed: {tokens} tokens of {hidden}, top {top_k} of {experts} experts"
    );
    assert_eq!(
        router.meta.shape()[0],
        hidden,
        "routed_experts_normed: router"
    );
    let (client, device, dtype) = (sum.x.client.clone(), sum.x.device.clone(), sum.x.dtype);
    let slots = tokens * top_k;
    let [residual, normed, logits, routing, indices, y]: [CubeTensor<R>; 6] = crate::empty_many(
        &client,
        &device,
        &[
            (&[tokens, hidden], dtype),
            (&[tokens, hidden], dtype),
            (&[tokens, experts], dtype),
            (&[slots], dtype),
            (&[slots], DType::U32),
            (&[tokens, hidden], dtype),
        ],
    )
    .try_into()
    .expect("six tensors");
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    let units = ROUTE_UNITS.min(1 << max_units.ilog2()).max(experts);
    let add_first = sum.first.is_some();
    // Without `first` the kernel reads none: `x` stands in.
    let first = sum.first.unwrap_or_else(|| sum.x.clone());
    // SAFETY: cube t (below `tokens`) reads row t of `x`, `first` and `second` (the shape of
    // `x`) and the `[hidden]` norm and `[hidden, experts]` router below their shapes, writes
    // row t of `residual`, `normed` and `logits` and its `top_k` slots of `routing` and
    // `indices`. `units` (a power of two that `experts` divides) is the cube's size; shared
    // memory holds `hidden` + `units` + `experts` floats, each index below its size.
    unsafe {
        route_normed_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(tokens as u32, 1, 1),
            CubeDim::new_1d(units as u32),
            crate::strided(sum.x),
            crate::strided(first),
            crate::strided(sum.second),
            crate::strided(sum.norm),
            crate::strided(router),
            crate::strided(residual.clone()),
            crate::strided(normed.clone()),
            crate::strided(logits.clone()),
            crate::strided(routing.clone()),
            crate::strided(indices.clone()),
            sum.eps as f32,
            hidden,
            experts,
            units,
            top_k,
            add_first,
            dtype.into(),
        );
    }
    let inner = weights.gate.meta.shape()[2];
    if inner == 0 {
        let y =
            burn_cubecl::ops::numeric::zeros_client(client, device, [tokens, hidden].into(), dtype);
        return NormedRoutedOutput {
            residual,
            y,
            logits,
        };
    }
    expert_mlp::<R>(
        normed,
        [weights.gate, weights.up, weights.down],
        indices,
        Some(routing),
        y.clone(),
        top_k,
    );
    NormedRoutedOutput {
        residual,
        y,
        logits,
    }
}

/// The expert MLPs of every slot, `down(silu(x · gate) · (x · up))`, then their sum into `y`
/// `[tokens, hidden]`: with `routing`, over each token's `top_k` slots of experts `indices`
/// (`weights` stacked over the experts), each output weighted; without, one unweighted slot
/// per row of `x` and bare `[in, out]` weights (`indices` is not read). Returns the gate/up
/// partial sums, the SiLU gate's output and the down partial sums (the vector form,
/// [`takes_vector_form`], keeps no partial sums).
pub(crate) fn expert_mlp<R: CubeRuntime>(
    x: CubeTensor<R>,
    [gate, up, down]: [CubeTensor<R>; 3],
    indices: CubeTensor<R>,
    routing: Option<CubeTensor<R>>,
    y: CubeTensor<R>,
    top_k: usize,
) -> (Option<CubeTensor<R>>, CubeTensor<R>, Option<CubeTensor<R>>) {
    let [tokens, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    let inner = *gate.meta.shape().last().expect("a weight has a shape");
    let dense = routing.is_none();
    if takes_vector_form(&x, [&gate, &up, &down], &y, dense) {
        let act = expert_mlp_vec(x, [gate, up, down], indices, routing, y, top_k, None);
        return (None, act, None);
    }
    let slots = tokens * top_k;
    let (client, device, dtype) = (x.client.clone(), x.device.clone(), x.dtype);

    // The three scratch buffers (contiguous: see `routed_experts_stages`).
    let (per_slice, slices) = plan(hidden, 2 * slots * inner);
    let (down_per_slice, down_slices) = plan(inner, slots * hidden);
    let [gate_up_partial, act, down_partial]: [CubeTensor<R>; 3] = crate::empty_many(
        &client,
        &device,
        &[
            (&[2, slices, slots, inner], DType::F32),
            (&[slots, inner], dtype),
            (&[down_slices, slots, hidden], DType::F32),
        ],
    )
    .try_into()
    .expect("three tensors");

    // The gate and up products of every slot, then their SiLU gate.
    launch_partial::<R>(
        x,
        gate,
        Some(up),
        indices.clone(),
        gate_up_partial.clone(),
        [hidden, inner, per_slice, slices, slots, top_k],
        dense,
    );
    let groups = reduce_groups(&client, slices);
    let cubes = (slots * inner).div_ceil(COLS);
    let count = CubeCount::Static(
        cubes.min(MAX_CUBES_X) as u32,
        cubes.div_ceil(MAX_CUBES_X) as u32,
        1,
    );
    // SAFETY: units past `slots · inner` read and write nothing (but stay for the cube's
    // barriers); the others read their element of each of the `2 · slices` partial sums, and
    // those of group 0 write their own element of `act`. Shared memory holds `groups · COLS`
    // values, each written by its own unit between barriers.
    unsafe {
        gate_up_reduce_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_2d(COLS as u32, groups as u32),
            gate_up_partial.clone().into_tensor_arg(),
            act.clone().into_tensor_arg(),
            slots as u32,
            inner as u32,
            slices as u32,
            groups,
            dtype.into(),
        );
    }

    // The down products, then the (weighted) sum over each token's slots.
    let (per_slice, slices) = (down_per_slice, down_slices);
    launch_partial::<R>(
        act.clone(),
        down,
        None,
        indices,
        down_partial.clone(),
        [inner, hidden, per_slice, slices, slots, 1],
        dense,
    );
    // Unweighted, the kernel reads no routing weights: `act` stands in.
    let routing = routing.unwrap_or_else(|| act.clone());
    let groups = reduce_groups(&client, slices);
    let col_cubes = hidden.div_ceil(COLS);
    assert!(col_cubes <= MAX_CUBES_X, "routed_experts: {hidden} columns");
    // SAFETY: units whose column is past `hidden` read and write nothing (but stay for the
    // cube's barriers); the others read the partial sums of their token's `top_k` slots
    // (cube y: the token, below `tokens`) and (weighted) the slots' routing weights, and
    // those of group 0 write their element of `y`.
    unsafe {
        down_reduce_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(col_cubes as u32, tokens as u32, 1),
            CubeDim::new_2d(COLS as u32, groups as u32),
            down_partial.clone().into_tensor_arg(),
            routing.into_tensor_arg(),
            y.into_tensor_arg(),
            tokens as u32,
            hidden as u32,
            slices as u32,
            top_k,
            !dense,
            groups,
            dtype.into(),
        );
    }
    (Some(gate_up_partial), act, Some(down_partial))
}

/// Slice groups per cube of the reduction kernels: a power of two up to the slices, at most
/// 32 and as many as the device allows in a cube of `COLS` lanes.
fn reduce_groups<R: CubeRuntime>(client: &ComputeClient<R>, slices: usize) -> usize {
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    slices
        .next_power_of_two()
        .min(32)
        .min((max_units / COLS).max(1))
}

/// Launches [`routed_partial_kernel`]: `dims` is `[k, n, k per slice, slices, slots, slots per
/// row of x]`; `dense`: the weights are one `[k, n]` matrix and `indices` is not read.
fn launch_partial<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    w2: Option<CubeTensor<R>>,
    indices: CubeTensor<R>,
    partial: CubeTensor<R>,
    [k, n, per_slice, slices, slots, per_row]: [usize; 6],
    dense: bool,
) {
    let client = x.client.clone();
    let dtype = x.dtype;
    let paired = w2.is_some();
    let w2 = w2.unwrap_or_else(|| w.clone());
    let col_cubes = n.div_ceil(COLS);
    assert!(col_cubes <= MAX_CUBES_X, "routed_experts: {n} columns");
    // SAFETY: units whose column is past `n` return first; the others read row
    // `slot / per_row` of `x` (below its rows: slots = rows · per_row), the weights of expert
    // `indices[slot]` (an index the route kernel chose below the number of experts; dense:
    // the one `[k, n]` weight, and `indices` is not read), `k`
    // indices below `k` (the slice's range is clamped), and write their own element of each
    // of the `slices` (2 · slices when paired) partial sums.
    unsafe {
        routed_partial_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(col_cubes as u32, (slices / SLICES) as u32, slots as u32),
            CubeDim::new_2d(COLS as u32, SLICES as u32),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            w2.into_tensor_arg(),
            indices.into_tensor_arg(),
            partial.into_tensor_arg(),
            k as u32,
            n as u32,
            per_slice as u32,
            per_row as u32,
            paired,
            dense,
            dtype.into(),
        );
    }
}

/// The gate and up products of the vector form of the expert MLPs and their SiLU gate, in one
/// launch: cube `(c, slot)` owns column vectors `c · lanes …` of `inner` for that slot (dense:
/// every row, `rows` of them, one weight), each unit loading `width` consecutive columns of
/// both weights per row of `k` (16 bytes each), `unroll` rows before using any; the slices meet
/// in shared memory ([`crate::gemv::slice_totals`]). Rounding as [`gate_up_reduce_kernel`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn expert_gate_up_vec_kernel<F: Float, N: Size>(
    x: &Array<F>,
    first: &Array<F>,
    second: &Array<F>,
    norm: &Array<F>,
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    indices: &Array<u32>,
    act: &mut Array<Vector<F, N>>,
    residual: &mut Array<F>,
    x0: u32,
    x1: u32,
    f0: u32,
    f1: u32,
    s0: u32,
    s1: u32,
    norm_stride: u32,
    eps: f32,
    k: u32,
    n_vec: u32,
    expert_stride: u32,
    per_row: u32,
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] slices: usize,
    #[comptime] unroll: usize,
    #[comptime] dense: bool,
    #[comptime] normed: bool,
    #[comptime] add_first: bool,
    #[comptime] stage: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (k, n_vec) = (k as usize, n_vec as usize);
    let (x0, x1) = (x0 as usize, x1 as usize);
    let units = comptime!(lanes * slices);
    let lane = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let cv = CUBE_POS_X as usize * lanes + lane;
    let slot = CUBE_POS_Y as usize;
    let active = cv < n_vec;
    let mut red = SharedMemory::<f32>::new(comptime!(units * width));
    // Normalised (dense only): the residual sums, their norm, staged once per cube.
    let mut xs = SharedMemory::<f32>::new(comptime!(if normed { rows * stage } else { 1 }));
    if comptime!(normed) {
        stage_normed_rows(
            x,
            first,
            second,
            x0,
            x1,
            f0 as usize,
            f1 as usize,
            s0 as usize,
            s1 as usize,
            norm,
            norm_stride as usize,
            eps,
            residual,
            &mut xs,
            &mut red,
            k,
            rows,
            units,
            stage,
            add_first,
        );
    }
    // Dense: one slot whose `rows` rows are x's; routed: slot `slot` is row `slot / per_row`.
    let x_row = slot / per_row as usize;
    let mut base = 0usize;
    if comptime!(!dense) {
        base = indices[slot] as usize * expert_stride as usize;
    }
    let mut acc_g = Array::<f32>::new(comptime!(rows * width));
    let mut acc_u = Array::<f32>::new(comptime!(rows * width));
    #[unroll]
    for i in 0..rows * width {
        acc_g[i] = 0.0;
        acc_u[i] = 0.0;
    }
    if active {
        let mut wg = Array::<Vector<F, N>>::new(unroll);
        let mut wu = Array::<Vector<F, N>>::new(unroll);
        let mut kk = s;
        while kk < k {
            load_weight_rows(gate, base, n_vec, cv, kk, k, &mut wg, slices, unroll);
            load_weight_rows(up, base, n_vec, cv, kk, k, &mut wu, slices, unroll);
            #[unroll]
            for q in 0..unroll {
                let kq = kk + q * slices;
                if kq < k {
                    let (g, v) = (wg[q], wu[q]);
                    #[unroll]
                    for r in 0..rows {
                        let xv = if comptime!(normed) {
                            xs[r * stage + kq]
                        } else {
                            f32::cast_from(x[(x_row + r) * x0 + kq * x1])
                        };
                        #[unroll]
                        for l in 0..width {
                            acc_g[r * width + l] += xv * f32::cast_from(g[l]);
                            acc_u[r * width + l] += xv * f32::cast_from(v[l]);
                        }
                    }
                }
            }
            kk += unroll * slices;
        }
    }
    let mut g_total = Array::<f32>::new(width);
    let mut u_total = Array::<f32>::new(width);
    #[unroll]
    for r in 0..rows {
        slice_totals(
            &mut red,
            &acc_g,
            r * width,
            &mut g_total,
            width,
            lanes,
            units,
        );
        slice_totals(
            &mut red,
            &acc_u,
            r * width,
            &mut u_total,
            width,
            lanes,
            units,
        );
        if s == 0 && active {
            let mut out = Vector::<F, N>::empty();
            #[unroll]
            for l in 0..width {
                let g = f32::cast_from(F::cast_from(g_total[l]));
                let silu = f32::cast_from(F::cast_from(g / (1.0f32 + f32::exp(-g))));
                out[l] = F::cast_from(silu * f32::cast_from(F::cast_from(u_total[l])));
            }
            act[(slot + r) * n_vec + cv] = out;
        }
    }
}

/// The prologue of a normalised dense gate/up launch: each row's residual sum
/// `s = (x + first) + second` (`first` only with `add_first`; each addition rounded to the
/// dtype, as [`route_normed_kernel`] does), written to `residual` (`[rows, k]`, contiguous) by
/// cube 0, and its RMSNorm (rounded, times the weight, rounded) staged as f32 in `xs` (`stage`
/// floats a row) for the products. `red` (at least `rows · units` floats) holds the sums of
/// squares. Ends with a barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_normed_rows<F: Float>(
    x: &Array<F>,
    first: &Array<F>,
    second: &Array<F>,
    x0: usize,
    x1: usize,
    f0: usize,
    f1: usize,
    s0: usize,
    s1: usize,
    norm: &Array<F>,
    norm_stride: usize,
    eps: f32,
    residual: &mut Array<F>,
    xs: &mut SharedMemory<f32>,
    red: &mut SharedMemory<f32>,
    k: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] stage: usize,
    #[comptime] add_first: bool,
) {
    let u = UNIT_POS as usize;
    let writer = CUBE_POS_X == 0;
    #[unroll]
    for r in 0..rows {
        let mut sq = 0.0f32;
        let mut j = u;
        while j < k {
            let mut v = f32::cast_from(x[r * x0 + j * x1]);
            if comptime!(add_first) {
                v = f32::cast_from(F::cast_from(v + f32::cast_from(first[r * f0 + j * f1])));
            }
            let sum = F::cast_from(v + f32::cast_from(second[r * s0 + j * s1]));
            if writer {
                residual[r * k + j] = sum;
            }
            v = f32::cast_from(sum);
            xs[r * stage + j] = v;
            sq += v * v;
            j += units;
        }
        red[r * units + u] = sq;
    }
    crate::gemv::normalise_staged(xs, red, norm, norm_stride, eps, k, rows, units, stage);
}

/// The down products of the vector form of the expert MLPs and their (weighted) sum, in one
/// launch: cube `(c, t)` owns column vectors `c · lanes …` of token `t`'s output and runs
/// through the token's `top_k` slots (dense: the `rows` rows, one weight), each slot's sum over
/// the slices rounded, weighted and rounded before the next is added, as
/// [`down_reduce_kernel`] does.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn expert_down_vec_kernel<F: Float, N: Size>(
    act: &Array<F>,
    down: &Array<Vector<F, N>>,
    indices: &Array<u32>,
    routing: &Array<F>,
    y: &mut Array<Vector<F, N>>,
    k: u32,
    n_vec: u32,
    expert_stride: u32,
    #[comptime] rows: usize,
    #[comptime] top_k: usize,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] slices: usize,
    #[comptime] unroll: usize,
    #[comptime] dense: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (k, n_vec) = (k as usize, n_vec as usize);
    let units = comptime!(lanes * slices);
    // Dense: `rows` outputs from one weight; routed: `top_k` slots of one output.
    let terms = comptime!(if dense { rows } else { top_k });
    let lane = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let cv = CUBE_POS_X as usize * lanes + lane;
    let t = CUBE_POS_Y as usize;
    let active = cv < n_vec;
    let mut acc = Array::<f32>::new(comptime!(terms * width));
    #[unroll]
    for i in 0..terms * width {
        acc[i] = 0.0;
    }
    if active {
        let mut wv = Array::<Vector<F, N>>::new(unroll);
        if comptime!(dense) {
            let mut kk = s;
            while kk < k {
                load_weight_rows(down, 0, n_vec, cv, kk, k, &mut wv, slices, unroll);
                #[unroll]
                for q in 0..unroll {
                    let kq = kk + q * slices;
                    if kq < k {
                        let w = wv[q];
                        #[unroll]
                        for r in 0..rows {
                            let a = f32::cast_from(act[r * k + kq]);
                            #[unroll]
                            for l in 0..width {
                                acc[r * width + l] += a * f32::cast_from(w[l]);
                            }
                        }
                    }
                }
                kk += unroll * slices;
            }
        } else {
            #[unroll]
            for j in 0..top_k {
                let slot = t * top_k + j;
                let base = indices[slot] as usize * expert_stride as usize;
                let mut kk = s;
                while kk < k {
                    load_weight_rows(down, base, n_vec, cv, kk, k, &mut wv, slices, unroll);
                    #[unroll]
                    for q in 0..unroll {
                        let kq = kk + q * slices;
                        if kq < k {
                            let w = wv[q];
                            let a = f32::cast_from(act[slot * k + kq]);
                            #[unroll]
                            for l in 0..width {
                                acc[j * width + l] += a * f32::cast_from(w[l]);
                            }
                        }
                    }
                    kk += unroll * slices;
                }
            }
        }
    }
    let mut red = SharedMemory::<f32>::new(comptime!(units * width));
    let mut total = Array::<f32>::new(width);
    let mut sum = Array::<f32>::new(width);
    #[unroll]
    for l in 0..width {
        sum[l] = 0.0;
    }
    #[unroll]
    for j in 0..terms {
        slice_totals(&mut red, &acc, j * width, &mut total, width, lanes, units);
        if comptime!(dense) {
            if s == 0 && active {
                let mut out = Vector::<F, N>::empty();
                #[unroll]
                for l in 0..width {
                    out[l] = F::cast_from(total[l]);
                }
                y[j * n_vec + cv] = out;
            }
        } else {
            let p = f32::cast_from(routing[t * top_k + j]);
            #[unroll]
            for l in 0..width {
                let term = f32::cast_from(F::cast_from(total[l]));
                sum[l] += f32::cast_from(F::cast_from(term * p));
            }
        }
    }
    if comptime!(!dense) {
        if s == 0 && active {
            let mut out = Vector::<F, N>::empty();
            #[unroll]
            for l in 0..width {
                out[l] = F::cast_from(sum[l]);
            }
            y[t * n_vec + cv] = out;
        }
    }
}

/// Whether the expert MLPs run in the vector form (two launches instead of four) for these
/// operands: a float dtype, `inner` and `hidden` multiples of the 16-byte vector's width,
/// contiguous aligned weights, a contiguous output, at most [`MAX_TOP_K`] slots per token,
/// and a dense MLP of at most four rows (each routed slot is a cube row of its own; a dense
/// MLP's rows share the cube, so their weight is read once). `JAMBA_GEMV_VEC=off` turns it
/// off.
pub fn takes_vector_form<R: CubeRuntime>(
    x: &CubeTensor<R>,
    [gate, up, down]: [&CubeTensor<R>; 3],
    y: &CubeTensor<R>,
    dense: bool,
) -> bool {
    let Some(width) = crate::gemv::vec_width(x.dtype) else {
        return false;
    };
    let [tokens, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    let inner = *gate.meta.shape().last().expect("a weight has a shape");
    inner % width == 0
        && hidden % width == 0
        && inner > 0
        && hidden > 0
        && [gate, up, down, y]
            .into_iter()
            .all(|t| t.is_contiguous() && crate::gemv::aligned(t))
        && (!dense || (1..=crate::gemv::NORMED_MAX_ROWS).contains(&tokens))
        && (hidden * inner) / width < u32::MAX as usize
}

/// [`expert_mlp`] in the vector form ([`takes_vector_form`] checked by the caller): the gate,
/// up and SiLU gate in one launch, the down products and the sum in another. Returns `act`.
pub(crate) fn expert_mlp_vec<R: CubeRuntime>(
    x: CubeTensor<R>,
    [gate, up, down]: [CubeTensor<R>; 3],
    indices: CubeTensor<R>,
    routing: Option<CubeTensor<R>>,
    y: CubeTensor<R>,
    top_k: usize,
    pre: Option<(ResidualNorm<R>, CubeTensor<R>)>,
) -> CubeTensor<R> {
    let [tokens, hidden] = [x.meta.shape()[0], x.meta.shape()[1]];
    let inner = *gate.meta.shape().last().expect("a weight has a shape");
    let dense = routing.is_none();
    let slots = tokens * top_k;
    let (client, dtype) = (x.client.clone(), x.dtype);
    let width = crate::gemv::vec_width(dtype).expect("takes_vector_form checked the dtype");
    let unroll = crate::gemv::VEC_UNROLL;
    let act = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        [slots, inner].into(),
        dtype,
    );
    // Dense: one cube row for all rows of x (`rows` of them in each cube); routed: a cube row
    // per slot, one row each.
    let (rows, cube_rows) = if dense { (tokens, 1) } else { (1, slots) };
    let (x0, x1) = (x.meta.strides()[0] as u32, x.meta.strides()[1] as u32);
    let n_vec = inner / width;
    let normed = pre.is_some();
    assert!(
        !normed || dense,
        "expert_mlp_vec: a normalised input is dense"
    );
    // Normalised, shared memory also holds the staged rows: a smaller sum buffer, as
    // `gemv_normed`'s.
    let sum_floats = if normed {
        crate::gemv::VEC_SUM_FLOATS
    } else {
        crate::gemv::VEC_SUM_FLOATS_ALONE
    };
    let (lanes, slices) = crate::gemv::vec_cube(&client, n_vec, hidden, width, sum_floats);
    let cubes = n_vec.div_ceil(lanes);
    assert!(cubes <= MAX_CUBES_X, "routed_experts: {inner} columns");
    let stage = if normed {
        crate::gemv::vec_stage(hidden)
    } else {
        1
    };
    let add_first = pre.as_ref().is_some_and(|(p, _)| p.first.is_some());
    // Without a norm the kernel reads none of its inputs and writes no residual: `x` and
    // `act` stand in.
    let (first, second, norm, eps, residual) = match pre {
        Some((p, residual)) => (
            p.first.unwrap_or_else(|| p.x.clone()),
            p.second,
            p.norm,
            p.eps as f32,
            residual,
        ),
        None => (x.clone(), x.clone(), x.clone(), 0.0, act.clone()),
    };
    let s = |t: &CubeTensor<R>, d: usize| t.meta.strides()[d] as u32;
    let (f0, f1, s0, s1, norm_stride) = (
        s(&first, 0),
        s(&first, 1),
        s(&second, 0),
        s(&second, 1),
        s(&norm, 0),
    );
    // SAFETY: units whose column vector is past `inner / width` read no weight and write
    // nothing. The others read rows of `x` below `tokens` (routed: row slot / top_k; dense:
    // rows 0..rows) at `k` indices below `hidden` through its strides, and the weight rows
    // below `hidden` of expert `indices[slot]` (below the number of experts: the route kernel
    // wrote it; dense: the one weight, `indices` not read), vector `cv` of rows of `inner /
    // width` contiguous aligned vectors; slice 0 writes vector `cv` of its rows of `act`
    // (`[slots, inner]`, contiguous). Shared memory: `lanes · slices · width` floats, at most
    // VEC_SUM_FLOATS_ALONE (VEC_SUM_FLOATS normalised, holding also the `rows · units` sums of
    // squares, as rows <= NORMED_MAX_ROWS <= width); `slices` is a power of two. Normalised
    // (dense, `rows` <= NORMED_MAX_ROWS): every unit also reads rows below `rows` of `x`,
    // `first` and `second` (the shape of `x`) at indices below `hidden` through their strides
    // and `hidden` entries of the norm's weight, stages `rows · stage` floats (the caller
    // checked them against VEC_STAGE_FLOATS), and cube 0 writes `residual` (`[rows, hidden]`,
    // contiguous), each element by one unit.
    unsafe {
        expert_gate_up_vec_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes as u32, cube_rows as u32, 1),
            CubeDim::new_2d(lanes as u32, slices as u32),
            width,
            x.into_array_arg(),
            first.into_array_arg(),
            second.into_array_arg(),
            norm.into_array_arg(),
            gate.into_array_arg(),
            up.into_array_arg(),
            indices.clone().into_array_arg(),
            act.clone().into_array_arg(),
            residual.into_array_arg(),
            x0,
            x1,
            f0,
            f1,
            s0,
            s1,
            norm_stride,
            eps,
            hidden as u32,
            n_vec as u32,
            (hidden * n_vec) as u32,
            top_k as u32,
            rows,
            width,
            lanes,
            slices,
            unroll,
            dense,
            normed,
            add_first,
            stage,
            dtype.into(),
        );
    }
    let n_vec = hidden / width;
    let (lanes, slices) = crate::gemv::vec_cube(
        &client,
        n_vec,
        inner,
        width,
        crate::gemv::VEC_SUM_FLOATS_ALONE,
    );
    let cubes = n_vec.div_ceil(lanes);
    assert!(cubes <= MAX_CUBES_X, "routed_experts: {hidden} columns");
    // Unweighted, the kernel reads no routing weights: `act` stands in.
    let routing = routing.unwrap_or_else(|| act.clone());
    // SAFETY: as the gate/up launch, over `act` (`[slots, inner]`, contiguous: row `slot`, or
    // rows 0..rows dense) and `down`'s rows below `inner`; routed, the token's `top_k` routing
    // weights and experts (below `slots`). Slice 0 writes vector `cv` of row `t` (dense: rows
    // 0..rows) of `y`, contiguous `[tokens, hidden]`.
    unsafe {
        expert_down_vec_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes as u32, if dense { 1 } else { tokens as u32 }, 1),
            CubeDim::new_2d(lanes as u32, slices as u32),
            width,
            act.clone().into_array_arg(),
            down.into_array_arg(),
            indices.into_array_arg(),
            routing.into_array_arg(),
            y.into_array_arg(),
            inner as u32,
            n_vec as u32,
            (inner * n_vec) as u32,
            rows,
            top_k,
            width,
            lanes,
            slices,
            unroll,
            dense,
            dtype.into(),
        );
    }
    act
}
