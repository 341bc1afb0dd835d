//! The few-row products: the GEMV (scalar and vector forms), the GEMV of an RMSNorm's output
//! with the norm folded in, and several such projections of one input in one launch, against
//! f64 loops or, in half precision, the separate kernels whose roundings they reproduce.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, host, prim, rms_norm_expected, rounded, wrap};
use jamba_kernels::{gemv, norm};

/// Row counts up to the kernel's limit, sizes from one element to more than a cube's columns
/// and several slices of `k` (and a `k` that is not a whole number of slices), with and
/// without bias, the weight a column window of a wider matrix (strided) or a whole one whose
/// rows split into 16-byte vectors (the vector form, for up to four rows), and `x` a window of
/// wider rows. Inputs are rounded to `dtype` first, so the only error left is the f32
/// accumulation and the output's rounding to `dtype`.
fn gemv_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(7);
    let mut cases = 0;
    let mut forms = [0usize; 2];
    for &rows in &[1usize, 3, 4, 8, gemv::MAX_ROWS] {
        for &(k, n, window) in &[
            (1usize, 1usize, true),
            (5, 17, true),
            (64, 300, true),
            (1027, 4100, true),
            (3000, 40, true),
            (3, 8, false),
            (64, 256, false),
            (1027, 4096, false),
            (3000, 72, false),
        ] {
            for with_bias in [false, true] {
                let (extra_k, extra_n) = (2usize, if window { 3usize } else { 0 });
                let (x_full, x_host) = rounded::<R, 2>(
                    rng.normal(rows * (k + extra_k), 0.0, 1.0),
                    [rows, k + extra_k],
                    dtype,
                    device,
                );
                let (w_full, w_host) = rounded::<R, 2>(
                    rng.normal(k * (n + extra_n), 0.0, 1.0),
                    [k, n + extra_n],
                    dtype,
                    device,
                );
                let (b_full, b_host) = rounded::<R, 1>(rng.normal(n, 0.0, 1.0), [n], dtype, device);
                let x = x_full.slice([0..rows, extra_k..k + extra_k]);
                let w = w_full.slice([0..k, extra_n..n + extra_n]);
                let mut expected = Vec::with_capacity(rows * n);
                for r in 0..rows {
                    for o in 0..n {
                        let mut acc = if with_bias { b_host[o] as f64 } else { 0.0 };
                        for i in 0..k {
                            acc += x_host[r * (k + extra_k) + extra_k + i] as f64
                                * w_host[i * (n + extra_n) + extra_n + o] as f64;
                        }
                        expected.push(acc as f32);
                    }
                }
                let bias = with_bias.then(|| prim(b_full.clone()));
                // A whole weight of few rows takes the vector form; a window may too, where
                // Burn copied it to a fresh (aligned) buffer.
                let vector =
                    gemv::takes_vector_form(&prim(x.clone()), None, &prim(w.clone()), bias.as_ref());
                assert!(
                    if rows > gemv::NORMED_MAX_ROWS { !vector } else { vector || window },
                    "rows {rows} k {k} n {n}: vector form {vector}"
                );
                forms[usize::from(vector)] += 1;
                let y = gemv::gemv(prim(x), prim(w), bias);
                assert_eq!(y.meta.shape().as_slice(), [rows, n]);
                assert_close(
                    &format!("{dtype:?} gemv rows {rows} k {k} n {n} bias {with_bias}"),
                    &host::<R, 2>(y),
                    &expected,
                    tolerance,
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 90);
    assert!(forms.iter().all(|&n| n > 0), "cases per form (scalar, vector): {forms:?}");
}

/// The GEMV of an RMSNorm's output with the norm folded in (`gemv_normed`) against an f64 loop
/// of the definition (f32) or the separate norm then GEMV (half types, whose roundings the
/// separate kernels define): rows up to the kernel's limit, `k` from one element to more than a
/// cube's units and not a power of two, with and without a residual update (strided: a window
/// of wider rows) and a bias, the weight a column window or a whole one whose rows split into
/// 16-byte vectors (the vector form; `k` 2,000 at four rows is past its stage and takes the
/// scalar form).
fn gemv_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(8);
    let eps = 1e-6;
    let mut cases = 0;
    let mut forms = [0usize; 2];
    for rows in 1..=gemv::NORMED_MAX_ROWS {
        for &(k, n, window) in &[
            (1usize, 1usize, true),
            (5, 17, true),
            (1000, 300, true),
            (1027, 4100, true),
            (64, 65, true),
            (1, 8, false),
            (1024, 4096, false),
            (2000, 264, false),
        ] {
            for (with_update, with_bias) in [(false, false), (true, false), (true, true)] {
                let extra = 3usize;
                let skip = usize::from(window);
                let (x, x_host) = rounded::<R, 2>(rng.normal(rows * k, 0.3, 1.5), [rows, k], dtype, device);
                let (u_full, u_full_host) = rounded::<R, 2>(
                    rng.normal(rows * (k + extra), 0.0, 1.0),
                    [rows, k + extra],
                    dtype,
                    device,
                );
                let u = u_full.slice([0..rows, extra..k + extra]);
                let (nw, nw_host) = rounded::<R, 1>(rng.normal(k, 1.0, 0.3), [k], dtype, device);
                let (w_full, w_host) =
                    rounded::<R, 2>(rng.normal(k * (n + skip), 0.0, 1.0), [k, n + skip], dtype, device);
                let w = w_full.slice([0..k, skip..n + skip]);
                let (b, b_host) = rounded::<R, 1>(rng.normal(n, 0.0, 1.0), [n], dtype, device);
                let name = format!(
                    "{dtype:?} gemv_normed rows {rows} k {k} n {n} update {with_update} bias {with_bias}"
                );
                let pre = gemv::PreNorm {
                    update: with_update.then(|| prim(u.clone())),
                    weight: prim(nw.clone()),
                    eps,
                };
                let bias = with_bias.then(|| prim(b.clone()));
                let vector =
                    gemv::takes_vector_form(&prim(x.clone()), Some(&pre), &prim(w.clone()), bias.as_ref());
                let fits = rows * k.next_multiple_of(1024) <= 6144;
                assert!(if fits { vector || window } else { !vector }, "{name}: vector form {vector}");
                forms[usize::from(vector)] += 1;
                let ours = host::<R, 2>(gemv::gemv_normed(prim(x.clone()), pre, prim(w.clone()), bias));
                let expected = if dtype == DType::F32 {
                    let input: Vec<f32> = (0..rows * k)
                        .map(|i| {
                            let (r, j) = (i / k, i % k);
                            let update = u_full_host[r * (k + extra) + extra + j];
                            x_host[i] + if with_update { update } else { 0.0 }
                        })
                        .collect();
                    let normed = rms_norm_expected(&input, &nw_host, k, eps);
                    let mut expected = Vec::with_capacity(rows * n);
                    for r in 0..rows {
                        for o in 0..n {
                            let mut acc = if with_bias { b_host[o] as f64 } else { 0.0 };
                            for i in 0..k {
                                acc += normed[r * k + i] as f64 * w_host[i * (n + skip) + skip + o] as f64;
                            }
                            expected.push(acc as f32);
                        }
                    }
                    expected
                } else {
                    let x3 = prim(x.clone().reshape([1, rows, k]));
                    let normed = if with_update {
                        norm::add_rms_norm(x3, prim(u.clone().reshape([1, rows, k])), prim(nw.clone()), eps).1
                    } else {
                        norm::rms_norm(x3, prim(nw.clone()), eps)
                    };
                    let normed = wrap::<R, 3>(normed).reshape([rows, k]);
                    let y = gemv::gemv(prim(normed), prim(w.clone()), with_bias.then(|| prim(b.clone())));
                    host::<R, 2>(y)
                };
                assert_close(&name, &ours, &expected, tolerance);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, gemv::NORMED_MAX_ROWS * 24);
    assert!(forms.iter().all(|&n| n > 0), "cases per form (scalar, vector): {forms:?}");
}

/// Several normalised projections in one launch (`gemv_normed_many`, an attention layer's
/// q/k/v) against one `gemv_normed` per weight: one to three weights whose column vectors do
/// not fill the cubes, with and without a pending update, one to four rows. A weight whose
/// width is not a whole number of 16-byte vectors must be refused.
fn normed_many_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(9);
    let eps = 1e-6;
    let mut cases = 0usize;
    let width = 16 / dtype.size();
    for (k, outs) in [
        (64usize, vec![64usize, 16, 16]),
        (1024, vec![1024, 256, 256]),
        (96, vec![3 * width, 5 * width]),
        (40, vec![7 * width]),
        (64, vec![64, width + 2, 64]),
    ] {
        for rows in 1..=gemv::NORMED_MAX_ROWS {
            for with_pending in [false, true] {
                let t2 = |shape: [usize; 2], std: f64, rng: &mut Rng| {
                    rounded::<R, 2>(rng.normal(shape[0] * shape[1], 0.0, std), shape, dtype, device).0
                };
                let x = t2([rows, k], 1.0, &mut rng);
                let pending = t2([rows, k], 1.0, &mut rng);
                let norm_w = t2([1, k], 0.3, &mut rng).add_scalar(1.0).reshape([k]);
                let ws: Vec<Tensor<K<R>, 2>> = outs.iter().map(|&n| t2([k, n], 0.2, &mut rng)).collect();
                let name = format!(
                    "{dtype:?} gemv_normed_many: {rows} rows, k {k}, outputs {outs:?}, pending {with_pending}"
                );
                let pre = || gemv::PreNorm {
                    update: with_pending.then(|| prim(pending.clone())),
                    weight: prim(norm_w.clone()),
                    eps,
                };
                let ys = gemv::gemv_normed_many(prim(x.clone()), pre(), ws.iter().cloned().map(prim).collect());
                let whole = outs.iter().all(|n| n % width == 0);
                assert_eq!(ys.is_some(), whole, "{name}: one launch ran: {}", ys.is_some());
                let Some(ys) = ys else { continue };
                assert_eq!(ys.len(), ws.len(), "{name}");
                for (i, (y, w)) in ys.into_iter().zip(ws).enumerate() {
                    let want = gemv::gemv_normed(prim(x.clone()), pre(), prim(w), None);
                    assert_close(&format!("{name}, weight {i}"), &host::<R, 2>(y), &host::<R, 2>(want), tolerance);
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 4 * gemv::NORMED_MAX_ROWS * 2, "cases in one launch");
}

fn gemv_kernel_matches_the_definition_over_the_grid<R: CubeRuntime>(device: &R::Device) {
    gemv_grid::<R>(device, DType::F32, 1e-6);
}

fn normed_gemv_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    gemv_normed_grid::<R>(device, DType::F32, 1e-5);
}

fn normed_projections_in_one_launch_match_one_launch_per_weight<R: CubeRuntime>(device: &R::Device) {
    normed_many_grid::<R>(device, DType::F32, 1e-5);
}

/// bf16 and f16 operands (f32 accumulation): the output's rounding to the half type (unit
/// roundoff 3.9e-3 for bf16, 4.9e-4 for f16); the folded forms against the separate kernels.
fn gemv_kernels_take_half_inputs<R: CubeRuntime>(device: &R::Device) {
    gemv_grid::<R>(device, DType::BF16, 4e-3);
    gemv_grid::<R>(device, DType::F16, 5e-4);
    gemv_normed_grid::<R>(device, DType::BF16, 8e-3);
    gemv_normed_grid::<R>(device, DType::F16, 1e-3);
    normed_many_grid::<R>(device, DType::BF16, 2e-2);
    normed_many_grid::<R>(device, DType::F16, 3e-3);
}

runtime_tests!(
    gemv_kernel_matches_the_definition_over_the_grid,
    normed_gemv_matches_the_definition,
    normed_projections_in_one_launch_match_one_launch_per_weight;
    cuda: gemv_kernels_take_half_inputs,
);
