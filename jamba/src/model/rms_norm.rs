//! Root-mean-square layer normalisation (`JambaRMSNorm`), computed in f32 whatever the model's
//! dtype.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, backend::Backend};

/// Configuration of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width of the normalised (last) dimension.
    pub size: usize,
    /// Added to the mean square before the square root.
    #[config(default = 1e-6)]
    pub eps: f64,
}

/// `weight · x / sqrt(mean(x²) + eps)` over the last dimension.
///
/// The statistics are computed in f32 and the normalised value is cast back to the input's
/// dtype before the weight is applied, exactly as the reference does; with bf16 activations
/// this matters.
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::model::RmsNormConfig;
/// let device = Default::default();
/// let norm = RmsNormConfig::new(4).init::<Cpu>(&device);
/// let y = norm.forward(Tensor::<Cpu, 2>::from_floats([[1.0, -1.0, 1.0, -1.0]], &device));
/// assert!((y.into_data().to_vec::<f32>().unwrap()[0] - 1.0).abs() < 1e-5);
/// ```
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// Per-channel scale, `[size]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNormConfig {
    /// A norm with unit weight.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([self.size], device)),
            eps: self.eps,
        }
    }
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with the given weight.
    pub fn from_weight(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// Normalises `x` over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        rms_norm(x, self.weight.val(), self.eps)
    }
}

/// [`RmsNorm`] as a function of its weight: any rank, over the last dimension.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let variance = x.clone().square().mean_dim(D - 1);
    let normed = (x * variance.add_scalar(eps).sqrt().recip()).cast(dtype);
    normed * weight.unsqueeze()
}
