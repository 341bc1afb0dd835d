//! The causal conv1d kernel against an f64 loop, output buffers poisoned with NaN first.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, host, poisoned, prim};
use jamba_kernels::conv;

/// The convolution as a host loop in f64: `(y, new state)`.
fn conv_expected(
    x: &[f32],
    prefix: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    [batch, seq, channels, k]: [usize; 4],
    silu: bool,
) -> (Vec<f32>, Vec<f32>) {
    let at = |b: usize, p: usize, d: usize| -> f64 {
        if p < k - 1 {
            prefix[(b * (k - 1) + p) * channels + d] as f64
        } else {
            x[(b * seq + p - (k - 1)) * channels + d] as f64
        }
    };
    let mut y = vec![0f32; batch * seq * channels];
    let mut state = vec![0f32; batch * (k - 1) * channels];
    for b in 0..batch {
        for d in 0..channels {
            for t in 0..seq {
                let mut acc = bias.map_or(0.0, |v| v[d] as f64);
                for j in 0..k {
                    acc += weight[d * k + j] as f64 * at(b, t + j, d);
                }
                if silu {
                    acc /= 1.0 + (-acc).exp();
                }
                y[(b * seq + t) * channels + d] = acc as f32;
            }
            for j in 0..k - 1 {
                state[(b * (k - 1) + j) * channels + d] = at(b, seq + j, d) as f32;
            }
        }
    }
    (y, state)
}

/// Every combination of bias, prefix, SiLU and a transposed (strided) weight, over lengths from
/// one step to a prefill's, batches of one to three, and channel counts not multiples of a
/// cube's.
fn conv_kernel_matches_the_definition_over_the_grid<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(3);
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 1000] {
        for &(batch, channels, k) in &[(1usize, 5usize, 4usize), (2, 300, 2), (3, 33, 4)] {
            for options in 0..16u8 {
                let (with_bias, with_prefix, silu, strided_weight) = (
                    options & 1 != 0,
                    options & 2 != 0,
                    options & 4 != 0,
                    options & 8 != 0,
                );
                let x = rng.uniform(batch * seq * channels, -2.0, 2.0);
                let weight = rng.uniform(channels * k, -2.0, 2.0);
                let bias = with_bias.then(|| rng.uniform(channels, -2.0, 2.0));
                let prefix = if with_prefix {
                    rng.uniform(batch * (k - 1) * channels, -2.0, 2.0)
                } else {
                    vec![0.0; batch * (k - 1) * channels]
                };
                let expected = conv_expected(
                    &x,
                    &prefix,
                    &weight,
                    bias.as_deref(),
                    [batch, seq, channels, k],
                    silu,
                );
                let t3 = |v: &Vec<f32>, s: [usize; 3]| {
                    prim(Tensor::<K<R>, 3>::from_data(TensorData::new(v.clone(), s), device))
                };
                // The kernel reads the weight at its strides: also through a transposed view.
                let weight = if strided_weight {
                    let t: Vec<f32> = (0..k * channels)
                        .map(|i| weight[(i % channels) * k + i / channels])
                        .collect();
                    Tensor::<K<R>, 2>::from_data(TensorData::new(t, [k, channels]), device)
                        .transpose()
                } else {
                    Tensor::from_data(TensorData::new(weight, [channels, k]), device)
                };
                let bias = bias.unwrap_or_else(|| vec![0.0; channels]);
                let input = conv::ConvTensors {
                    x: t3(&x, [batch, seq, channels]),
                    prefix: t3(&prefix, [batch, k - 1, channels]),
                    weight: prim(weight),
                    bias: prim(Tensor::<K<R>, 1>::from_data(
                        TensorData::new(bias, [channels]),
                        device,
                    )),
                    silu,
                };
                let tag = format!(
                    "conv seq {seq} batch {batch} channels {channels} k {k} \
                     bias/prefix/silu/strided weight {:?}",
                    (with_bias, with_prefix, silu, strided_weight)
                );
                let y = poisoned::<R, 3>([batch, seq, channels], DType::F32, device);
                let s = poisoned::<R, 3>([batch, k - 1, channels], DType::F32, device);
                conv::causal_conv1d_into(input, y.clone(), s.clone());
                assert_close(&format!("{tag}: y"), &host::<R, 3>(y), &expected.0, 1e-5);
                assert_close(&format!("{tag}: state"), &host::<R, 3>(s), &expected.1, 0.0);
                cases += 1;
            }
        }
    }
    assert!(cases >= 240);
}

/// bf16 and f16 signals with weights and bias in the same dtype (a model's prefill: no casts
/// before the kernel) against the f32 kernel on the same rounded values: the output's rounding
/// (3.9e-3 for bf16, 4.9e-4 for f16); the state exactly.
fn conv_kernel_takes_half_weights<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(4);
    for (dtype, tolerance) in [(DType::BF16, 4e-3), (DType::F16, 5e-4)] {
        for &(batch, seq, channels, k) in &[
            (1usize, 2048usize, 256usize, 4usize),
            (2, 3, 33, 4),
            (1, 1, 64, 3),
        ] {
            let mut t = |shape: [usize; 3], std: f64| {
                Tensor::<K<R>, 3>::from_data(
                    TensorData::new(rng.normal(shape.iter().product(), 0.0, std), shape),
                    device,
                )
                .cast(dtype)
            };
            let x = t([batch, seq, channels], 1.0);
            let prefix = t([batch, k - 1, channels], 1.0);
            let weight = t([1, channels, k], 0.5).reshape([channels, k]);
            let bias = t([1, 1, channels], 0.5).reshape([channels]);
            let input = |d: DType| conv::ConvTensors {
                x: prim(x.clone().cast(d)),
                prefix: prim(prefix.clone().cast(d)),
                weight: prim(weight.clone().cast(d)),
                bias: prim(bias.clone().cast(d)),
                silu: true,
            };
            let (y, s) = conv::causal_conv1d(input(dtype));
            let (want_y, want_s) = conv::causal_conv1d(input(DType::F32));
            let tag = format!("{dtype:?} conv {batch}x{seq}x{channels} k {k}");
            let want_y = common::to_vec(common::wrap::<R, 3>(want_y).cast(dtype));
            assert_close(&format!("{tag}: y"), &host::<R, 3>(y), &want_y, tolerance);
            assert_close(&format!("{tag}: state"), &host::<R, 3>(s), &host::<R, 3>(want_s), 0.0);
        }
    }
}

runtime_tests!(
    conv_kernel_matches_the_definition_over_the_grid;
    cuda: conv_kernel_takes_half_weights,
);
