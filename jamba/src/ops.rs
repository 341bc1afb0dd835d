//! The Mamba mixer's hot operations as a backend extension: [`JambaBackend`].
//!
//! The model calls `B::selective_scan` and `B::causal_conv1d` and never asks which path runs.
//! Every backend gets the tensor-op implementation (the trait's default methods); CubeCL
//! backends (`CubeBackend`: cuda, wgpu) override them with the fused kernels of
//! `jamba-kernels`, falling back to tensor ops where a kernel does not apply (a state size above
//! [`jamba_kernels::scan::MAX_STATE`], `d_conv < 2`, or kernels disabled with the environment
//! variable `JAMBA_KERNELS=off`, for A/B measurements).
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use jamba::backends::Cpu;
//! use jamba::ops::{ConvInput, JambaBackend};
//! let device = Default::default();
//! let x = Tensor::<Cpu, 3>::random([1, 5, 8], Distribution::Normal(0.0, 1.0), &device);
//! let weight = Tensor::<Cpu, 2>::random([8, 4], Distribution::Normal(0.0, 1.0), &device);
//! let out = Cpu::causal_conv1d(ConvInput { x, weight, bias: None, prefix: None, silu: true });
//! assert_eq!(out.y.dims(), [1, 5, 8]);
//! assert_eq!(out.state.dims(), [1, 3, 8]);
//! ```

use burn::tensor::{DType, Tensor, activation::silu, backend::Backend};

use crate::scan::{ScanInput, ScanOutput};

/// Inputs of a depthwise causal convolution over time.
#[derive(Debug, Clone)]
pub struct ConvInput<B: Backend> {
    /// `[batch, seq, channels]`.
    pub x: Tensor<B, 3>,
    /// `[channels, d_conv]`.
    pub weight: Tensor<B, 2>,
    /// `[channels]`.
    pub bias: Option<Tensor<B, 1>>,
    /// The `d_conv − 1` inputs before `x`, `[batch, d_conv − 1, channels]`; zeros when absent.
    pub prefix: Option<Tensor<B, 3>>,
    /// Apply SiLU to the output.
    pub silu: bool,
}

/// Result of [`JambaBackend::causal_conv1d`].
#[derive(Debug, Clone)]
pub struct ConvOutput<B: Backend> {
    /// `[batch, seq, channels]`, the dtype of `x`.
    pub y: Tensor<B, 3>,
    /// The new prefix: the last `d_conv − 1` rows of `[prefix, x]`.
    pub state: Tensor<B, 3>,
}

/// A mixture of experts' inputs for [`JambaBackend::routed_experts`].
#[derive(Debug, Clone)]
pub struct RoutedExperts<B: Backend> {
    /// The tokens, `[tokens, hidden]`.
    pub x: Tensor<B, 2>,
    /// The router's logits, `[tokens, experts]`.
    pub router_logits: Tensor<B, 2>,
    /// Every expert's `gate_proj`, `[experts, hidden, intermediate]` (`[in, out]` layout).
    pub gate: Tensor<B, 3>,
    /// Every expert's `up_proj`, `[experts, hidden, intermediate]`.
    pub up: Tensor<B, 3>,
    /// Every expert's `down_proj`, `[experts, intermediate, hidden]`.
    pub down: Tensor<B, 3>,
    /// Experts per token.
    pub top_k: usize,
}

/// A projection of an RMSNorm's output, for [`JambaBackend::normed_projection`]:
/// `rms_norm(x + pending) · weight + bias` with the norm of [`crate::norm::RmsNorm`].
#[derive(Debug, Clone)]
pub struct NormedProjection<B: Backend> {
    /// The residual stream, `[batch, seq, in]`.
    pub x: Tensor<B, 3>,
    /// A residual update not yet added to `x` (the previous layer's feed-forward output), the
    /// shape and dtype of `x`; the sum is rounded to that dtype, as an addition stores it.
    pub pending: Option<Tensor<B, 3>>,
    /// The norm's weight, `[in]`.
    pub norm: Tensor<B, 1>,
    /// The norm's epsilon.
    pub eps: f64,
    /// The projection's weight, `[in, out]` (Burn's layout).
    pub weight: Tensor<B, 2>,
    /// The projection's bias, `[out]`.
    pub bias: Option<Tensor<B, 1>>,
}

/// Several bias-free projections of one RMSNorm's output, for
/// [`JambaBackend::normed_projections`]: `linear_i(norm(x + pending))`, as
/// [`NormedProjection`] for each weight.
#[derive(Debug, Clone)]
pub struct NormedProjections<B: Backend> {
    /// The residual stream, `[batch, seq, in]`.
    pub x: Tensor<B, 3>,
    /// A residual update not yet added to `x`, the shape and dtype of `x`.
    pub pending: Option<Tensor<B, 3>>,
    /// The norm's weight, `[in]`.
    pub norm: Tensor<B, 1>,
    /// The norm's epsilon.
    pub eps: f64,
    /// The projections' weights, each `[in, out_i]` (Burn's layout).
    pub weights: Vec<Tensor<B, 2>>,
}

/// A MoE layer's feed-forward block with the residual connection and the norm before it, for
/// [`JambaBackend::routed_experts_normed`]: the residual `s = (x + first) + second`, then the
/// mixture of experts of `rms_norm(s)` routed by `router`.
#[derive(Debug, Clone)]
pub struct NormedMoe<B: Backend> {
    /// The residual stream, `[tokens, hidden]`.
    pub x: Tensor<B, 2>,
    /// An update added first when present (a previous layer's pending output).
    pub first: Option<Tensor<B, 2>>,
    /// The mixer's output, added second.
    pub second: Tensor<B, 2>,
    /// The norm's weight, `[hidden]`.
    pub norm: Tensor<B, 1>,
    /// The norm's epsilon.
    pub eps: f64,
    /// The router's weight, `[hidden, experts]` (no bias).
    pub router: Tensor<B, 2>,
    /// Every expert's `gate_proj`, `[experts, hidden, intermediate]`.
    pub gate: Tensor<B, 3>,
    /// Every expert's `up_proj`, `[experts, hidden, intermediate]`.
    pub up: Tensor<B, 3>,
    /// Every expert's `down_proj`, `[experts, intermediate, hidden]`.
    pub down: Tensor<B, 3>,
    /// Experts per token.
    pub top_k: usize,
}

/// What [`JambaBackend::routed_experts_normed`] returns.
#[derive(Debug, Clone)]
pub struct NormedMoeOutput<B: Backend> {
    /// The residual stream after the mixer, `(x + first) + second`, `[tokens, hidden]`.
    pub residual: Tensor<B, 2>,
    /// The mixture's output, `[tokens, hidden]`.
    pub y: Tensor<B, 2>,
    /// The router's logits, `[tokens, experts]`.
    pub router_logits: Tensor<B, 2>,
}

/// A dense MLP block with the residual connection and the norm before it, for
/// [`JambaBackend::swiglu_normed`]: the residual `s = (x + first) + second`, then the SwiGLU
/// MLP of `rms_norm(s)` (bias-free weights in Burn's `[in, out]` layout).
#[derive(Debug, Clone)]
pub struct NormedMlp<B: Backend> {
    /// The residual stream, `[rows, hidden]`.
    pub x: Tensor<B, 2>,
    /// An update added first when present (a previous layer's pending output).
    pub first: Option<Tensor<B, 2>>,
    /// The mixer's output, added second.
    pub second: Tensor<B, 2>,
    /// The norm's weight, `[hidden]`.
    pub norm: Tensor<B, 1>,
    /// The norm's epsilon.
    pub eps: f64,
    /// `gate_proj`, `[hidden, intermediate]`.
    pub gate: Tensor<B, 2>,
    /// `up_proj`, `[hidden, intermediate]`.
    pub up: Tensor<B, 2>,
    /// `down_proj`, `[intermediate, hidden]`.
    pub down: Tensor<B, 2>,
}

/// The inputs of one Mamba decoding step between `in_proj` and `out_proj`
/// ([`JambaBackend::mamba_step`]): one new token per batch row. Weights in the checkpoint's
/// dtype (Burn's `[in, out]` layout for the projections); the SSM state in f32.
#[derive(Debug, Clone)]
pub struct MambaStepInput<B: Backend> {
    /// `in_proj`'s output, `[batch, 2 · inner]`: `x`, then the gate `z`.
    pub xz: Tensor<B, 2>,
    /// The last `d_conv − 1` conv inputs, `[batch, d_conv − 1, inner]`.
    pub conv_state: Tensor<B, 3>,
    /// `[inner, d_conv]`.
    pub conv_weight: Tensor<B, 2>,
    /// `[inner]`.
    pub conv_bias: Option<Tensor<B, 1>>,
    /// `x_proj`'s weight, `[inner, dt_rank + 2 · d_state]`.
    pub x_proj: Tensor<B, 2>,
    /// The weights of the norms of Δ (`[dt_rank]`), B and C (`[d_state]`).
    pub norms: [Tensor<B, 1>; 3],
    /// The norms' epsilon.
    pub eps: f64,
    /// `dt_proj`'s weight, `[dt_rank, inner]`.
    pub dt_proj: Tensor<B, 2>,
    /// `dt_proj`'s bias, `[inner]`.
    pub dt_bias: Option<Tensor<B, 1>>,
    /// `[inner, d_state]`.
    pub a_log: Tensor<B, 2>,
    /// The skip `D`, `[inner]`.
    pub d: Tensor<B, 1>,
    /// The SSM state, `[batch, inner, d_state]`, f32.
    pub ssm_state: Tensor<B, 3>,
}

/// The result of [`JambaBackend::mamba_step`].
#[derive(Debug, Clone)]
pub struct MambaStepOutput<B: Backend> {
    /// The gated output before `out_proj`, `[batch, inner]`, the dtype of `xz`.
    pub y: Tensor<B, 2>,
    /// The new conv state.
    pub conv_state: Tensor<B, 3>,
    /// The new SSM state, f32.
    pub ssm_state: Tensor<B, 3>,
}

/// A Burn backend with Jamba's Mamba operations. Implemented for every backend this crate
/// knows; implement it (with an empty body for the tensor-op path) for your own.
pub trait JambaBackend: Backend {
    /// The selective scan ([`crate::scan`] defines it). `y` comes back in the dtype of `u`, the
    /// state in f32.
    fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
        crate::scan::selective_scan_tensor_ops(input)
    }

    /// Depthwise causal conv1d + bias (+ SiLU), continuing from `prefix`.
    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        causal_conv1d_tensor_ops(input)
    }

    /// A Mamba layer's parameters as [`selective_scan`](Self::selective_scan) takes them:
    /// `A = −exp(A_log)` in f32, the skip `D` and the Δ bias (`dt_bias`). The default computes
    /// `A` with [`ssm_a`](Self::ssm_a) and passes the other two as they are.
    ///
    /// CubeCL backends give all three in f32 from one launch
    /// (`jamba_kernels::scan::scan_parameters`), where `A` took three (cast, `exp`, negation)
    /// and the scan's casts of `D` and the bias two more, in every Mamba layer of a prefill.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use jamba::backends::Cpu;
    /// use jamba::ops::JambaBackend;
    /// let device = Default::default();
    /// let a_log = Tensor::<Cpu, 2>::zeros([4, 2], &device);
    /// let (a, d, bias) = Cpu::scan_parameters(a_log, Tensor::ones([4], &device), None);
    /// assert_eq!(a.into_data().to_vec::<f32>().unwrap(), vec![-1.0; 8]);
    /// assert_eq!((d.dims(), bias.is_none()), ([4], true));
    /// ```
    fn scan_parameters(
        a_log: Tensor<Self, 2>,
        d: Tensor<Self, 1>,
        dt_bias: Option<Tensor<Self, 1>>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>, Option<Tensor<Self, 1>>) {
        (Self::ssm_a(a_log), d, dt_bias)
    }

    /// The state matrix `A = −exp(A_log)` in f32 (any shape, here `[channels, state]`). An
    /// operation of its own because every Mamba layer recomputes it at every decoding step, and
    /// the CPU backends' element-wise `exp` is a library call per element (0.14 ms for
    /// Jamba-sized 1024 × 16 on flex).
    fn ssm_a(a_log: Tensor<Self, 2>) -> Tensor<Self, 2> {
        a_log.cast(burn::tensor::DType::F32).exp().neg()
    }

    /// Whether [`selective_scan_backward`](Self::selective_scan_backward) has a fused
    /// implementation for this state size. When it does not, autodiff differentiates the
    /// tensor-op scan instead.
    fn has_fused_scan_backward(_state: usize) -> bool {
        false
    }

    /// The gradients of every input of the scan given the gradient of `y` (the final state is
    /// taken as not differentiated), or `None` without a fused backward.
    fn selective_scan_backward(
        _input: ScanInput<Self>,
        _grad_y: Tensor<Self, 3>,
    ) -> Option<ScanGrads<Self>> {
        None
    }

    /// Scaled dot-product attention (Burn's `attention` module op): `[batch, heads, queries,
    /// dim]` queries against `[batch, heads, keys, dim]` keys and values; `mask` is `true` where
    /// a key is hidden from a query.
    ///
    /// CubeCL backends override it so that an f32 model gets f32 attention (the unfused form):
    /// their autotuner may otherwise pick a tensor-core flash kernel that rounds f32 inputs to a
    /// 10-bit mantissa (relative errors of 2e-2 measured on the fixtures' logits on CUDA).
    fn scaled_dot_product_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, burn::tensor::Bool>>,
        options: burn::tensor::ops::AttentionModuleOptions,
    ) -> Tensor<Self, 4> {
        burn::tensor::module::attention(q, k, v, mask, None, options)
    }

    /// `x [batch, seq, in] · weight [in, out] (+ bias)`: every projection of the model.
    ///
    /// CubeCL backends override it: up to eight rows (decoding) run `jamba_kernels::gemv`, which
    /// streams the weight at memory bandwidth; otherwise an f32 model multiplies in f32, since
    /// their tensor-core kernels round f32 inputs to TF32, which flips a router's top-k choice
    /// at near-ties (see `jamba_kernels::matmul`). `JAMBA_ALLOW_TF32=1` keeps Burn's choice.
    fn projection(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        burn::tensor::module::linear(x, weight, bias)
    }

    /// RMSNorm of `x` `[batch, seq, width]` over its last dimension with `weight` `[width]`
    /// (see [`crate::norm::RmsNorm`]): statistics in f32, the normalised value rounded to the
    /// dtype of `x` before the weight multiplies it.
    ///
    /// CubeCL backends run it as one kernel instead of eight tensor operations (a decoding
    /// step is bound by launches on a GPU, and Mamba layers have five norms each).
    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        rms_norm_tensor_ops(x, weight, eps)
    }

    /// A residual connection and the norm after it: `(x + update, rms_norm(x + update))`, the
    /// sum in the dtype of `x` (as [`JambaBackend::rms_norm`] otherwise; `update` has the shape
    /// and dtype of `x`).
    ///
    /// CubeCL backends do both in one launch instead of two (`JAMBA_FUSED_STEP=off` turns it
    /// off, for comparisons).
    fn add_rms_norm(
        x: Tensor<Self, 3>,
        update: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        add_then_rms_norm(x, update, weight, eps)
    }

    /// [`add_rms_norm`](Self::add_rms_norm) of two updates: `(s, rms_norm(s))` for
    /// `s = (x + first) + second`, each sum rounded to the dtype of `x` (a layer whose input
    /// norm was folded into its mixer's projections ([`normed_projection`](Self::normed_projection))
    /// adds the previous layer's output here, with the mixer's). CubeCL backends: one launch.
    fn add2_rms_norm(
        x: Tensor<Self, 3>,
        first: Tensor<Self, 3>,
        second: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        Self::add_rms_norm(x + first, second, weight, eps)
    }

    /// A projection of an RMSNorm's output without the norm's own launch
    /// ([`NormedProjection`]), or `None` where the backend has no such form (the caller
    /// normalises, then projects; the default).
    ///
    /// CubeCL backends run `jamba_kernels::gemv::gemv_normed` for up to four rows (decoding
    /// steps of small batches): each cube of the GEMV recomputes the rows' statistics. The
    /// model folds every layer's input norm into its mixer's first projections and the final
    /// norm into the head this way (`JAMBA_FUSED_STEP=off` turns it off, for comparisons).
    fn normed_projection(_input: NormedProjection<Self>) -> Option<Tensor<Self, 3>> {
        None
    }

    /// [`normed_projection`](Self::normed_projection) of several bias-free weights of one
    /// input in one launch ([`NormedProjections`]: an attention layer's `q_proj`, `k_proj` and
    /// `v_proj`), or `None` to let the caller project each (the default).
    ///
    /// CubeCL backends run `jamba_kernels::gemv::gemv_normed_many` for up to three weights
    /// where each takes the vector form: one launch where the separate projections take three
    /// (`JAMBA_QKV_ONE=off` turns it off, for comparisons).
    fn normed_projections(_input: NormedProjections<Self>) -> Option<Vec<Tensor<Self, 3>>> {
        None
    }

    /// A MoE layer's residual connection, pre-feed-forward norm, router and experts for a few
    /// tokens ([`NormedMoe`]), or `None` to let the caller run the norm and
    /// [`routed_experts`](Self::routed_experts) (the default).
    ///
    /// CubeCL backends run the sums, the norm, the router's product and the routing in one
    /// launch ahead of the experts' four (`jamba_kernels::moe::routed_experts_normed`), where
    /// the separate form takes seven.
    fn routed_experts_normed(_input: NormedMoe<Self>) -> Option<NormedMoeOutput<Self>> {
        None
    }

    /// The index of each row's largest value, `[rows, width]` to `[rows]` (the first on ties),
    /// or `None` to let [`crate::generation::argmax_last`] compose it from tensor operations
    /// (the default). CubeCL backends: two launches (`jamba_kernels::argmax`), where the
    /// composed form takes six.
    fn argmax_rows(_x: Tensor<Self, 2>) -> Option<Tensor<Self, 1, burn::tensor::Int>> {
        None
    }

    /// Whether [`crate::moe::SparseMoe`] runs many tokens' experts as three batched products
    /// (every expert's tokens gathered into one `[experts, capacity, ·]` block, padded to the
    /// busiest expert's count) rather than three products per active expert on exactly its
    /// tokens (the default).
    ///
    /// CubeCL backends say yes: one product per expert gives a GPU a few dozen tiles at a time
    /// (a 2048-token prefill's expert products ran at 8-27 TFLOP/s on the H200, 60% of its
    /// device time); the batch fills it, and the padded rows cost less than the idle units.
    fn batched_experts() -> bool {
        false
    }

    /// `x [batch, m, k] · w [batch, k, n]`: the experts' products in the batched form of
    /// [`crate::moe::SparseMoe`]. CubeCL backends keep f32 products off TF32 tensor cores, as
    /// in [`JambaBackend::projection`].
    fn batched_matmul(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
        x.matmul(w)
    }

    /// The mixture of experts of a few tokens with the routing (softmax, top-k, weights not
    /// renormalised) kept on the device, or `None` to let [`crate::moe::SparseMoe`] group the
    /// tokens by expert on the host (the default, and the form for many tokens).
    ///
    /// CubeCL backends override it for up to 64 (token, expert) pairs: five launches (three
    /// where the widths split into 16-byte vectors) and no
    /// read back to the host, where the grouped form takes ~40 launches and a synchronisation
    /// per MoE layer of a decoding step. Flex runs it as host loops for up to 8 f32 tokens
    /// (no per-operation overhead between the experts' products).
    fn routed_experts(_input: RoutedExperts<Self>) -> Option<Tensor<Self, 2>> {
        None
    }

    /// The router's softmax (f32) and top-k for the grouped experts of many tokens:
    /// `router_logits` `[tokens, experts]` gives each token's `top_k` routing weights
    /// (probabilities rounded to the logits' dtype, not renormalised) and their experts, both
    /// `[tokens · top_k]` in slot order (largest first; an equal logit at a lower index ranks
    /// first), or `None` to let [`crate::moe::SparseMoe`] compose Burn's `softmax` and
    /// `topk_with_indices` (the default).
    ///
    /// CubeCL backends run one kernel (`jamba_kernels::moe::route`): Burn 0.21's CubeCL `topk`
    /// reads the probabilities back to the host and sorts them there, a synchronisation and
    /// ~0.5 ms of host sorting per MoE layer of a 2048-token prefill, before the read of the
    /// chosen experts that the grouping needs anyway. `JAMBA_DEVICE_TOPK=off` turns it off.
    ///
    /// ```
    /// use burn::tensor::Tensor;
    /// use jamba::backends::Cpu;
    /// use jamba::ops::JambaBackend;
    /// let logits = Tensor::<Cpu, 2>::from_floats([[0.1, 2.0, -1.0]], &Default::default());
    /// assert!(Cpu::route_top_k(logits, 2).is_none()); // the CPU composes Burn's operations
    /// ```
    fn route_top_k(
        _router_logits: Tensor<Self, 2>,
        _top_k: usize,
    ) -> Option<(Tensor<Self, 1>, Tensor<Self, 1, burn::tensor::Int>)> {
        None
    }

    /// A dense SwiGLU MLP of a few rows, `down(silu(x · gate) · (x · up))` for `x`
    /// `[rows, hidden]` and bias-free weights in Burn's `[in, out]` layout, or `None` to let
    /// [`crate::mlp::Mlp`] run it as separate operations (the default).
    ///
    /// CubeCL backends override it for up to `jamba_kernels::moe::MAX_SLOTS` rows (decoding
    /// steps) with four launches (two for up to four rows whose widths split into 16-byte
    /// vectors) where the separate operations take thirteen.
    /// `JAMBA_FUSED_STEP=off` turns it off, for comparisons.
    fn swiglu(
        _x: Tensor<Self, 2>,
        _gate: Tensor<Self, 2>,
        _up: Tensor<Self, 2>,
        _down: Tensor<Self, 2>,
    ) -> Option<Tensor<Self, 2>> {
        None
    }

    /// A dense MLP block with its residual connection and norm ([`NormedMlp`]) as
    /// `(s, mlp(rms_norm(s)))`, or `None` to let the caller run
    /// [`add2_rms_norm`](Self::add2_rms_norm) and [`swiglu`](Self::swiglu) (the default).
    ///
    /// CubeCL backends fold the sums and the norm into the MLP's gate/up launch for up to four
    /// rows where the vector form runs (`jamba_kernels::moe::swiglu_normed`): two launches
    /// where the separate form takes three. `JAMBA_FUSED_STEP=off` turns it off, and
    /// `JAMBA_MLP_NORMED=off` this form alone, for comparisons.
    fn swiglu_normed(_input: NormedMlp<Self>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        None
    }

    /// The SwiGLU gate `silu(gate) · up` of two tensors of one shape: SiLU computed in f32
    /// and rounded to the dtype, then the product rounded (PyTorch's order in half precision).
    ///
    /// CubeCL backends run it in one launch (`jamba_kernels::activation::silu_mul`) where
    /// Burn's `silu` of a half-precision tensor and the product are nine (`JAMBA_SILU_MUL=off`
    /// composes them).
    fn silu_mul<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        silu(gate).mul(up)
    }

    /// One decoding step of a Mamba mixer between `in_proj` and `out_proj` (conv + SiLU,
    /// `x_proj`, the norms of Δ, B and C, `dt_proj`, softplus, the state update, the D skip and
    /// the SiLU(z) gate), or `None` to let [`crate::mamba::MambaMixer`] run it as separate
    /// operations (the default).
    ///
    /// CubeCL backends override it with two kernels (`jamba_kernels::mamba_step`) where the
    /// unfused form is about fifteen launches per Mamba layer, and a GPU decoding step is bound
    /// by launches. `JAMBA_FUSED_STEP=off` turns it off, for comparisons.
    fn mamba_step(_input: MambaStepInput<Self>) -> Option<MambaStepOutput<Self>> {
        None
    }

    /// Bytes the backend's allocator holds on `device` now, where it reports them (CubeCL
    /// backends: the memory pools' reservation, which only grows between
    /// [`Backend::memory_cleanup`] calls, so it is the peak since the last cleanup). Benchmarks
    /// use it; `None` elsewhere.
    fn device_memory_reserved(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// Attention of one new position per row over its cached keys and values: `q [batch,
    /// heads, dim]`, `k` and `v` `[batch, kv_heads, keys, dim]` (query head `h` reads key/value
    /// head `h / (heads / kv_heads)`), `hidden [batch, keys]` true where a key is masked.
    /// Returns `softmax(q·kᵀ · scale) · v` as `[batch, heads · dim]`, or `None` where the
    /// backend has no fused form for these shapes (the caller runs the separate operations).
    ///
    /// CubeCL backends run `jamba_kernels::attention::decode_attention`, one launch for
    /// contexts up to its `MAX_KEYS`; `JAMBA_FUSED_ATTENTION=off` runs the separate operations.
    fn decode_attention(
        _q: Tensor<Self, 3>,
        _k: Tensor<Self, 4>,
        _v: Tensor<Self, 4>,
        _hidden: Option<Tensor<Self, 2, burn::tensor::Bool>>,
        _scale: f64,
    ) -> Option<Tensor<Self, 2>> {
        None
    }

    /// Starts copying `ids` (token ids on the device, e.g. a decoding step's argmax) to the host
    /// and returns the read to wait on later ([`QueuedIds::wait`]), so that the host can queue
    /// more work on the device meanwhile: greedy generation queues the next step from these ids,
    /// still on the device, before waiting for them ([`crate::generation::GreedyPipeline`]).
    ///
    /// CubeCL backends enqueue the copy behind the work already queued on the device's stream
    /// (on CUDA a pinned, asynchronous copy and a fence); the default reads at once.
    ///
    /// ```
    /// use burn::tensor::{Int, Tensor};
    /// use jamba::backends::Cpu;
    /// use jamba::JambaBackend;
    /// let ids = Tensor::<Cpu, 1, Int>::from_ints([3, 1, 4], &Default::default());
    /// assert_eq!(Cpu::queue_read_ids(ids).wait().unwrap(), vec![3, 1, 4]);
    /// ```
    fn queue_read_ids(ids: Tensor<Self, 1, burn::tensor::Int>) -> QueuedIds {
        QueuedIds::ready(read_ids(ids.into_data()))
    }

    /// Runs `f` where the backend issues work most cheaply. CubeCL backends hand every
    /// operation to a device thread through a queue; running a whole decoding step on that
    /// thread (`ComputeClient::exclusive`) issues each operation directly instead. Elsewhere it
    /// is `f()`. [`exclusive_enabled`] says whether generation uses it (`JAMBA_EXCLUSIVE`).
    ///
    /// ```
    /// use jamba::backends::Cpu;
    /// use jamba::JambaBackend;
    /// assert_eq!(Cpu::exclusive(&Default::default(), || 2 + 2), 4);
    /// ```
    fn exclusive<R: Send + 'static>(_device: &Self::Device, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
}

/// A read of token ids from the device to the host, started by
/// [`JambaBackend::queue_read_ids`] and finished by [`wait`](Self::wait).
pub struct QueuedIds(Box<dyn FnOnce() -> crate::Result<Vec<i64>> + Send>);

impl QueuedIds {
    /// A read that has already finished.
    pub fn ready(ids: crate::Result<Vec<i64>>) -> Self {
        Self(Box::new(move || ids))
    }

    /// A read that finishes when `wait` runs (it blocks until the ids are on the host).
    pub fn pending(wait: impl FnOnce() -> crate::Result<Vec<i64>> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// Waits for the ids.
    pub fn wait(self) -> crate::Result<Vec<i64>> {
        (self.0)()
    }
}

impl std::fmt::Debug for QueuedIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueuedIds")
    }
}

/// Token ids read from the device, as `i64`.
fn read_ids(data: burn::tensor::TensorData) -> crate::Result<Vec<i64>> {
    data.convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| crate::JambaError::Input(format!("token ids read from the device: {e:?}")))
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

/// Applies `layer` to the last dimension of `x` through [`JambaBackend::projection`] (what
/// `Linear::forward` does, with the backend's choice of product).
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// let device = Default::default();
/// let layer = LinearConfig::new(4, 3).init::<Cpu>(&device);
/// let x = Tensor::<Cpu, 2>::ones([5, 4], &device);
/// assert_eq!(jamba::ops::project(&layer, x).dims(), [5, 3]);
/// ```
pub fn project<B: JambaBackend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map(|b| b.val());
    if D == 3 {
        // Same primitive, same rank: only the const parameter is restated.
        let x3 = Tensor::<B, 3>::from_primitive(x.into_primitive());
        return Tensor::from_primitive(B::projection(x3, weight, bias).into_primitive());
    }
    let mut dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let y = B::projection(x.reshape([1, rows, dims[D - 1]]), weight.clone(), bias);
    dims[D - 1] = weight.dims()[1];
    y.reshape(dims)
}

/// The number of blocks of `inputs` for a split-k product of `rows × inputs → outputs`
/// (CubeCL projections in half precision), or `None` where the output alone gives the GPU
/// enough tiles: at least 512 rows, at most 512 outputs, `inputs` at least 8 × `outputs` and a
/// multiple of 256 (the block size).
///
/// ```
/// // x_proj of a 2048-token prefill, 4096 inputs → 96 outputs: 16 blocks of 256.
/// assert_eq!(jamba::ops::split_k(2048, 4096, 96), Some(16));
/// // in_proj (1024 → 8192) tiles its output well: not split.
/// assert_eq!(jamba::ops::split_k(2048, 1024, 8192), None);
/// ```
pub fn split_k(rows: usize, inputs: usize, outputs: usize) -> Option<usize> {
    const BLOCK: usize = 256;
    (rows >= 512
        && outputs <= 512
        && inputs >= 8 * outputs
        && inputs % BLOCK == 0
        && inputs > BLOCK)
        .then_some(inputs / BLOCK)
}

/// Whether f32 products may run on TF32 tensor cores (`JAMBA_ALLOW_TF32=1`; off by default,
/// as in PyTorch).
pub fn tf32_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| env_switch("JAMBA_ALLOW_TF32", false))
}

/// Whether half-precision products of many rows take cubek's TMA kernel where the device has
/// one ([`jamba_kernels::matmul::matmul_tma`]); `JAMBA_TMA_MATMUL=0` keeps Burn's matmul (for
/// comparison).
#[cfg(feature = "kernels")]
pub fn tma_matmul_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_TMA_MATMUL", true))
}

/// Scaled dot-product attention composed of two matrix products given by `matmul` (Burn's
/// unfused form, `attention_fallback`, with the product chosen by the caller): `mask` is `true`
/// where a key is hidden; a causal mask aligns the last query with the last key; a row with
/// every key hidden gives zeros instead of NaN.
pub fn attention_with<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, burn::tensor::Bool>>,
    options: burn::tensor::ops::AttentionModuleOptions,
    matmul: impl Fn(Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    use burn::tensor::Int;
    let [batch, heads, queries, dim] = q.dims();
    let keys = k.dims()[2];
    let device = q.device();
    let scale = options.scale.unwrap_or(1.0 / (dim as f64).sqrt());
    let mut scores = matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    if options.is_causal {
        let rows = Tensor::<B, 1, Int>::arange(0..queries as i64, &device)
            .add_scalar(keys as i64 - queries as i64)
            .reshape([queries, 1]);
        let cols = Tensor::<B, 1, Int>::arange(0..keys as i64, &device).reshape([1, keys]);
        let future = rows
            .lower(cols)
            .reshape([1, 1, queries, keys])
            .expand([batch, heads, queries, keys]);
        scores = scores.mask_fill(future, f32::NEG_INFINITY);
    }
    let max = scores.clone().max_dim(3).clamp_min(f32::MIN);
    let numerator = (scores - max).exp();
    let sum = numerator.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    matmul(numerator / sum, v)
}

/// [`JambaBackend::add_rms_norm`] as two operations: the addition, then the backend's norm.
pub fn add_then_rms_norm<B: JambaBackend>(
    x: Tensor<B, 3>,
    update: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let sum = x + update;
    (sum.clone(), B::rms_norm(sum, weight, eps))
}

/// RMSNorm in tensor ops over the last dimension (any rank).
pub fn rms_norm_tensor_ops<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let variance = x32.clone().square().mean_dim(D - 1);
    let normed = x32.mul(variance.add_scalar(eps).sqrt().recip()).cast(dtype);
    normed.mul(weight.unsqueeze())
}

/// The convolution in tensor ops: `d_conv` shifted multiply-adds.
pub fn causal_conv1d_tensor_ops<B: Backend>(input: ConvInput<B>) -> ConvOutput<B> {
    let ConvInput {
        x,
        weight,
        bias,
        prefix,
        silu: apply_silu,
    } = input;
    let [batch, seq, channels] = x.dims();
    let k = weight.dims()[1];
    let prefix =
        prefix.unwrap_or_else(|| Tensor::zeros([batch, k - 1, channels], (&x.device(), x.dtype())));
    let padded = Tensor::cat(vec![prefix, x], 1);
    let mut out: Option<Tensor<B, 3>> = None;
    for j in 0..k {
        let tap = weight
            .clone()
            .slice([0..channels, j..j + 1])
            .reshape([1, 1, channels]);
        let term = padded.clone().slice([0..batch, j..j + seq]) * tap;
        out = Some(match out {
            Some(acc) => acc + term,
            None => term,
        });
    }
    let mut y = out.expect("d_conv ≥ 1");
    if let Some(bias) = bias {
        y = y + bias.reshape([1, 1, channels]);
    }
    if apply_silu {
        y = silu(y);
    }
    let state = padded.slice([0..batch, seq..seq + k - 1]);
    ConvOutput { y, state }
}

/// CPU backends run the scan and the convolution as host loops ([`crate::host`]); the
/// tensor-op forms stay reachable with `JAMBA_KERNELS=off`. On flex, the projections of a
/// decoding step (a few rows) are threaded host loops too ([`crate::host::projection_flex`]).
macro_rules! host_backend {
    ($backend:ty) => {
        host_backend!($backend, {});
    };
    ($backend:ty, flex) => {
        host_backend!($backend, {
            fn projection(
                x: Tensor<Self, 3>,
                weight: Tensor<Self, 2>,
                bias: Option<Tensor<Self, 1>>,
            ) -> Tensor<Self, 3> {
                crate::host::projection_flex(x, weight, bias)
            }

            fn routed_experts(input: RoutedExperts<Self>) -> Option<Tensor<Self, 2>> {
                crate::host::routed_experts_flex(input)
            }
        });
    };
    ($backend:ty, { $($extra:item)* }) => {
        impl JambaBackend for $backend {
            $($extra)*

            fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
                if kernels_enabled() {
                    crate::host::selective_scan_host(input)
                } else {
                    crate::scan::selective_scan_tensor_ops(input)
                }
            }

            fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
                if kernels_enabled() {
                    crate::host::causal_conv1d_host(input)
                } else {
                    causal_conv1d_tensor_ops(input)
                }
            }

            fn ssm_a(a_log: Tensor<Self, 2>) -> Tensor<Self, 2> {
                if kernels_enabled() {
                    crate::host::neg_exp_host(a_log)
                } else {
                    a_log.cast(burn::tensor::DType::F32).exp().neg()
                }
            }
        }
    };
}

#[cfg(feature = "ndarray")]
host_backend!(burn::backend::NdArray<f32>);

#[cfg(feature = "ndarray")]
host_backend!(burn::backend::NdArray<f64>);

#[cfg(feature = "flex")]
host_backend!(burn::backend::Flex, flex);

/// Whether the fused kernels (and, on CPU backends, the host loops of [`crate::host`]) are
/// enabled (`JAMBA_KERNELS=off` falls back to the tensor-op forms, for comparisons).
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_KERNELS", true))
}

/// Whether CubeCL backends fuse a decoding step's Mamba mixer ([`JambaBackend::mamba_step`],
/// two kernels), dense MLPs of few rows ([`JambaBackend::swiglu`], four kernels) and each
/// residual addition with the norm after it ([`JambaBackend::add_rms_norm`], one kernel);
/// `JAMBA_FUSED_STEP=off` runs the separate operations, for comparisons.
pub fn fused_step_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_FUSED_STEP", true))
}

/// Whether CubeCL backends fold a dense MLP's residual sums and norm into its gate/up launch
/// ([`JambaBackend::swiglu_normed`]; on by default, `JAMBA_MLP_NORMED=off` runs the norm's
/// own launch, for comparisons).
pub fn normed_mlp_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_MLP_NORMED", true))
}

/// Whether CubeCL backends run an attention layer's three normalised projections in one launch
/// ([`JambaBackend::normed_projections`]; on by default, `JAMBA_QKV_ONE=off` runs three, for
/// comparisons).
pub fn qkv_one_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_QKV_ONE", true))
}

/// Whether CubeCL backends run the SwiGLU gate in one launch ([`JambaBackend::silu_mul`]; on by
/// default, `JAMBA_SILU_MUL=off` composes Burn's `silu` and product, for comparisons).
pub fn silu_mul_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_SILU_MUL", true))
}

/// Whether CubeCL backends route a prefill's tokens to their experts on the device
/// ([`JambaBackend::route_top_k`]; on by default, `JAMBA_DEVICE_TOPK=off` composes Burn's
/// `softmax` and `topk_with_indices`, which sorts on the host, for comparisons).
pub fn device_topk_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_DEVICE_TOPK", true))
}

/// Whether CubeCL backends run a decoding step's attention in one kernel
/// ([`JambaBackend::decode_attention`]; on by default, `JAMBA_FUSED_ATTENTION=off` runs the
/// separate operations). On the H200 it took bf16 decoding at batch 1 from ~397 to ~475
/// tokens/s (bench-jamba-1b, context 512; `jamba-bench/RESULTS.md`, session 15).
pub fn fused_attention_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_FUSED_ATTENTION", true))
}

/// Whether generation runs each decoding step through [`JambaBackend::exclusive`]
/// (`JAMBA_EXCLUSIVE=on|off`, off by default). On wgpu it was faster; on the H200, bf16 batch 1
/// was slower in three runs of four (338-407 against 394-464 tokens/s; session 15), and split
/// one round each way in session 17 (752 / 633 against 700 / 737), gaining 3% at batch 16.
pub fn exclusive_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| env_switch("JAMBA_EXCLUSIVE", false))
}

/// An on/off environment switch: `on`, `1`, `true`, `yes` or `off`, `0`, `false`, `no`;
/// `default` when unset or anything else. Callers read it once (a `OnceLock`), not per call.
pub(crate) fn env_switch(name: &str, default: bool) -> bool {
    match std::env::var(name).as_deref() {
        Ok("on" | "1" | "true" | "yes") => true,
        Ok("off" | "0" | "false" | "no") => false,
        _ => default,
    }
}

/// The bridge from Burn tensors to the kernels' arguments (with the `kernels` feature).
#[cfg(feature = "kernels")]
pub mod cube {
    use burn::tensor::{DType, Tensor, TensorPrimitive};
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::{
        activation, argmax, attention, conv, gemv, mamba_step, matmul, moe, norm, scan, scan_bwd,
    };

    use super::{
        ConvInput, ConvOutput, JambaBackend, MambaStepInput, MambaStepOutput, NormedMlp, NormedMoe,
        NormedMoeOutput, NormedProjection, NormedProjections, RoutedExperts, ScanGrads,
        kernels_enabled,
    };
    use crate::scan::{ScanInput, ScanOutput};

    type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

    fn prim<B: burn::tensor::backend::Backend, const D: usize>(
        t: Tensor<B, D>,
    ) -> B::FloatTensorPrimitive {
        t.into_primitive().tensor()
    }

    fn wrap<B: burn::tensor::backend::Backend, const D: usize>(
        t: B::FloatTensorPrimitive,
    ) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    /// The device's compute client with a `'static` lifetime, made once per runtime and device
    /// and kept for the program's life: a read's future borrows the client it was started from
    /// (CubeCL 0.10's `read_one_tensor_async` takes `&self`), and a queued read must outlive the
    /// call that started it.
    fn static_client<R: CubeRuntime>(
        device: &R::Device,
    ) -> &'static burn_cubecl::cubecl::client::ComputeClient<R> {
        use std::any::{Any, TypeId};
        type Entry = (TypeId, String, &'static (dyn Any + Send + Sync));
        static CLIENTS: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
        let (runtime, name) = (TypeId::of::<R>(), format!("{device:?}"));
        let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients
            .iter()
            .find(|(r, d, _)| *r == runtime && *d == name)
            .and_then(|(_, _, c)| c.downcast_ref())
        {
            return client;
        }
        let client: &'static burn_cubecl::cubecl::client::ComputeClient<R> =
            Box::leak(Box::new(R::client(device)));
        clients.push((runtime, name, client));
        client
    }

    /// The kernel's view of a [`ScanInput`]: `u`'s dtype for the per-step inputs, f32 for the
    /// rest, zeros for what is absent.
    pub fn scan_tensors<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        input: ScanInput<Cube<R, F, I, BT>>,
    ) -> scan::ScanTensors<R> {
        let [batch, _, channels] = input.u.dims();
        let state_size = input.a.dims()[1];
        let device = input.u.device();
        let dtype = input.u.dtype();
        let same = |t: Tensor<Cube<R, F, I, BT>, 3>| prim(t.cast(dtype));
        let f32_1 = |t: Option<Tensor<Cube<R, F, I, BT>, 1>>| {
            prim(
                t.map(|t| t.cast(DType::F32))
                    .unwrap_or_else(|| Tensor::zeros([channels], (&device, DType::F32))),
            )
        };
        let state = input
            .initial_state
            .map(|s| s.cast(DType::F32))
            .unwrap_or_else(|| Tensor::zeros([batch, channels, state_size], (&device, DType::F32)));
        scan::ScanTensors {
            u: prim(input.u),
            delta: same(input.delta),
            a: prim(input.a.cast(DType::F32)),
            b: same(input.b),
            c: same(input.c),
            d: f32_1(input.d),
            z: input.z.map(same),
            delta_bias: f32_1(input.delta_bias),
            state: prim(state),
            delta_softplus: input.delta_softplus,
        }
    }

    /// The kernel's view of a [`ConvInput`]: `x`'s dtype for the signal, the weight as it is
    /// (the bias in its dtype), zeros for what is absent.
    pub fn conv_tensors<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
        input: ConvInput<Cube<R, F, I, BT>>,
    ) -> conv::ConvTensors<R> {
        let [batch, _, channels] = input.x.dims();
        let k = input.weight.dims()[1];
        let device = input.x.device();
        let dtype = input.x.dtype();
        let prefix = input
            .prefix
            .map(|p| p.cast(dtype))
            .unwrap_or_else(|| Tensor::zeros([batch, k.max(2) - 1, channels], (&device, dtype)));
        // The kernel reads the parameters in their own dtype and layout (a model's are in its
        // dtype): no cast launches per forward.
        let wdtype = input.weight.dtype();
        let bias = input
            .bias
            .map(|b| b.cast(wdtype))
            .unwrap_or_else(|| Tensor::zeros([channels], (&device, wdtype)));
        conv::ConvTensors {
            x: prim(input.x),
            prefix: prim(prefix),
            weight: prim(input.weight),
            bias: prim(bias),
            silu: input.silu,
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> JambaBackend
        for Cube<R, F, I, BT>
    {
        fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
            if !kernels_enabled() || !scan::supports_state(input.a.dims()[1]) {
                return crate::scan::selective_scan_tensor_ops(input);
            }
            let (y, state) = scan::selective_scan_fwd(scan_tensors(input));
            ScanOutput {
                y: wrap(y),
                state: wrap(state),
            }
        }

        fn has_fused_scan_backward(state: usize) -> bool {
            kernels_enabled() && scan::supports_state(state)
        }

        fn silu_mul<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
            if kernels_enabled()
                && super::silu_mul_enabled()
                && let Some(out) = activation::silu_mul(prim(gate.clone()), prim(up.clone()))
            {
                return wrap(out);
            }
            burn::tensor::activation::silu(gate).mul(up)
        }

        fn scaled_dot_product_attention(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            mask: Option<Tensor<Self, 4, burn::tensor::Bool>>,
            options: burn::tensor::ops::AttentionModuleOptions,
        ) -> Tensor<Self, 4> {
            if q.dtype() != DType::F32 {
                return burn::tensor::module::attention(q, k, v, mask, None, options);
            }
            // The unfused form, softmax of `QKᵀ`, with f32 products. (cubek's f32 flash kernel
            // on plain units, `FlashUnit`, failed the fixtures on wgpu; its tensor-core ones
            // round to TF32.)
            super::attention_with(q, k, v, mask, options, |a, b| {
                if super::tf32_allowed() {
                    a.matmul(b)
                } else {
                    wrap(matmul::matmul_f32(prim(a), prim(b)))
                }
            })
        }

        fn projection(
            x: Tensor<Self, 3>,
            weight: Tensor<Self, 2>,
            bias: Option<Tensor<Self, 1>>,
        ) -> Tensor<Self, 3> {
            let [batch, seq, inputs] = x.dims();
            let outputs = weight.dims()[1];
            let rows = batch * seq;
            // A decoding step's few rows: the GEMV kernel streams the weight at bandwidth,
            // where Burn's matmul kernels (tiled for large products) ran at ~80 GB/s.
            if kernels_enabled()
                && rows <= gemv::MAX_ROWS
                && weight.dtype() == x.dtype()
                && bias.as_ref().is_none_or(|b| b.dtype() == x.dtype())
            {
                let y: Tensor<Self, 2> = wrap(gemv::gemv(
                    prim(x.reshape([rows, inputs])),
                    prim(weight),
                    bias.map(prim),
                ));
                return y.reshape([batch, seq, outputs]);
            }
            // A long inner dimension into few outputs (x_proj: 2048 rows × 4096 → 96): Burn's
            // autotuned kernels tile only the output, 4 cubes for 2048 × 96 (390 µs on the
            // H200, 4 TFLOP/s, 6% of a 2048-token prefill). Cut k into blocks run as one
            // batched product; the block sums are added in f32 and rounded once more.
            let half = x.dtype() != DType::F32 && weight.dtype() == x.dtype();
            if let (true, true, None, Some(splits)) = (
                kernels_enabled(),
                half,
                &bias,
                super::split_k(rows, inputs, outputs),
            ) {
                let dtype = x.dtype();
                let xk = x.reshape([rows, splits, inputs / splits]).swap_dims(0, 1);
                let wk = weight.reshape([splits, inputs / splits, outputs]);
                let y = xk.matmul(wk).cast(DType::F32).sum_dim(0).cast(dtype);
                return y.reshape([batch, seq, outputs]);
            }
            // Many rows in half precision: cubek's TMA kernel, a fixed choice as fast as Burn's
            // autotuned one on the H200's prefill products, without minutes of tuning.
            let tma = super::tma_matmul_enabled()
                .then(|| {
                    matmul::matmul_tma(
                        prim(x.clone().reshape([rows, inputs])),
                        prim(weight.clone()),
                    )
                })
                .flatten();
            let y: Tensor<Self, 2> = match tma {
                Some(y) => wrap(y),
                None if x.dtype() != DType::F32
                    || weight.dtype() != DType::F32
                    || super::tf32_allowed() =>
                {
                    return burn::tensor::module::linear(x, weight, bias);
                }
                None => wrap(matmul::matmul_f32(
                    prim(x.reshape([rows, inputs])),
                    prim(weight),
                )),
            };
            let y = match bias {
                Some(b) => {
                    let dtype = y.dtype();
                    y + b.cast(dtype).unsqueeze()
                }
                None => y,
            };
            y.reshape([batch, seq, outputs])
        }

        fn batched_experts() -> bool {
            kernels_enabled()
        }

        fn batched_matmul(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
            if super::tma_matmul_enabled()
                && let Some(y) = matmul::matmul_tma(prim(x.clone()), prim(w.clone()))
            {
                return wrap(y);
            }
            if x.dtype() != DType::F32 || w.dtype() != DType::F32 || super::tf32_allowed() {
                return x.matmul(w);
            }
            wrap(matmul::matmul_f32(prim(x), prim(w)))
        }

        fn routed_experts(input: RoutedExperts<Self>) -> Option<Tensor<Self, 2>> {
            let [tokens, _] = input.x.dims();
            let experts = input.router_logits.dims()[1];
            let dtype = input.x.dtype();
            let same = [&input.gate, &input.up, &input.down]
                .iter()
                .all(|t| t.dtype() == dtype)
                && input.router_logits.dtype() == dtype;
            if !kernels_enabled()
                || !same
                || tokens * input.top_k > moe::MAX_SLOTS
                || input.top_k > moe::MAX_TOP_K.min(experts)
                || input.top_k == 0
            {
                return None;
            }
            Some(wrap(moe::routed_experts(
                prim(input.x),
                prim(input.router_logits),
                moe::ExpertWeights {
                    gate: prim(input.gate),
                    up: prim(input.up),
                    down: prim(input.down),
                },
                input.top_k,
            )))
        }

        fn scan_parameters(
            a_log: Tensor<Self, 2>,
            d: Tensor<Self, 1>,
            dt_bias: Option<Tensor<Self, 1>>,
        ) -> (Tensor<Self, 2>, Tensor<Self, 1>, Option<Tensor<Self, 1>>) {
            let [channels, _] = a_log.dims();
            let dtype = a_log.dtype();
            let fits = d.dims() == [channels]
                && d.dtype() == dtype
                && dt_bias
                    .as_ref()
                    .is_none_or(|b| b.dims() == [channels] && b.dtype() == dtype);
            if !kernels_enabled() || !fits {
                return (Self::ssm_a(a_log), d, dt_bias);
            }
            let has_bias = dt_bias.is_some();
            let [a, d, bias] = scan::scan_parameters(prim(a_log), prim(d), dt_bias.map(prim));
            (wrap(a), wrap(d), has_bias.then(|| wrap(bias)))
        }

        fn route_top_k(
            router_logits: Tensor<Self, 2>,
            top_k: usize,
        ) -> Option<(Tensor<Self, 1>, Tensor<Self, 1, burn::tensor::Int>)> {
            let experts = router_logits.dims()[1];
            if !kernels_enabled()
                || !super::device_topk_enabled()
                || !(1..=experts).contains(&top_k)
            {
                return None;
            }
            let (weights, experts) = moe::route(prim(router_logits), top_k);
            Some((wrap(weights), Tensor::from_primitive(experts)))
        }

        fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
            if !kernels_enabled() || weight.dtype() != x.dtype() {
                return super::rms_norm_tensor_ops(x, weight, eps);
            }
            wrap(norm::rms_norm(prim(x), prim(weight), eps))
        }

        fn add_rms_norm(
            x: Tensor<Self, 3>,
            update: Tensor<Self, 3>,
            weight: Tensor<Self, 1>,
            eps: f64,
        ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
            let dtype = x.dtype();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || weight.dtype() != dtype
                || update.dtype() != dtype
                || update.dims() != x.dims()
            {
                return super::add_then_rms_norm(x, update, weight, eps);
            }
            let (sum, normed) = norm::add_rms_norm(prim(x), prim(update), prim(weight), eps);
            (wrap(sum), wrap(normed))
        }

        fn add2_rms_norm(
            x: Tensor<Self, 3>,
            first: Tensor<Self, 3>,
            second: Tensor<Self, 3>,
            weight: Tensor<Self, 1>,
            eps: f64,
        ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
            let dtype = x.dtype();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || weight.dtype() != dtype
                || [&first, &second]
                    .iter()
                    .any(|t| t.dtype() != dtype || t.dims() != x.dims())
            {
                return Self::add_rms_norm(x + first, second, weight, eps);
            }
            let (sum, normed) =
                norm::add2_rms_norm(prim(x), prim(first), prim(second), prim(weight), eps);
            (wrap(sum), wrap(normed))
        }

        fn normed_projection(input: NormedProjection<Self>) -> Option<Tensor<Self, 3>> {
            let [batch, seq, inputs] = input.x.dims();
            let rows = batch * seq;
            let dtype = input.x.dtype();
            let [k, outputs] = input.weight.dims();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || rows == 0
                || rows > gemv::NORMED_MAX_ROWS
                || k != inputs
                || input.norm.dims() != [inputs]
                || input.weight.dtype() != dtype
                || input.norm.dtype() != dtype
                || input
                    .bias
                    .as_ref()
                    .is_some_and(|b| b.dtype() != dtype || b.dims() != [outputs])
                || input
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.dtype() != dtype || p.dims() != input.x.dims())
            {
                return None;
            }
            let flat = |t: Tensor<Self, 3>| prim(t.reshape([rows, inputs]));
            let y: Tensor<Self, 2> = wrap(gemv::gemv_normed(
                flat(input.x),
                gemv::PreNorm {
                    update: input.pending.map(flat),
                    weight: prim(input.norm),
                    eps: input.eps,
                },
                prim(input.weight),
                input.bias.map(prim),
            ));
            Some(y.reshape([batch, seq, outputs]))
        }

        fn normed_projections(input: NormedProjections<Self>) -> Option<Vec<Tensor<Self, 3>>> {
            let [batch, seq, inputs] = input.x.dims();
            let rows = batch * seq;
            let dtype = input.x.dtype();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || !super::qkv_one_enabled()
                || rows == 0
                || rows > gemv::NORMED_MAX_ROWS
                || !(1..=3).contains(&input.weights.len())
                || input
                    .weights
                    .iter()
                    .any(|w| w.dims()[0] != inputs || w.dtype() != dtype)
                || input.norm.dims() != [inputs]
                || input.norm.dtype() != dtype
                || input
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.dtype() != dtype || p.dims() != input.x.dims())
            {
                return None;
            }
            let flat = |t: Tensor<Self, 3>| prim(t.reshape([rows, inputs]));
            let ys = gemv::gemv_normed_many(
                flat(input.x),
                gemv::PreNorm {
                    update: input.pending.map(flat),
                    weight: prim(input.norm),
                    eps: input.eps,
                },
                input.weights.into_iter().map(prim).collect(),
            )?;
            Some(
                ys.into_iter()
                    .map(|y| {
                        let y: Tensor<Self, 2> = wrap(y);
                        let outputs = y.dims()[1];
                        y.reshape([batch, seq, outputs])
                    })
                    .collect(),
            )
        }

        fn routed_experts_normed(input: NormedMoe<Self>) -> Option<NormedMoeOutput<Self>> {
            let [tokens, hidden] = input.x.dims();
            let [_, experts] = input.router.dims();
            let [_, _, inner] = input.gate.dims();
            let dtype = input.x.dtype();
            let same_dtype = [&input.gate, &input.up, &input.down]
                .iter()
                .all(|t| t.dtype() == dtype)
                && input.router.dtype() == dtype
                && input.norm.dtype() == dtype
                && input
                    .first
                    .iter()
                    .chain([&input.second])
                    .all(|t| t.dtype() == dtype && t.dims() == [tokens, hidden]);
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || !same_dtype
                || tokens == 0
                || !moe::supports_normed_routing(tokens, hidden, experts, input.top_k)
                || input.router.dims() != [hidden, experts]
                || input.norm.dims() != [hidden]
                || input.gate.dims() != [experts, hidden, inner]
                || input.up.dims() != [experts, hidden, inner]
                || input.down.dims() != [experts, inner, hidden]
            {
                return None;
            }
            let out = moe::routed_experts_normed(
                moe::NormedRouting {
                    sum: moe::ResidualNorm {
                        x: prim(input.x),
                        first: input.first.map(prim),
                        second: prim(input.second),
                        norm: prim(input.norm),
                        eps: input.eps,
                    },
                    router: prim(input.router),
                },
                moe::ExpertWeights {
                    gate: prim(input.gate),
                    up: prim(input.up),
                    down: prim(input.down),
                },
                input.top_k,
            );
            Some(NormedMoeOutput {
                residual: wrap(out.residual),
                y: wrap(out.y),
                router_logits: wrap(out.logits),
            })
        }

        fn argmax_rows(x: Tensor<Self, 2>) -> Option<Tensor<Self, 1, burn::tensor::Int>> {
            let [rows, width] = x.dims();
            if !kernels_enabled() || !argmax::supports(rows, width) {
                return None;
            }
            let int = <I as burn::tensor::Element>::dtype();
            Some(Tensor::from_primitive(argmax::argmax_rows(prim(x), int)))
        }

        fn swiglu(
            x: Tensor<Self, 2>,
            gate: Tensor<Self, 2>,
            up: Tensor<Self, 2>,
            down: Tensor<Self, 2>,
        ) -> Option<Tensor<Self, 2>> {
            let [rows, hidden] = x.dims();
            let [_, inner] = gate.dims();
            let dtype = x.dtype();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || rows > moe::MAX_SLOTS
                || [&gate, &up, &down].iter().any(|t| t.dtype() != dtype)
                || gate.dims() != [hidden, inner]
                || up.dims() != [hidden, inner]
                || down.dims() != [inner, hidden]
            {
                return None;
            }
            Some(wrap(moe::swiglu(prim(x), prim(gate), prim(up), prim(down))))
        }

        fn swiglu_normed(input: NormedMlp<Self>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
            let [rows, hidden] = input.x.dims();
            let [_, inner] = input.gate.dims();
            let dtype = input.x.dtype();
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || !super::normed_mlp_enabled()
                || rows == 0
                || rows > gemv::NORMED_MAX_ROWS
                || input.norm.dims() != [hidden]
                || input.gate.dims() != [hidden, inner]
                || input.up.dims() != [hidden, inner]
                || input.down.dims() != [inner, hidden]
                || [&input.gate, &input.up, &input.down]
                    .iter()
                    .any(|t| t.dtype() != dtype)
                || input.norm.dtype() != dtype
                || input
                    .first
                    .iter()
                    .chain([&input.second])
                    .any(|t| t.dtype() != dtype || t.dims() != [rows, hidden])
            {
                return None;
            }
            let (residual, y) = moe::swiglu_normed(
                moe::ResidualNorm {
                    x: prim(input.x),
                    first: input.first.map(prim),
                    second: prim(input.second),
                    norm: prim(input.norm),
                    eps: input.eps,
                },
                prim(input.gate),
                prim(input.up),
                prim(input.down),
            )?;
            Some((wrap(residual), wrap(y)))
        }

        fn mamba_step(input: MambaStepInput<Self>) -> Option<MambaStepOutput<Self>> {
            let dtype = input.xz.dtype();
            let [batch, width] = input.xz.dims();
            let [inner, d_conv] = input.conv_weight.dims();
            let [rank, _] = input.dt_proj.dims();
            let state = input.a_log.dims()[1];
            let same_dtype = [
                &input.conv_weight,
                &input.x_proj,
                &input.dt_proj,
                &input.a_log,
            ]
            .iter()
            .all(|t| t.dtype() == dtype)
                && input.norms.iter().all(|t| t.dtype() == dtype)
                && [&input.conv_bias, &input.dt_bias]
                    .iter()
                    .all(|t| t.as_ref().is_none_or(|t| t.dtype() == dtype))
                && input.d.dtype() == dtype;
            if !kernels_enabled()
                || !super::fused_step_enabled()
                || !same_dtype
                || !mamba_step::supports(d_conv, rank, state)
                || width != 2 * inner
                || input.conv_state.dims() != [batch, d_conv - 1, inner]
                || input.ssm_state.dims() != [batch, inner, state]
            {
                return None;
            }
            let (y, conv_state, ssm_state) = mamba_step::mamba_step(mamba_step::MambaStepTensors {
                xz: prim(input.xz),
                conv_state: prim(input.conv_state.cast(dtype)),
                conv_weight: prim(input.conv_weight),
                conv_bias: input.conv_bias.map(prim),
                x_proj: prim(input.x_proj),
                dt_norm: prim(input.norms[0].clone()),
                b_norm: prim(input.norms[1].clone()),
                c_norm: prim(input.norms[2].clone()),
                eps: input.eps,
                dt_proj: prim(input.dt_proj),
                dt_bias: input.dt_bias.map(prim),
                a_log: prim(input.a_log),
                d: prim(input.d),
                ssm_state: prim(input.ssm_state.cast(DType::F32)),
            });
            Some(MambaStepOutput {
                y: wrap(y),
                conv_state: wrap(conv_state),
                ssm_state: wrap(ssm_state),
            })
        }

        fn device_memory_reserved(device: &Self::Device) -> Option<u64> {
            R::client(device)
                .memory_usage()
                .ok()
                .map(|m| m.bytes_reserved)
        }

        fn decode_attention(
            q: Tensor<Self, 3>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            hidden: Option<Tensor<Self, 2, burn::tensor::Bool>>,
            scale: f64,
        ) -> Option<Tensor<Self, 2>> {
            let [_, heads, dim] = q.dims();
            let [_, kv_heads, keys, _] = k.dims();
            let dtype = q.dtype();
            if !kernels_enabled()
                || !super::fused_attention_enabled()
                || keys > attention::MAX_KEYS
                || dim > attention::UNITS
                || kv_heads == 0
                || heads % kv_heads != 0
                || k.dtype() != dtype
                || v.dtype() != dtype
            {
                return None;
            }
            let pad = hidden.map(|h| prim(h.float().cast(DType::F32)));
            Some(wrap(attention::decode_attention(
                prim(q),
                prim(k),
                prim(v),
                pad,
                scale,
            )))
        }

        fn queue_read_ids(ids: Tensor<Self, 1, burn::tensor::Int>) -> super::QueuedIds {
            use burn::tensor::TensorData;
            use burn_cubecl::cubecl::server::CopyDescriptor;
            let t = burn_cubecl::kernel::into_contiguous(ids.into_primitive());
            let (shape, dtype) = (t.meta.shape().clone(), t.dtype);
            let (strides, elem_size) = (t.meta.strides().clone(), t.elem_size());
            let client = static_client::<R>(&t.device);
            let descriptor =
                CopyDescriptor::new(t.handle.binding(), shape.clone(), strides, elem_size);
            // Enqueued now, behind the work already issued; waited on in `wait`.
            let read = client.read_one_tensor_async(descriptor);
            super::QueuedIds::pending(move || {
                let bytes = burn_cubecl::cubecl::future::block_on(read).map_err(|e| {
                    crate::JambaError::Input(format!("reading token ids from the device: {e}"))
                })?;
                super::read_ids(TensorData::from_bytes(bytes, shape, dtype))
            })
        }

        fn exclusive<T: Send + 'static>(device: &Self::Device, f: impl FnOnce() -> T + Send) -> T {
            let client = R::client(device);
            let mut f = Some(f);
            // The channel is down only when the device thread is gone; then run in place.
            match client.exclusive(|| (f.take().expect("runs once"))()) {
                Ok(t) => t,
                Err(_) => (f.take().expect("not run when the channel is down"))(),
            }
        }

        fn selective_scan_backward(
            input: ScanInput<Self>,
            grad_y: Tensor<Self, 3>,
        ) -> Option<ScanGrads<Self>> {
            if !Self::has_fused_scan_backward(input.a.dims()[1]) {
                return None;
            }
            let [batch, seq, channels] = input.u.dims();
            let state = input.a.dims()[1];
            let dtype_of = |t: &Tensor<Self, 3>| t.dtype();
            let (du_t, dd_t, db_t, dc_t) = (
                dtype_of(&input.u),
                dtype_of(&input.delta),
                dtype_of(&input.b),
                dtype_of(&input.c),
            );
            let dz_t = input.z.as_ref().map(dtype_of);
            let da_t = input.a.dtype();
            let dskip_t = input.d.as_ref().map_or(DType::F32, |d| d.dtype());
            let dbias_t = input.delta_bias.as_ref().map_or(DType::F32, |d| d.dtype());
            let dh_t = input
                .initial_state
                .as_ref()
                .map_or(DType::F32, |d| d.dtype());
            let grad_y = prim(grad_y.cast(du_t));
            let g = scan_bwd::selective_scan_bwd(scan_tensors(input), grad_y, None);
            Some(ScanGrads {
                u: wrap::<Self, 3>(g.du).cast(du_t),
                delta: wrap::<Self, 3>(g.d_delta).cast(dd_t),
                a: wrap::<Self, 3>(g.da_part)
                    .sum_dim(0)
                    .reshape([channels, state])
                    .cast(da_t),
                b: wrap::<Self, 4>(g.db_part)
                    .sum_dim(1)
                    .reshape([batch, seq, state])
                    .cast(db_t),
                c: wrap::<Self, 4>(g.dc_part)
                    .sum_dim(1)
                    .reshape([batch, seq, state])
                    .cast(dc_t),
                d: wrap::<Self, 2>(g.dd_part)
                    .sum_dim(0)
                    .reshape([channels])
                    .cast(dskip_t),
                z: g.dz.zip(dz_t).map(|(dz, t)| wrap::<Self, 3>(dz).cast(t)),
                delta_bias: wrap::<Self, 2>(g.dbias_part)
                    .sum_dim(0)
                    .reshape([channels])
                    .cast(dbias_t),
                initial_state: wrap::<Self, 3>(g.d_state).cast(dh_t),
            })
        }

        fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
            if !kernels_enabled() || input.weight.dims()[1] < 2 {
                return super::causal_conv1d_tensor_ops(input);
            }
            let (y, state) = conv::causal_conv1d(conv_tensors(input));
            ConvOutput {
                y: wrap(y),
                state: wrap(state),
            }
        }
    }
}

/// Autodiff: the fused scan as one recorded operation whose backward is
/// [`JambaBackend::selective_scan_backward`] (the backward kernel) where the inner backend has
/// one; everything else, and backends without it, differentiate the tensor-op path.
#[cfg(feature = "autodiff")]
mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorPrimitive};

    use super::JambaBackend;
    use crate::scan::{ScanInput, ScanOutput, selective_scan_tensor_ops};

    fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    /// The inner backend's inputs, in [`ScanInput`] order; `z` is `None` without a gate.
    #[derive(Debug, Clone)]
    struct Saved<B: Backend> {
        u: B::FloatTensorPrimitive,
        delta: B::FloatTensorPrimitive,
        a: B::FloatTensorPrimitive,
        b: B::FloatTensorPrimitive,
        c: B::FloatTensorPrimitive,
        d: B::FloatTensorPrimitive,
        z: Option<B::FloatTensorPrimitive>,
        bias: B::FloatTensorPrimitive,
        h0: B::FloatTensorPrimitive,
        softplus: bool,
    }

    impl<B: Backend> Saved<B> {
        fn input(&self) -> ScanInput<B> {
            ScanInput {
                u: tensor(self.u.clone()),
                delta: tensor(self.delta.clone()),
                a: tensor(self.a.clone()),
                b: tensor(self.b.clone()),
                c: tensor(self.c.clone()),
                d: Some(tensor(self.d.clone())),
                z: self.z.clone().map(tensor),
                delta_bias: Some(tensor(self.bias.clone())),
                delta_softplus: self.softplus,
                initial_state: Some(tensor(self.h0.clone())),
            }
        }
    }

    #[derive(Debug)]
    struct ScanBackward;

    impl<B: JambaBackend> Backward<B, 9> for ScanBackward {
        type State = Saved<B>;

        fn backward(
            self,
            ops: Ops<Self::State, 9>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad_y = tensor::<B, 3>(grads.consume::<B>(&ops.node));
            let saved = ops.state;
            let has_z = saved.z.is_some();
            let Some(g) = B::selective_scan_backward(saved.input(), grad_y) else {
                unreachable!("recorded only where the inner backend has a fused backward");
            };
            let grads_in_order = [
                Some(g.u.into_primitive().tensor()),
                Some(g.delta.into_primitive().tensor()),
                Some(g.a.into_primitive().tensor()),
                Some(g.b.into_primitive().tensor()),
                Some(g.c.into_primitive().tensor()),
                Some(g.d.into_primitive().tensor()),
                g.z.filter(|_| has_z).map(|z| z.into_primitive().tensor()),
                Some(g.delta_bias.into_primitive().tensor()),
                Some(g.initial_state.into_primitive().tensor()),
            ];
            for (node, grad) in ops.parents.into_iter().zip(grads_in_order) {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    impl<B: JambaBackend, C: CheckpointStrategy> JambaBackend for Autodiff<B, C> {
        fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
            let [batch, _, channels] = input.u.dims();
            let state = input.a.dims()[1];
            if !B::has_fused_scan_backward(state) {
                return selective_scan_tensor_ops(input);
            }
            let device = input.u.device();
            let zeros1 = || Tensor::<Self, 1>::zeros([channels], (&device, DType::F32));
            let p = |t: Tensor<Self, 3>| t.into_primitive().tensor();
            let u = p(input.u);
            let z = input.z.map(p);
            let delta = p(input.delta);
            let a = input.a.into_primitive().tensor();
            let b = p(input.b);
            let c = p(input.c);
            let d = input.d.unwrap_or_else(zeros1).into_primitive().tensor();
            let bias = input
                .delta_bias
                .unwrap_or_else(zeros1)
                .into_primitive()
                .tensor();
            let h0 = p(input
                .initial_state
                .unwrap_or_else(|| Tensor::zeros([batch, channels, state], (&device, DType::F32))));
            let saved = Saved::<B> {
                u: u.primitive.clone(),
                delta: delta.primitive.clone(),
                a: a.primitive.clone(),
                b: b.primitive.clone(),
                c: c.primitive.clone(),
                d: d.primitive.clone(),
                z: z.as_ref().map(|z| z.primitive.clone()),
                bias: bias.primitive.clone(),
                h0: h0.primitive.clone(),
                softplus: input.delta_softplus,
            };
            // Without a gate, `u` stands in for the `z` parent; its gradient is not registered.
            let z_node = z.as_ref().unwrap_or(&u).node.clone();
            let nodes = [
                u.node.clone(),
                delta.node.clone(),
                a.node.clone(),
                b.node.clone(),
                c.node.clone(),
                d.node.clone(),
                z_node,
                bias.node.clone(),
                h0.node.clone(),
            ];
            let out = B::selective_scan(saved.input());
            let y = out.y.into_primitive().tensor();
            let y = match ScanBackward.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(saved, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            ScanOutput {
                y: Tensor::from_primitive(TensorPrimitive::Float(y)),
                state: Tensor::from_inner(out.state),
            }
        }

        fn has_fused_scan_backward(_state: usize) -> bool {
            false // no fused double backward
        }

        fn device_memory_reserved(device: &Self::Device) -> Option<u64> {
            B::device_memory_reserved(device)
        }

        fn exclusive<T: Send + 'static>(device: &Self::Device, f: impl FnOnce() -> T + Send) -> T {
            B::exclusive(device, f)
        }
        // `scaled_dot_product_attention` stays Burn's: autodiff differentiates it; the override is for inference.
    }
}
