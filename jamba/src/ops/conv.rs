//! The depthwise causal convolution over time of the Mamba mixer, continuing from a state.

use burn::tensor::{Tensor, activation::silu, backend::Backend};

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

/// Result of a causal convolution.
#[derive(Debug, Clone)]
pub struct ConvOutput<B: Backend> {
    /// `[batch, seq, channels]`, the dtype of `x`.
    pub y: Tensor<B, 3>,
    /// The new prefix: the last `d_conv − 1` rows of `[prefix, x]`.
    pub state: Tensor<B, 3>,
}

/// The convolution in tensor ops: `d_conv` shifted multiply-adds.
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::ops::{ConvInput, causal_conv1d_tensor_ops};
/// let device = Default::default();
/// let x = Tensor::<Cpu, 3>::ones([1, 5, 8], &device);
/// let weight = Tensor::<Cpu, 2>::ones([8, 4], &device);
/// let out = causal_conv1d_tensor_ops(ConvInput { x, weight, bias: None, prefix: None, silu: false });
/// // The first output sees one input, the fourth and later all four taps.
/// let y = out.y.into_data().to_vec::<f32>().unwrap();
/// assert_eq!((y[0], y[3 * 8]), (1.0, 4.0));
/// assert_eq!(out.state.dims(), [1, 3, 8]);
/// ```
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
    let prefix = prefix
        .unwrap_or_else(|| Tensor::zeros([batch, k.max(1) - 1, channels], (&x.device(), x.dtype())));
    let padded = Tensor::cat(vec![prefix, x], 1);
    let tap = |j: usize| {
        let w = weight.clone().slice([0..channels, j..j + 1]).reshape([1, 1, channels]);
        padded.clone().slice([0..batch, j..j + seq]) * w
    };
    let mut y = (1..k).fold(tap(0), |acc, j| acc + tap(j));
    if let Some(bias) = bias {
        y = y + bias.reshape([1, 1, channels]);
    }
    if apply_silu {
        y = silu(y);
    }
    let state = padded.slice([0..batch, seq..seq + k.max(1) - 1]);
    ConvOutput { y, state }
}
