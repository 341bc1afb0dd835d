//! The dense SwiGLU MLP of a few rows on the expert kernels, and the same with the residual
//! sums and the RMSNorm before it folded into its first launch.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, host, prim, rounded, wrap};
use jamba_kernels::{gemv, mlp, moe, norm};

/// `down(silu(x · gate) · (x · up))` of each row in f64.
fn swiglu_expected(x: &[f32], [gate, up, down]: [&[f32]; 3], [rows, hidden, inner]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0f32; rows * hidden];
    for r in 0..rows {
        let xr = &x[r * hidden..(r + 1) * hidden];
        let act: Vec<f64> = (0..inner)
            .map(|o| {
                let (mut a, mut b) = (0f64, 0f64);
                for (i, &xv) in xr.iter().enumerate() {
                    a += xv as f64 * gate[i * inner + o] as f64;
                    b += xv as f64 * up[i * inner + o] as f64;
                }
                a / (1.0 + (-a).exp()) * b
            })
            .collect();
        for o in 0..hidden {
            out[r * hidden + o] = (0..inner).map(|i| act[i] * down[i * hidden + o] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// Widths that are not multiples of the kernels' 32 columns, one row to the most the kernels
/// take; the vector form where the widths split into 16-byte vectors and the rows are at most
/// four, the partial sums otherwise. Inputs rounded to `dtype`: the f64 result of the rounded
/// values, within the kernel's roundings of each product, the SiLU and their product.
fn swiglu_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(15);
    let mut forms = [0usize; 2];
    // (64, 256): rows CUDA's allocator does not pad in half precision either (128 and 512 bytes).
    for &(hidden, inner) in &[(24usize, 72usize), (100, 300), (512, 1408), (7, 5), (64, 256)] {
        let scale = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        let (gate, gate_h) = rounded::<R, 2>(rng.normal(hidden * inner, 0.0, scale(hidden)), [hidden, inner], dtype, device);
        let (up, up_h) = rounded::<R, 2>(rng.normal(hidden * inner, 0.0, scale(hidden)), [hidden, inner], dtype, device);
        let (down, down_h) = rounded::<R, 2>(rng.normal(inner * hidden, 0.0, scale(inner)), [inner, hidden], dtype, device);
        for rows in [1usize, 3, moe::MAX_SLOTS] {
            let name = format!("{dtype:?} swiglu hidden {hidden} inner {inner} rows {rows}");
            let (x, x_h) = rounded::<R, 2>(rng.normal(rows * hidden, 0.0, 1.0), [rows, hidden], dtype, device);
            let y_buf = Tensor::<K<R>, 2>::empty([rows, hidden], (device, dtype));
            let vector = moe::takes_vector_form(
                &prim(x.clone()),
                [&prim(gate.clone()), &prim(up.clone()), &prim(down.clone())],
                &prim(y_buf),
                true,
            );
            forms[usize::from(vector)] += 1;
            let y = mlp::swiglu(prim(x), prim(gate.clone()), prim(up.clone()), prim(down.clone()));
            let expected = swiglu_expected(&x_h, [&gate_h, &up_h, &down_h], [rows, hidden, inner]);
            assert_close(&name, &host::<R, 2>(y), &expected, tolerance);
        }
    }
    assert!(forms.iter().all(|&n| n > 0), "cases per form (partial sums, vector): {forms:?}");
}

/// `swiglu_normed` against the separate kernels (the residual norm, then `swiglu`), with and
/// without the first update, one to four rows: the residual exactly, the output to the
/// summation order. Widths whose rows CUDA's allocator pads and rows too wide for the staged
/// norm must be refused (`None`), and the fused form must run somewhere.
fn mlp_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(16);
    let eps = 1e-6;
    let (mut fused, mut refused) = (0usize, 0usize);
    for &(hidden, inner) in &[(64usize, 256usize), (1024, 512), (40, 96), (2048, 64)] {
        for rows in 1..=gemv::NORMED_MAX_ROWS {
            for with_first in [false, true] {
                let mut t2 = |shape: [usize; 2], std: f64| {
                    rounded::<R, 2>(rng.normal(shape[0] * shape[1], 0.0, std), shape, dtype, device).0
                };
                let x = t2([rows, hidden], 1.0);
                let first = t2([rows, hidden], 1.0);
                let second = t2([rows, hidden], 1.0);
                let norm_w = t2([1, hidden], 0.3).add_scalar(1.0).reshape([hidden]);
                let gate = t2([hidden, inner], 0.2);
                let up = t2([hidden, inner], 0.2);
                let down = t2([inner, hidden], 0.2);
                let name = format!("{dtype:?} swiglu_normed: {rows} rows, {hidden} x {inner}, first {with_first}");
                let takes = mlp::takes_normed_mlp(
                    &prim(x.clone()),
                    [&prim(gate.clone()), &prim(up.clone()), &prim(down.clone())],
                    &prim(Tensor::<K<R>, 2>::empty([rows, hidden], (device, dtype))),
                );
                let out = mlp::swiglu_normed(
                    moe::ResidualNorm {
                        x: prim(x.clone()),
                        first: with_first.then(|| prim(first.clone())),
                        second: prim(second.clone()),
                        norm: prim(norm_w.clone()),
                        eps,
                    },
                    prim(gate.clone()),
                    prim(up.clone()),
                    prim(down.clone()),
                );
                assert_eq!(out.is_some(), takes, "{name}: fused form ran: {}", out.is_some());
                let Some((residual, y)) = out else {
                    refused += 1;
                    continue;
                };
                fused += 1;
                let x3 = |t: Tensor<K<R>, 2>| prim(t.reshape([1, rows, hidden]));
                let (res_want, normed) = if with_first {
                    norm::add2_rms_norm(x3(x), x3(first), x3(second), prim(norm_w), eps)
                } else {
                    norm::add_rms_norm(x3(x), x3(second), prim(norm_w), eps)
                };
                let normed = wrap::<R, 3>(normed).reshape([rows, hidden]);
                let y_want = mlp::swiglu(prim(normed), prim(gate), prim(up), prim(down));
                assert_close(&format!("{name}, residual"), &host::<R, 2>(residual), &host::<R, 3>(res_want), 0.0);
                assert_close(&format!("{name}, output"), &host::<R, 2>(y), &host::<R, 2>(y_want), tolerance);
            }
        }
    }
    assert!(fused > 0 && refused > 0, "cases fused {fused}, refused {refused}");
}

fn swiglu_kernels_match_the_definition<R: CubeRuntime>(device: &R::Device) {
    swiglu_grid::<R>(device, DType::F32, 1e-5);
}

fn normed_mlp_matches_the_separate_kernels<R: CubeRuntime>(device: &R::Device) {
    mlp_normed_grid::<R>(device, DType::F32, 1e-5);
}

/// bf16 and f16: the kernel rounds each product, the SiLU and their product (a few unit
/// roundoffs: bf16's is 3.9e-3, f16's 4.9e-4).
fn mlp_kernels_take_half_inputs<R: CubeRuntime>(device: &R::Device) {
    swiglu_grid::<R>(device, DType::BF16, 3e-2);
    swiglu_grid::<R>(device, DType::F16, 4e-3);
    mlp_normed_grid::<R>(device, DType::BF16, 2e-2);
    mlp_normed_grid::<R>(device, DType::F16, 3e-3);
}

runtime_tests!(
    swiglu_kernels_match_the_definition,
    normed_mlp_matches_the_separate_kernels;
    cuda: mlp_kernels_take_half_inputs,
);
