//! The model's backend extension, [`JambaBackend`]: the operations Jamba needs that tensor
//! operations express badly (the selective scan and the depthwise causal convolution, with the
//! scan's backward for training), and the precision of its products and attention.
//!
//! Every method has a tensor-op default, so every Burn backend runs the model. The
//! implementations here replace them where a backend can do better: CubeCL backends (cuda,
//! wgpu) with the fused kernels of `jamba-kernels`, the CPU backends with host loops,
//! `Autodiff<B>` with the scan kernel's backward where `B` has one, and `Fusion<B>` (Burn's
//! default GPU backend types) by handing the operation to `B`. A backend of your own needs
//! `impl JambaBackend for MyBackend {}` for the tensor-op path.
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use jamba::backends::Cpu;
//! use jamba::ops::{ConvInput, JambaBackend};
//! let device = Default::default();
//! let x = Tensor::<Cpu, 3>::random([1, 5, 8], Distribution::Normal(0.0, 1.0), &device);
//! let weight = Tensor::<Cpu, 2>::random([8, 4], Distribution::Normal(0.0, 1.0), &device);
//! let out = Cpu::causal_conv1d(ConvInput { x, weight, bias: None, prefix: None, silu: true });
//! assert_eq!((out.y.dims(), out.state.dims()), ([1, 5, 8], [1, 3, 8]));
//! ```

#[cfg(feature = "autodiff")]
mod autodiff;
mod conv;
mod cpu;
#[cfg(feature = "kernels")]
mod cube;
#[cfg(feature = "fusion")]
mod fusion;
mod scan;

pub use conv::{ConvInput, ConvOutput, causal_conv1d_tensor_ops};
pub use scan::{
    ScanGrads, ScanInput, ScanOutput, default_chunk_len, selective_scan_chunked,
    selective_scan_reference, selective_scan_tensor_ops, softplus,
};

use burn::nn::Linear;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, backend::Backend};

/// A Burn backend with Jamba's own operations. Implemented for flex, ndarray, every CubeCL
/// backend and `Autodiff` and `Fusion` of those; implement it (an empty body gives the
/// tensor-op path) for another.
pub trait JambaBackend: Backend {
    /// The selective scan ([`ScanInput`] defines it). `y` comes back in the dtype of `u`, the
    /// state in f32.
    fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
        selective_scan_tensor_ops(input)
    }

    /// Whether [`selective_scan_backward`](Self::selective_scan_backward) computes the scan's
    /// gradients for this state size. Where it does not, autodiff differentiates the tensor-op
    /// scan instead.
    fn fused_scan_backward(_state: usize) -> bool {
        false
    }

    /// The gradients of every input of the scan given the gradient of `y` (the final state is
    /// taken as not differentiated); called only where
    /// [`fused_scan_backward`](Self::fused_scan_backward) says so, and `None` otherwise.
    fn selective_scan_backward(
        _input: ScanInput<Self>,
        _grad_y: Tensor<Self, 3>,
    ) -> Option<ScanGrads<Self>> {
        None
    }

    /// Depthwise causal conv1d + bias (+ SiLU), continuing from `prefix`.
    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        causal_conv1d_tensor_ops(input)
    }

    /// `x [batch, seq, in] · weight [in, out] (+ bias)`: every projection of the model.
    ///
    /// CubeCL backends override it so that an f32 model multiplies in f32: their tensor-core
    /// kernels round f32 inputs to TF32, which flips a router's top-k choice at near-ties.
    fn projection(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        burn::tensor::module::linear(x, weight, bias)
    }

    /// Scaled dot-product attention: `[batch, heads, queries, dim]` queries against
    /// `[batch, heads, keys, dim]` keys and values, `mask` `true` where a key is hidden from a
    /// query. CubeCL backends override it so that an f32 model gets f32 attention.
    fn scaled_dot_product_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        options: AttentionModuleOptions,
    ) -> Tensor<Self, 4> {
        burn::tensor::module::attention(q, k, v, mask, None, options)
    }
}

/// Applies `layer` to the last dimension of `x` through [`JambaBackend::projection`] (what
/// `Linear::forward` does, with the backend's precision).
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// let device = Default::default();
/// let layer = LinearConfig::new(4, 3).init::<Cpu>(&device);
/// let x = Tensor::<Cpu, 2>::ones([5, 4], &device);
/// assert_eq!(jamba::ops::linear(&layer, x).dims(), [5, 3]);
/// ```
pub fn linear<B: JambaBackend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let weight = layer.weight.val();
    let bias = layer.bias.as_ref().map(|b| b.val());
    let mut dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let outputs = weight.dims()[1];
    let y = B::projection(x.reshape([1, rows, dims[D - 1]]), weight, bias);
    dims[D - 1] = outputs;
    y.reshape(dims)
}
