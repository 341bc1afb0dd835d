//! The SwiGLU feed-forward block (`JambaMLP`): `down(silu(gate(x)) · up(x))`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, activation::silu, backend::Backend};

use crate::ops::{JambaBackend, linear};

/// Configuration of [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Inner width.
    pub intermediate_size: usize,
}

/// A SwiGLU MLP: the feed-forward block of the layers without experts, and the shape of one
/// expert of a [`SparseMoe`](super::SparseMoe).
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::model::MlpConfig;
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
    /// Randomly initialised weights (Burn's default Kaiming-uniform), without biases.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Mlp {
            gate_proj: linear(h, f),
            up_proj: linear(h, f),
            down_proj: linear(f, h),
        }
    }
}

impl<B: JambaBackend> Mlp<B> {
    /// Applies the MLP to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = silu(linear(&self.gate_proj, x.clone()));
        linear(&self.down_proj, gate * linear(&self.up_proj, x))
    }
}
