//! The Mamba-1 mixer with Jamba's extra norms on Δ, B and C (`JambaMambaMixer`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Distribution, Tensor, backend::Backend};

use crate::cache::MambaState;
use crate::norm::{RmsNorm, RmsNormConfig};
use crate::ops::{ConvInput, JambaBackend, MambaStepInput, project};
use crate::scan::{ScanInput, selective_scan};

/// Configuration of [`MambaMixer`].
#[derive(Config, Debug)]
pub struct MambaMixerConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Inner width (`mamba_expand · hidden_size`).
    pub intermediate_size: usize,
    /// SSM state size N.
    pub d_state: usize,
    /// Convolution width.
    pub d_conv: usize,
    /// Rank of the Δ projection.
    pub dt_rank: usize,
    /// Whether the convolution has a bias.
    #[config(default = true)]
    pub conv_bias: bool,
    /// Whether `in_proj`/`out_proj` have biases.
    #[config(default = false)]
    pub proj_bias: bool,
    /// Epsilon of the Δ/B/C norms.
    #[config(default = 1e-6)]
    pub eps: f64,
}

/// in_proj → (x, z); depthwise causal conv1d + SiLU on x; x_proj → (Δ, B, C), each RMS-normed;
/// dt_proj; selective scan with `A = −exp(A_log)` and skip `D`; gate by SiLU(z); out_proj.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::Tensor;
/// use jamba::mamba::MambaMixerConfig;
/// let device = Default::default();
/// let mixer = MambaMixerConfig::new(16, 32, 4, 4, 1).init::<Cpu>(&device);
/// let y = mixer.forward(Tensor::<Cpu, 3>::ones([2, 5, 16], &device), None, None);
/// assert_eq!(y.dims(), [2, 5, 16]);
/// ```
#[derive(Module, Debug)]
pub struct MambaMixer<B: Backend> {
    /// `in_proj`, hidden → 2 · inner.
    pub in_proj: Linear<B>,
    /// Depthwise convolution weight, `[inner, d_conv]` (the checkpoint's `[inner, 1, d_conv]`).
    pub conv_weight: Param<Tensor<B, 2>>,
    /// Convolution bias, `[inner]`.
    pub conv_bias: Option<Param<Tensor<B, 1>>>,
    /// `x_proj`, inner → dt_rank + 2 · d_state, no bias.
    pub x_proj: Linear<B>,
    /// `dt_proj`, dt_rank → inner, with bias (added inside the scan, in f32).
    pub dt_proj: Linear<B>,
    /// `A_log`, `[inner, d_state]`.
    pub a_log: Param<Tensor<B, 2>>,
    /// The skip `D`, `[inner]`.
    pub d: Param<Tensor<B, 1>>,
    /// `out_proj`, inner → hidden.
    pub out_proj: Linear<B>,
    /// Norm of Δ before dt_proj.
    pub dt_layernorm: RmsNorm<B>,
    /// Norm of B.
    pub b_layernorm: RmsNorm<B>,
    /// Norm of C.
    pub c_layernorm: RmsNorm<B>,
    /// SSM state size.
    pub d_state: usize,
    /// Rank of Δ.
    pub dt_rank: usize,
}

impl MambaMixerConfig {
    /// Random weights with Mamba's structured parts: `A_log = log(1..=N)`, `D = 1`, and a Δ bias
    /// that puts softplus(bias) in `[0.001, 0.1]`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MambaMixer<B> {
        let (h, i, n, r, k) = (
            self.hidden_size,
            self.intermediate_size,
            self.d_state,
            self.dt_rank,
            self.d_conv,
        );
        let a_log = Tensor::<B, 1, burn::tensor::Int>::arange(1..n as i64 + 1, device)
            .float()
            .log()
            .unsqueeze::<2>()
            .repeat_dim(0, i);
        let dt = Tensor::<B, 1>::random(
            [i],
            Distribution::Uniform(0.001f64.ln(), 0.1f64.ln()),
            device,
        )
        .exp();
        let dt_bias = dt.clone() + (dt.neg().exp().neg() + 1.0).log().neg(); // softplus⁻¹
        let bound = 1.0 / (k as f64).sqrt();
        MambaMixer {
            in_proj: LinearConfig::new(h, 2 * i)
                .with_bias(self.proj_bias)
                .init(device),
            conv_weight: Param::from_tensor(Tensor::random(
                [i, k],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            conv_bias: self.conv_bias.then(|| {
                Param::from_tensor(Tensor::random(
                    [i],
                    Distribution::Uniform(-bound, bound),
                    device,
                ))
            }),
            x_proj: LinearConfig::new(i, r + 2 * n)
                .with_bias(false)
                .init(device),
            dt_proj: Linear {
                weight: LinearConfig::new(r, i).with_bias(false).init(device).weight,
                bias: Some(Param::from_tensor(dt_bias)),
            },
            a_log: Param::from_tensor(a_log),
            d: Param::from_tensor(Tensor::ones([i], device)),
            out_proj: LinearConfig::new(i, h)
                .with_bias(self.proj_bias)
                .init(device),
            dt_layernorm: RmsNormConfig::new(r).with_eps(self.eps).init(device),
            b_layernorm: RmsNormConfig::new(n).with_eps(self.eps).init(device),
            c_layernorm: RmsNormConfig::new(n).with_eps(self.eps).init(device),
            d_state: n,
            dt_rank: r,
        }
    }
}

impl<B: Backend> MambaMixer<B> {
    /// Inner width.
    pub fn intermediate_size(&self) -> usize {
        self.d.dims()[0]
    }

    /// Convolution width.
    pub fn d_conv(&self) -> usize {
        self.conv_weight.dims()[1]
    }
}

impl<B: JambaBackend> MambaMixer<B> {
    /// Mixes `x` `[batch, seq, hidden]`.
    ///
    /// `keep` is `[batch, seq, 1]`, 1 for real tokens and 0 for padding: as in the reference, the
    /// mixer's input and the convolution's output are zeroed at padded positions so that padding
    /// never reaches the state. With a `cache`, the convolution continues from its state and the
    /// scan from its SSM state, and both are updated.
    ///
    /// A decoding step (one token per row, a cache, no padding) takes the backend's fused step
    /// ([`JambaBackend::mamba_step`]) where it has one; [`forward_unfused`](Self::forward_unfused)
    /// is the same computation as separate operations.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        keep: Option<&Tensor<B, 3>>,
        cache: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        self.forward_projected(project(&self.in_proj, masked(x, keep)), keep, cache)
    }

    /// [`forward`](Self::forward) from `in_proj`'s output `[batch, seq, 2 · inner]` (`keep`
    /// already applied to the input): for a caller that ran `in_proj` itself, as the decoder
    /// layer does when it folds its input norm into the projection
    /// ([`JambaBackend::normed_projection`]).
    pub fn forward_projected(
        &self,
        projected: Tensor<B, 3>,
        keep: Option<&Tensor<B, 3>>,
        cache: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, width] = projected.dims();
        let mut cache = cache;
        if let (1, None, Some(state)) = (seq, keep, cache.as_deref_mut())
            && self.step_fusable()
            && let Some(out) =
                B::mamba_step(self.step_input(projected.clone().reshape([batch, width]), state))
        {
            state.conv = out.conv_state;
            state.ssm = out.ssm_state;
            let inner = self.intermediate_size();
            return project(&self.out_proj, out.y.reshape([batch, 1, inner]));
        }
        self.mix(projected, keep, cache)
    }

    /// [`forward`](Self::forward) without the backend's fused decoding step: the reference
    /// form of every step, for comparisons.
    pub fn forward_unfused(
        &self,
        x: Tensor<B, 3>,
        keep: Option<&Tensor<B, 3>>,
        cache: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        self.mix(project(&self.in_proj, masked(x, keep)), keep, cache)
    }

    /// Whether the fused step computes this mixer: `x_proj` without bias and one epsilon for
    /// the three norms (as every Jamba checkpoint has).
    fn step_fusable(&self) -> bool {
        self.x_proj.bias.is_none()
            && self.b_layernorm.eps == self.dt_layernorm.eps
            && self.c_layernorm.eps == self.dt_layernorm.eps
    }

    /// The inputs of [`JambaBackend::mamba_step`] for this mixer: `xz` is `in_proj`'s output
    /// for one token per row, `[batch, 2 · inner]`, and `state` the layer's cache. For tests and
    /// benchmarks of a backend's fused step; [`forward`](Self::forward) calls it itself.
    ///
    /// ```
    /// use jamba::backends::Cpu;
    /// use jamba::ops::JambaBackend;
    /// use jamba::mamba::MambaMixerConfig;
    /// let device = Default::default();
    /// let mixer = MambaMixerConfig::new(16, 32, 4, 4, 1).init::<Cpu>(&device);
    /// let state = jamba::cache::MambaState {
    ///     conv: burn::tensor::Tensor::zeros([2, 3, 32], &device),
    ///     ssm: burn::tensor::Tensor::zeros([2, 32, 4], &device),
    /// };
    /// let input = mixer.step_input(burn::tensor::Tensor::ones([2, 64], &device), &state);
    /// assert!(Cpu::mamba_step(input).is_none()); // the CPU runs the separate operations
    /// ```
    pub fn step_input(&self, xz: Tensor<B, 2>, state: &MambaState<B>) -> MambaStepInput<B> {
        MambaStepInput {
            xz,
            conv_state: state.conv.clone(),
            conv_weight: self.conv_weight.val(),
            conv_bias: self.conv_bias.as_ref().map(|b| b.val()),
            x_proj: self.x_proj.weight.val(),
            norms: [
                self.dt_layernorm.weight.val(),
                self.b_layernorm.weight.val(),
                self.c_layernorm.weight.val(),
            ],
            eps: self.dt_layernorm.eps,
            dt_proj: self.dt_proj.weight.val(),
            dt_bias: self.dt_proj.bias.as_ref().map(|b| b.val()),
            a_log: self.a_log.val(),
            d: self.d.val(),
            ssm_state: state.ssm.clone(),
        }
    }

    /// Everything after `in_proj` as separate operations: `projected` is `[batch, seq, 2 ·
    /// inner]`.
    fn mix(
        &self,
        projected: Tensor<B, 3>,
        keep: Option<&Tensor<B, 3>>,
        cache: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = projected.dims();
        let inner = self.intermediate_size();
        let dtype = projected.dtype();
        let xs = projected.clone().slice([0..batch, 0..seq, 0..inner]);
        let z = projected.slice([0..batch, 0..seq, inner..2 * inner]);

        let (prefix, ssm_state) = match &cache {
            Some(state) => (Some(state.conv.clone()), Some(state.ssm.clone())),
            None => (None, None),
        };
        let conv = B::causal_conv1d(self.conv_input(xs, prefix, true));
        let conv_state = conv.state;
        let u = masked(conv.y, keep);

        let (r, n) = (self.dt_rank, self.d_state);
        let dbc = project(&self.x_proj, u.clone());
        let dt = self
            .dt_layernorm
            .forward(dbc.clone().slice([0..batch, 0..seq, 0..r]));
        let b = self
            .b_layernorm
            .forward(dbc.clone().slice([0..batch, 0..seq, r..r + n]));
        let c = self
            .c_layernorm
            .forward(dbc.slice([0..batch, 0..seq, r + n..r + 2 * n]));
        let delta = B::projection(dt, self.dt_proj.weight.val(), None);
        let (a, d, delta_bias) = B::scan_parameters(
            self.a_log.val(),
            self.d.val(),
            self.dt_proj.bias.as_ref().map(|p| p.val()),
        );

        let out = selective_scan(ScanInput {
            u,
            delta,
            a,
            b,
            c,
            d: Some(d),
            z: Some(z),
            delta_bias,
            delta_softplus: true,
            initial_state: ssm_state,
        });
        if let Some(state) = cache {
            state.conv = conv_state;
            state.ssm = out.state;
        }
        project(&self.out_proj, out.y.cast(dtype))
    }

    /// Depthwise causal convolution over time (plus bias, no activation), continuing from
    /// `prefix`, the last `d_conv − 1` inputs before `x` (zeros when absent). Returns the output
    /// and the new prefix.
    pub fn causal_conv(
        &self,
        x: Tensor<B, 3>,
        prefix: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let out = B::causal_conv1d(self.conv_input(x, prefix, false));
        (out.y, out.state)
    }

    /// This mixer's convolution weights applied to `x` after `prefix`.
    fn conv_input(
        &self,
        x: Tensor<B, 3>,
        prefix: Option<Tensor<B, 3>>,
        silu: bool,
    ) -> ConvInput<B> {
        ConvInput {
            x,
            weight: self.conv_weight.val(),
            bias: self.conv_bias.as_ref().map(|b| b.val()),
            prefix,
            silu,
        }
    }
}

/// `x` with padded positions zeroed (`keep` is 1 for real tokens, 0 for padding).
fn masked<B: Backend>(x: Tensor<B, 3>, keep: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
    match keep {
        Some(k) => x * k.clone(),
        None => x,
    }
}
