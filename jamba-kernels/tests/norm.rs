//! The RMSNorm kernels (alone, after one residual addition, after two) against an f64 loop.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, host, poisoned, prim, rms_norm_expected};
use jamba_kernels::norm;

/// Widths from 1 to 4096 (one unit per element up to many elements per unit), rows of one and
/// many, and a strided view (a column window of a wider tensor, as the Mamba mixer's
/// `dt`/`B`/`C` slices are); then the residual forms on the same window.
fn rms_norm_kernel_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(5);
    for &(batch, seq, width, extra) in &[
        (1usize, 1usize, 1usize, 0usize),
        (2, 3, 16, 0),
        (1, 5, 64, 3),
        (3, 7, 1000, 0),
        (2, 2, 4096, 0),
        (1, 300, 37, 5),
        (4, 1, 257, 1),
    ] {
        let eps = 1e-6;
        let full = width + extra;
        let x = rng.normal(batch * seq * full, 0.3, 2.0);
        let weight = rng.normal(width, 1.0, 0.5);
        let x_t =
            Tensor::<K<R>, 3>::from_data(TensorData::new(x.clone(), [batch, seq, full]), device)
                .slice([0..batch, 0..seq, extra..full]);
        let window: Vec<f32> = x
            .chunks_exact(full)
            .flat_map(|r| r[extra..].to_vec())
            .collect();
        let w_t = Tensor::<K<R>, 1>::from_data(TensorData::new(weight.clone(), [width]), device);
        let out = poisoned::<R, 3>([batch, seq, width], DType::F32, device);
        norm::rms_norm_into(prim(x_t.clone()), prim(w_t.clone()), eps, out.clone());
        let tag = format!("rms_norm batch {batch} seq {seq} width {width} offset {extra}");
        assert_close(
            &tag,
            &host::<R, 3>(out),
            &rms_norm_expected(&window, &weight, width, eps),
            1e-5,
        );
        // The residual form: x (the strided window) plus a fresh update, then the norm.
        let update = rng.normal(batch * seq * width, 0.0, 1.0);
        let t3 = |v: &Vec<f32>| {
            Tensor::<K<R>, 3>::from_data(TensorData::new(v.clone(), [batch, seq, width]), device)
        };
        let (sum, normed) =
            norm::add_rms_norm(prim(x_t.clone()), prim(t3(&update)), prim(w_t.clone()), eps);
        let sum_want: Vec<f32> = window.iter().zip(&update).map(|(a, b)| a + b).collect();
        assert_close(&format!("{tag}, residual sum"), &host::<R, 3>(sum), &sum_want, 0.0);
        assert_close(
            &format!("{tag}, norm of the residual sum"),
            &host::<R, 3>(normed),
            &rms_norm_expected(&sum_want, &weight, width, eps),
            1e-5,
        );
        // Two updates: (x + update) + second, each sum rounded (f32 here, so exact).
        let second = rng.normal(batch * seq * width, 0.0, 1.0);
        let (sum2, normed2) =
            norm::add2_rms_norm(prim(x_t), prim(t3(&update)), prim(t3(&second)), prim(w_t), eps);
        let sum2_want: Vec<f32> = sum_want.iter().zip(&second).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("{tag}, two-update residual sum"),
            &host::<R, 3>(sum2),
            &sum2_want,
            0.0,
        );
        assert_close(
            &format!("{tag}, norm of the two-update residual sum"),
            &host::<R, 3>(normed2),
            &rms_norm_expected(&sum2_want, &weight, width, eps),
            1e-5,
        );
    }
}

/// Half-precision inputs against the f32 kernel on the same rounded values, its output rounded
/// once: the half kernel rounds the normalised value and its product with the weight, so two
/// roundings apart at most (bf16's unit roundoff is 3.9e-3, f16's 4.9e-4).
fn rms_norm_kernel_takes_half_inputs<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(6);
    for (dtype, tolerance) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for &(batch, seq, width) in &[(1usize, 1usize, 1024usize), (2, 33, 16), (3, 5, 2048)] {
            let x = Tensor::<K<R>, 3>::from_data(
                TensorData::new(rng.normal(batch * seq * width, 0.0, 1.5), [batch, seq, width]),
                device,
            )
            .cast(dtype);
            let w = Tensor::<K<R>, 1>::from_data(
                TensorData::new(rng.normal(width, 1.0, 0.5), [width]),
                device,
            )
            .cast(dtype);
            let half = host::<R, 3>(norm::rms_norm(prim(x.clone()), prim(w.clone()), 1e-6));
            let full = norm::rms_norm(prim(x.cast(DType::F32)), prim(w.cast(DType::F32)), 1e-6);
            let full = common::to_vec(common::wrap::<R, 3>(full).cast(dtype));
            assert_close(
                &format!("{dtype:?} rms_norm {batch}x{seq}x{width}"),
                &half,
                &full,
                tolerance,
            );
        }
    }
}

runtime_tests!(
    rms_norm_kernel_matches_the_definition;
    cuda: rms_norm_kernel_takes_half_inputs,
);
