//! The SwiGLU gate `silu(gate) · up` of a prefill in one launch, against an f64 loop of the
//! same rounded inputs that rounds where the kernel does (SiLU, then the product).
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use common::{Rng, assert_close, host, prim, rounded};
use jamba_kernels::activation;

/// Shapes whose element count is a whole number of 16-byte vectors (the kernel runs) and one
/// that is not (the kernel declines, `None`).
fn silu_mul_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(17);
    let width = 16 / dtype.size();
    let mut ran = 0usize;
    for shape in [[3usize, 5, 8 * width], [1, 2048, 64], [2, 3, 5]] {
        let len: usize = shape.iter().product();
        let (gate, g) = rounded::<R, 3>(rng.normal(len, 0.0, 3.0), shape, dtype, device);
        let (up, u) = rounded::<R, 3>(rng.normal(len, 0.0, 3.0), shape, dtype, device);
        let out = activation::silu_mul(prim(gate), prim(up));
        assert_eq!(out.is_some(), len.is_multiple_of(width), "{dtype:?} {shape:?}");
        let Some(out) = out else { continue };
        ran += 1;
        // The kernel rounds SiLU to the dtype before the product; the rounding of the product
        // itself is what `tolerance` allows.
        let round = |v: f64| -> f64 {
            match dtype {
                DType::BF16 => half::bf16::from_f64(v).to_f64(),
                DType::F16 => half::f16::from_f64(v).to_f64(),
                _ => v as f32 as f64,
            }
        };
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| {
                let g = g as f64;
                (round(g / (1.0 + (-g).exp())) * u as f64) as f32
            })
            .collect();
        assert_close(&format!("{dtype:?} silu_mul {shape:?}"), &host::<R, 3>(out), &want, tolerance);
    }
    assert_eq!(ran, 2, "{dtype:?}: the kernel ran on the whole-vector shapes");
}

fn silu_mul_kernel_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    silu_mul_grid::<R>(device, DType::F32, 1e-6);
}

/// bf16 and f16: the product's rounding (unit roundoff 3.9e-3, 4.9e-4), and a different last
/// bit of `exp` can flip SiLU's.
fn silu_mul_takes_half_inputs<R: CubeRuntime>(device: &R::Device) {
    silu_mul_grid::<R>(device, DType::BF16, 1e-2);
    silu_mul_grid::<R>(device, DType::F16, 2e-3);
}

runtime_tests!(
    silu_mul_kernel_matches_the_definition;
    cuda: silu_mul_takes_half_inputs,
);
