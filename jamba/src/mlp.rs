//! The SwiGLU feed-forward block (`JambaMLP`): `down(silu(gate(x)) * up(x))`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, backend::Backend};

use crate::norm::RmsNorm;
use crate::ops::{JambaBackend, NormedMlp, project};

/// Configuration of [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Inner width.
    pub intermediate_size: usize,
}

/// A SwiGLU MLP; also one expert of a mixture of experts.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::Tensor;
/// use jamba::mlp::MlpConfig;
/// let device = Default::default();
/// let mlp = MlpConfig::new(8, 16).init::<Cpu>(&device);
/// let y = mlp.forward(Tensor::<Cpu, 3>::ones([1, 5, 8], &device));
/// assert_eq!(y.dims(), [1, 5, 8]);
/// ```
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj`, hidden → intermediate.
    pub gate_proj: Linear<B>,
    /// `up_proj`, hidden → intermediate.
    pub up_proj: Linear<B>,
    /// `down_proj`, intermediate → hidden.
    pub down_proj: Linear<B>,
}

impl MlpConfig {
    /// Randomly initialised weights (Burn's default Kaiming-uniform).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        Mlp {
            gate_proj: LinearConfig::new(h, f).with_bias(false).init(device),
            up_proj: LinearConfig::new(h, f).with_bias(false).init(device),
            down_proj: LinearConfig::new(f, h).with_bias(false).init(device),
        }
    }
}

impl<B: JambaBackend> Mlp<B> {
    /// Applies the MLP to the last dimension. A few rows (a decoding step) take the backend's
    /// fused MLP where it has one ([`JambaBackend::swiglu`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let hidden = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let biased = [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .any(|l| l.bias.is_some());
        if !biased
            && let Some(y) = B::swiglu(
                x.clone().reshape([rows, hidden]),
                self.gate_proj.weight.val(),
                self.up_proj.weight.val(),
                self.down_proj.weight.val(),
            )
        {
            return y.reshape(dims);
        }
        self.forward_unfused(x)
    }

    /// The residual connection `s = (x + first) + second` and `norm` before this block, then
    /// the block on `norm(s)`, in the backend's fused form ([`JambaBackend::swiglu_normed`]);
    /// `None` where it has none (the caller adds, normalises and calls
    /// [`forward`](Self::forward)). Returns `s` and the block's output.
    pub fn forward_normed(
        &self,
        x: Tensor<B, 3>,
        first: Option<Tensor<B, 3>>,
        second: Tensor<B, 3>,
        norm: &RmsNorm<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>)> {
        let dims = x.dims();
        let [batch, seq, hidden] = dims;
        if [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .any(|l| l.bias.is_some())
        {
            return None;
        }
        let flat = |t: Tensor<B, 3>| t.reshape([batch * seq, hidden]);
        let (residual, y) = B::swiglu_normed(NormedMlp {
            x: flat(x),
            first: first.map(flat),
            second: flat(second),
            norm: norm.weight.val(),
            eps: norm.eps,
            gate: self.gate_proj.weight.val(),
            up: self.up_proj.weight.val(),
            down: self.down_proj.weight.val(),
        })?;
        Some((residual.reshape(dims), y.reshape(dims)))
    }

    /// [`forward`](Self::forward) as separate operations, for comparisons.
    pub fn forward_unfused<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = project(&self.gate_proj, x.clone());
        let act = B::silu_mul(gate, project(&self.up_proj, x));
        project(&self.down_proj, act)
    }
}

/// `down(silu(x · gate) · (x · up))` for `x` `[batch, seq, hidden]` and bias-free weights in
/// Burn's `[in, out]` layout: [`Mlp::forward`] on bare weights (an expert of a stacked
/// [`crate::moe::Experts`]).
pub fn swiglu<B: JambaBackend>(
    x: Tensor<B, 3>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let g = B::projection(x.clone(), gate, None);
    let act = B::silu_mul(g, B::projection(x, up, None));
    B::projection(act, down, None)
}
