//! Root-mean-square layer normalisation, computed in f32 whatever the model's dtype.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use crate::ops::{JambaBackend, rms_norm_tensor_ops};

/// Configuration of [`RmsNorm`].
#[derive(Config, Debug)]
pub struct RmsNormConfig {
    /// Width of the normalised (last) dimension.
    pub size: usize,
    /// Added to the mean square before the square root.
    #[config(default = 1e-6)]
    pub eps: f64,
}

/// `weight * x / sqrt(mean(x²) + eps)` over the last dimension (`JambaRMSNorm`).
///
/// The statistics are computed in f32 and the normalised value is cast back to the input's dtype
/// before the weight is applied, exactly as the reference does; with bf16 activations this matters.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::Tensor;
/// use jamba::norm::RmsNormConfig;
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
}

impl<B: JambaBackend> RmsNorm<B> {
    /// Normalises over the last dimension. Rank-3 inputs (every norm of the model) go through
    /// [`JambaBackend::rms_norm`], one fused kernel on GPU backends.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if D != 3 {
            return rms_norm_tensor_ops(x, self.weight.val(), self.eps);
        }
        // Same primitive, same rank: only the const parameter is restated.
        let x3 = Tensor::<B, 3>::from_primitive(x.into_primitive());
        Tensor::from_primitive(B::rms_norm(x3, self.weight.val(), self.eps).into_primitive())
    }

    /// A residual connection then this norm: `(x + update, norm(x + update))`, one kernel on
    /// GPU backends ([`JambaBackend::add_rms_norm`]).
    ///
    /// ```
    /// use jamba::backends::Cpu;
    /// use burn::tensor::Tensor;
    /// use jamba::norm::RmsNormConfig;
    /// let device = Default::default();
    /// let norm = RmsNormConfig::new(4).init::<Cpu>(&device);
    /// let (sum, normed) = norm.add_forward(
    ///     Tensor::<Cpu, 3>::ones([1, 2, 4], &device),
    ///     Tensor::ones([1, 2, 4], &device),
    /// );
    /// assert_eq!(sum.into_data().to_vec::<f32>().unwrap(), vec![2.0; 8]);
    /// assert_eq!(normed.dims(), [1, 2, 4]);
    /// ```
    pub fn add_forward(
        &self,
        x: Tensor<B, 3>,
        update: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        B::add_rms_norm(x, update, self.weight.val(), self.eps)
    }

    /// Two residual updates then this norm: `(s, norm(s))` for `s = (x + first) + second`,
    /// each sum rounded to the dtype (one kernel on GPU backends,
    /// [`JambaBackend::add2_rms_norm`]).
    pub fn add2_forward(
        &self,
        x: Tensor<B, 3>,
        first: Tensor<B, 3>,
        second: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        B::add2_rms_norm(x, first, second, self.weight.val(), self.eps)
    }

    /// `linear(norm(x + pending))` through [`JambaBackend::normed_projection`] (the norm
    /// folded into the projection), or `None` where the backend has no such form.
    pub fn project_normed(
        &self,
        x: &Tensor<B, 3>,
        pending: Option<&Tensor<B, 3>>,
        linear: &burn::nn::Linear<B>,
    ) -> Option<Tensor<B, 3>> {
        B::normed_projection(crate::ops::NormedProjection {
            x: x.clone(),
            pending: pending.cloned(),
            norm: self.weight.val(),
            eps: self.eps,
            weight: linear.weight.val(),
            bias: linear.bias.as_ref().map(|b| b.val()),
        })
    }

    /// [`project_normed`](Self::project_normed) of several bias-free projections in one
    /// launch ([`JambaBackend::normed_projections`]), or `None` where the backend has no such
    /// form or a projection has a bias.
    pub fn project_normed_many<const N: usize>(
        &self,
        x: &Tensor<B, 3>,
        pending: Option<&Tensor<B, 3>>,
        linears: [&burn::nn::Linear<B>; N],
    ) -> Option<[Tensor<B, 3>; N]> {
        if linears.iter().any(|l| l.bias.is_some()) {
            return None;
        }
        let ys = B::normed_projections(crate::ops::NormedProjections {
            x: x.clone(),
            pending: pending.cloned(),
            norm: self.weight.val(),
            eps: self.eps,
            weights: linears.iter().map(|l| l.weight.val()).collect(),
        })?;
        ys.try_into().ok()
    }
}
