//! The Mamba-1 mixer with Jamba's extra norms on Δ, B and C (`JambaMambaMixer`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{DType, Distribution, Tensor, backend::Backend};

use super::RmsNorm;
use super::rms_norm::RmsNormConfig;
use crate::cache::MambaState;
use crate::ops::{ConvInput, JambaBackend, ScanInput, linear};

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

/// `in_proj` → (x, z); depthwise causal conv1d + SiLU on x; `x_proj` → (Δ, B, C), each
/// RMS-normed; `dt_proj`; selective scan with `A = −exp(A_log)` and skip `D`; gate by SiLU(z);
/// `out_proj`.
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::model::MambaMixerConfig;
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
    /// Norm of Δ before `dt_proj`.
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
        let uniform = |shape: [usize; 2]| {
            Tensor::<B, 2>::random(shape, Distribution::Uniform(-bound, bound), device)
        };
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = |size| RmsNormConfig::new(size).with_eps(self.eps).init(device);
        MambaMixer {
            in_proj: linear(h, 2 * i, self.proj_bias),
            conv_weight: Param::from_tensor(uniform([i, k])),
            conv_bias: self
                .conv_bias
                .then(|| Param::from_tensor(uniform([1, i]).reshape([i]))),
            x_proj: linear(i, r + 2 * n, false),
            dt_proj: Linear {
                weight: linear(r, i, false).weight,
                bias: Some(Param::from_tensor(dt_bias)),
            },
            a_log: Param::from_tensor(a_log),
            d: Param::from_tensor(Tensor::ones([i], device)),
            out_proj: linear(i, h, self.proj_bias),
            dt_layernorm: norm(r),
            b_layernorm: norm(n),
            c_layernorm: norm(n),
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
    /// `keep` is `[batch, seq, 1]`, 1 for real tokens and 0 for padding: as in the reference,
    /// the mixer's input and the convolution's output are zeroed at padded positions so that
    /// padding never reaches the state. With a `cache`, the convolution continues from its
    /// state and the scan from its SSM state, and both are updated.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        keep: Option<&Tensor<B, 3>>,
        cache: Option<&mut MambaState<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (inner, r, n) = (self.intermediate_size(), self.dt_rank, self.d_state);
        let xz = linear(&self.in_proj, masked(x, keep));
        let x = xz.clone().slice([0..batch, 0..seq, 0..inner]);
        let z = xz.slice([0..batch, 0..seq, inner..2 * inner]);

        let conv = B::causal_conv1d(ConvInput {
            x,
            weight: self.conv_weight.val(),
            bias: self.conv_bias.as_ref().map(|b| b.val()),
            prefix: cache.as_ref().map(|c| c.conv.clone()),
            silu: true,
        });
        let u = masked(conv.y, keep);

        let dbc = linear(&self.x_proj, u.clone());
        let part = |from: usize, to: usize| dbc.clone().slice([0..batch, 0..seq, from..to]);
        let dt = self.dt_layernorm.forward(part(0, r));
        let b = self.b_layernorm.forward(part(r, r + n));
        let c = self.c_layernorm.forward(part(r + n, r + 2 * n));

        let scan = B::selective_scan(ScanInput {
            u,
            delta: B::projection(dt, self.dt_proj.weight.val(), None),
            a: self.a_log.val().cast(DType::F32).exp().neg(),
            b,
            c,
            d: Some(self.d.val()),
            z: Some(z),
            delta_bias: self.dt_proj.bias.as_ref().map(|b| b.val()),
            delta_softplus: true,
            initial_state: cache.as_ref().map(|c| c.ssm.clone()),
        });
        if let Some(state) = cache {
            state.conv = conv.state;
            state.ssm = scan.state;
        }
        linear(&self.out_proj, scan.y)
    }
}

/// `x` with padded positions zeroed (`keep` is 1 for real tokens, 0 for padding).
pub(crate) fn masked<B: Backend>(x: Tensor<B, 3>, keep: Option<&Tensor<B, 3>>) -> Tensor<B, 3> {
    match keep {
        Some(k) => x * k.clone(),
        None => x,
    }
}
