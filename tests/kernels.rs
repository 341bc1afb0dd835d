//! The CubeCL kernels of `jamba-kernels` against an f64 host loop (the definition) and against
//! the tensor-op path, on fresh random inputs, with output buffers poisoned with NaN first so
//! that an element the kernel forgets to write fails the test. Runs on every compiled CubeCL
//! backend (wgpu in CI on Mesa's software Vulkan; CUDA on the H200).
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use common::scan_problem::{Problem, Rng};
use jamba::burn_cubecl::{CubeBackend, CubeRuntime, tensor::CubeTensor};
use jamba::generation::SplitMix64;
use jamba::kernels::{conv, gemv, moe, norm, scan};
use jamba::ops::{ConvInput, JambaBackend, causal_conv1d_tensor_ops, cube, rms_norm_tensor_ops};
use jamba::reference::{rel_err, to_vec};

type K<R> = CubeBackend<R, f32, i32, u32>;

fn prim<R: CubeRuntime, const D: usize>(t: Tensor<K<R>, D>) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

fn wrap<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Tensor<K<R>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A tensor of NaN: what an output buffer holds before the kernel writes it.
fn poisoned<R: CubeRuntime, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    device: &R::Device,
) -> CubeTensor<R> {
    prim(Tensor::<K<R>, D>::full(shape, f32::NAN, (device, dtype)))
}

fn assert_close(name: &str, ours: &[f32], expected: &[f32], tolerance: f64) {
    let err = rel_err(ours, expected);
    assert!(
        err <= tolerance && ours.iter().all(|x| x.is_finite()),
        "{name}: rel. error {err:.3e} (tolerance {tolerance:.0e}); {} non-finite",
        ours.iter().filter(|x| !x.is_finite()).count()
    );
}

/// Runs the scan kernel on `p` with its per-step inputs in `dtype` (the expectation is computed
/// from the same rounded values) and checks `y` and the final state.
fn check_scan<R: CubeRuntime>(
    name: &str,
    p: &mut Problem,
    dtype: DType,
    tolerance_y: f64,
    device: &R::Device,
) {
    let mut input = p.input::<K<R>>(device);
    if dtype != DType::F32 {
        // Round the per-step inputs to the half type, and make the host copy agree.
        let round = |t: Tensor<K<R>, 3>, host: &mut Vec<f32>| {
            let t = t.cast(dtype);
            *host = to_vec(t.clone().cast(DType::F32));
            t
        };
        input.u = round(input.u, &mut p.u);
        input.delta = round(input.delta, &mut p.delta);
        input.b = round(input.b, &mut p.b);
        input.c = round(input.c, &mut p.c);
        if let (Some(z), Some(host)) = (input.z.take(), p.z.as_mut()) {
            input.z = Some(round(z, host));
        }
    }
    let expected = p.expected();
    // The default plan; the tiled kernel with every number of state indices per unit that
    // divides the state size (the default picks more than one only for large problems); the
    // chunked kernel with one chunk, with chunks that do not divide the length, and with more
    // chunks than steps.
    let mut plans = vec![None];
    for spu in [1usize, 2, 4] {
        if p.state % spu == 0 {
            plans.push(Some(scan::ScanPlan::Tiled(
                scan::ScanGeometry::with_states_per_unit(p.state, spu),
            )));
        }
    }
    if jamba::kernels::scan_chunked::supports_state(p.state) {
        for chunks in [1usize, 3, 8] {
            plans.push(Some(scan::ScanPlan::Chunked { chunks }));
        }
    }
    for plan in plans {
        let y = poisoned::<R, 3>([p.batch, p.seq, p.channels], dtype, device);
        let h = poisoned::<R, 3>([p.batch, p.channels, p.state], DType::F32, device);
        let tensors = cube::scan_tensors(input.clone());
        match plan {
            None => scan::selective_scan_fwd_into(tensors, y.clone(), h.clone()),
            Some(plan) => scan::selective_scan_fwd_with(tensors, y.clone(), h.clone(), plan),
        }
        let y = to_vec(wrap::<R, 3>(y).cast(DType::F32));
        let h = to_vec(wrap::<R, 3>(h));
        let tag = format!("{name}, plan {plan:?}");
        assert_close(&format!("{tag}: y"), &y, &expected.0, tolerance_y);
        assert_close(&format!("{tag}: state"), &h, &expected.1, 1e-5);
    }
}

/// The scan over the grid: every sequence length, batch 1..4, channel counts that are
/// not multiples of the cube's channel block, d_state 1..64 (and 256, the maximum), every
/// combination of D, z, Δ bias and initial state on the short sequences.
fn scan_grid<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let shapes = [
        (1usize, 3usize, 1usize),
        (2, 37, 4),
        (3, 19, 16),
        (4, 5, 64),
    ];
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 1000, 5000] {
        for &(batch, channels, state) in &shapes {
            for options in 0..16u8 {
                if seq > 64 && ![0u8, 5, 10, 15].contains(&options) {
                    continue;
                }
                if seq == 5000 && state == 64 && options != 15 {
                    continue; // keeps the f64 loop and the software rasteriser quick
                }
                let with = [0, 1, 2, 3].map(|bit| options & (1 << bit) != 0);
                let mut p = Problem::random(&mut rng, batch, seq, channels, state, with);
                let tag = format!(
                    "seq {seq} batch {batch} channels {channels} state {state} D/z/bias/h0 {with:?}"
                );
                check_scan::<R>(&tag, &mut p, DType::F32, 1e-5, device);
                cases += 1;
            }
        }
    }
    let mut p = Problem::random(&mut rng, 2, 7, 3, 256, [true; 4]);
    check_scan::<R>("state 256", &mut p, DType::F32, 1e-5, device);
    assert!(cases > 250, "{cases} cases");
}

/// The kernel behind `JambaBackend::selective_scan` agrees with the tensor-op path on the same
/// device, and accepts strided views (the model passes slices of a projection).
fn scan_matches_tensor_ops<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let p = Problem::random(&mut rng, 2, 70, 24, 16, [true; 4]);
    let ours = K::<R>::selective_scan(p.input(device));
    let theirs = jamba::scan::selective_scan_reference(p.input::<K<R>>(device));
    assert_close(
        "kernel vs tensor ops: y",
        &to_vec(ours.y),
        &to_vec(theirs.y),
        1e-5,
    );
    assert_close(
        "kernel vs tensor ops: state",
        &to_vec(ours.state),
        &to_vec(theirs.state),
        1e-5,
    );

    // z as a strided slice of a wider tensor, as in the mixer.
    let mut input = p.input::<K<R>>(device);
    let z = input.z.take().unwrap();
    let wide = Tensor::cat(vec![z.clone(), z.clone() * 3.0], 2);
    input.z = Some(wide.slice([0..2, 0..70, 0..24]));
    let strided = K::<R>::selective_scan(input);
    assert_close(
        "strided z",
        &to_vec(strided.y),
        &to_vec(K::<R>::selective_scan(p.input(device)).y),
        0.0,
    );
}

/// The convolution as a host loop in f64.
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

fn conv_grid<R: CubeRuntime>(device: &R::Device) {
    let mut seed = SplitMix64::new(common::fresh_seed());
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
                let draw = |n: usize, seed: &mut SplitMix64| -> Vec<f32> {
                    (0..n)
                        .map(|_| (seed.next_f64() * 4.0 - 2.0) as f32)
                        .collect()
                };
                let x = draw(batch * seq * channels, &mut seed);
                let weight = draw(channels * k, &mut seed);
                let bias = with_bias.then(|| draw(channels, &mut seed));
                let prefix = if with_prefix {
                    draw(batch * (k - 1) * channels, &mut seed)
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
                    Tensor::<K<R>, 3>::from_data(TensorData::new(v.clone(), s), device)
                };
                // The kernel reads the weight at its strides: also through a transposed view.
                let weight_tensor = if strided_weight {
                    let t: Vec<f32> = (0..k * channels)
                        .map(|i| weight[(i % channels) * k + i / channels])
                        .collect();
                    Tensor::<K<R>, 2>::from_data(TensorData::new(t, [k, channels]), device)
                        .transpose()
                } else {
                    Tensor::from_data(TensorData::new(weight.clone(), [channels, k]), device)
                };
                let contiguous_weight =
                    Tensor::<K<R>, 2>::from_data(TensorData::new(weight, [channels, k]), device);
                let input = ConvInput {
                    x: t3(&x, [batch, seq, channels]),
                    weight: weight_tensor,
                    bias: bias.map(|b| Tensor::from_data(TensorData::new(b, [channels]), device)),
                    prefix: with_prefix.then(|| t3(&prefix, [batch, k - 1, channels])),
                    silu,
                };
                let tag = format!(
                    "conv seq {seq} batch {batch} channels {channels} k {k} \
                     bias/prefix/silu/strided weight {:?}",
                    (with_bias, with_prefix, silu, strided_weight)
                );
                let y = poisoned::<R, 3>([batch, seq, channels], DType::F32, device);
                let s = poisoned::<R, 3>([batch, k - 1, channels], DType::F32, device);
                conv::causal_conv1d_into(cube::conv_tensors(input.clone()), y.clone(), s.clone());
                let (y, s) = (to_vec(wrap::<R, 3>(y)), to_vec(wrap::<R, 3>(s)));
                assert_close(&format!("{tag}: y"), &y, &expected.0, 1e-5);
                assert_close(&format!("{tag}: state"), &s, &expected.1, 0.0);
                // The tensor-op form on the contiguous weight: on the H200 it gave a wrong result
                // (rel. error 11) for a transposed weight (2 × 300, k = 2) where the kernel
                // matched the definition above; Burn's slice-then-reshape of a column of a
                // strided view is the suspect, not investigated (session 21).
                let reference = causal_conv1d_tensor_ops(ConvInput {
                    weight: contiguous_weight,
                    ..input
                });
                assert_close(
                    &format!("{tag}: vs tensor ops"),
                    &y,
                    &to_vec(reference.y),
                    1e-5,
                );
                cases += 1;
            }
        }
    }
    assert!(cases >= 240);
}

/// RMSNorm as a host loop in f64 (the f32 kernel's only rounding is its f32 arithmetic).
fn rms_norm_expected(x: &[f32], weight: &[f32], width: usize, eps: f64) -> Vec<f32> {
    x.chunks_exact(width)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
            let scale = 1.0 / (mean + eps).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| (v as f64 * scale * w as f64) as f32)
        })
        .collect()
}

/// The fused RMSNorm over widths from 1 to 4096 (one unit per element up to many elements per
/// unit), rows of one and many, and a strided view (a column window of a wider tensor, as the
/// Mamba mixer's `dt`/`B`/`C` slices are).
fn rms_norm_grid<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
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
        let ours = to_vec(wrap::<R, 3>(out));
        let tag = format!("rms_norm batch {batch} seq {seq} width {width} offset {extra}");
        assert_close(
            &tag,
            &ours,
            &rms_norm_expected(&window, &weight, width, eps),
            1e-5,
        );
        let reference = rms_norm_tensor_ops(x_t.clone(), w_t.clone(), eps);
        assert_close(
            &format!("{tag} vs tensor ops"),
            &ours,
            &to_vec(reference),
            1e-5,
        );
        // The residual form: x (the strided window) plus a fresh update, then the norm.
        let update = rng.normal(batch * seq * width, 0.0, 1.0);
        let u_t = Tensor::<K<R>, 3>::from_data(
            TensorData::new(update.clone(), [batch, seq, width]),
            device,
        );
        let (sum, normed) =
            norm::add_rms_norm(prim(x_t.clone()), prim(u_t.clone()), prim(w_t.clone()), eps);
        let sum_want: Vec<f32> = window.iter().zip(&update).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("{tag}, residual sum"),
            &to_vec(wrap::<R, 3>(sum)),
            &sum_want,
            0.0,
        );
        assert_close(
            &format!("{tag}, norm of the residual sum"),
            &to_vec(wrap::<R, 3>(normed)),
            &rms_norm_expected(&sum_want, &weight, width, eps),
            1e-5,
        );
        // Two updates: (x + update) + second, each sum rounded (f32 here, so exact).
        let second = rng.normal(batch * seq * width, 0.0, 1.0);
        let s_t = Tensor::<K<R>, 3>::from_data(
            TensorData::new(second.clone(), [batch, seq, width]),
            device,
        );
        let (sum2, normed2) = norm::add2_rms_norm(prim(x_t), prim(u_t), prim(s_t), prim(w_t), eps);
        let sum2_want: Vec<f32> = sum_want.iter().zip(&second).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("{tag}, two-update residual sum"),
            &to_vec(wrap::<R, 3>(sum2)),
            &sum2_want,
            0.0,
        );
        assert_close(
            &format!("{tag}, norm of the two-update residual sum"),
            &to_vec(wrap::<R, 3>(normed2)),
            &rms_norm_expected(&sum2_want, &weight, width, eps),
            1e-5,
        );
    }
}

/// The few-row product against an f64 loop: row counts up to the kernel's limit, sizes from one
/// element to more than a cube's columns and several slices of `k` (and a `k` that is not a
/// whole number of slices), with and without bias, the weight a column window of a wider matrix
/// (strided) or a whole one whose rows split into 16-byte vectors (the vector form, for up to
/// four rows), and `x` a window of wider rows. Inputs are rounded to `dtype` first, so the only
/// error left is the f32 accumulation and the output's rounding to `dtype`.
fn gemv_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
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
                let round = |v: Vec<f32>, shape: [usize; 2]| {
                    let t =
                        Tensor::<K<R>, 2>::from_data(TensorData::new(v, shape), device).cast(dtype);
                    let host = to_vec(t.clone().cast(DType::F32));
                    (t, host)
                };
                let (x_full, x_host) = round(
                    rng.normal(rows * (k + extra_k), 0.0, 1.0),
                    [rows, k + extra_k],
                );
                let (w_full, w_host) =
                    round(rng.normal(k * (n + extra_n), 0.0, 1.0), [k, n + extra_n]);
                let (b_full, b_host) = round(rng.normal(n, 0.0, 1.0), [1, n]);
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
                let bias = with_bias.then(|| prim(b_full.clone().reshape([n])));
                // A whole weight of few rows takes the vector form; a window may too, where
                // Burn copied it to a fresh (aligned) buffer.
                let vector = gemv::takes_vector_form(
                    &prim(x.clone()),
                    None,
                    &prim(w.clone()),
                    bias.as_ref(),
                );
                assert!(
                    if rows > gemv::NORMED_MAX_ROWS {
                        !vector
                    } else {
                        vector || window
                    },
                    "rows {rows} k {k} n {n}: vector form {vector}"
                );
                forms[usize::from(vector)] += 1;
                for (form, run) in [
                    ("single", gemv::gemv_single::<R> as fn(_, _, _) -> _),
                    ("split", gemv::gemv_split::<R>),
                ] {
                    let bias = with_bias.then(|| prim(b_full.clone().reshape([n])));
                    let y = wrap::<R, 2>(run(prim(x.clone()), prim(w.clone()), bias));
                    assert_eq!(y.dims(), [rows, n]);
                    assert_close(
                        &format!(
                            "{dtype:?} gemv ({form}) rows {rows} k {k} n {n} bias {with_bias}"
                        ),
                        &to_vec(y.cast(DType::F32)),
                        &expected,
                        tolerance,
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 180);
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (scalar, vector): {forms:?}"
    );
}

/// The GEMV of an RMSNorm's output with the norm folded in (`gemv_normed`) against an f64 loop
/// of the definition (f32) or the separate norm then GEMV on the same device (half types, whose
/// roundings the separate kernels define): rows up to the kernel's limit, `k` from one element
/// to more than a cube's units and not a power of two, with and without a residual update
/// (strided: a window of wider rows) and a bias, the weight a column window or a whole one
/// whose rows split into 16-byte vectors (the vector form; `k` 2,000 at four rows is past its
/// stage and takes the scalar form).
fn gemv_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
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
                let round = |v: Vec<f32>, shape: [usize; 2]| {
                    let t =
                        Tensor::<K<R>, 2>::from_data(TensorData::new(v, shape), device).cast(dtype);
                    let host = to_vec(t.clone().cast(DType::F32));
                    (t, host)
                };
                let (x, x_host) = round(rng.normal(rows * k, 0.3, 1.5), [rows, k]);
                let (u_full, u_full_host) =
                    round(rng.normal(rows * (k + extra), 0.0, 1.0), [rows, k + extra]);
                let u = u_full.slice([0..rows, extra..k + extra]);
                let (nw, nw_host) = round(rng.normal(k, 1.0, 0.3), [1, k]);
                let (w_full, w_host) = round(rng.normal(k * (n + skip), 0.0, 1.0), [k, n + skip]);
                let w = w_full.slice([0..k, skip..n + skip]);
                let (b, b_host) = round(rng.normal(n, 0.0, 1.0), [1, n]);
                let name = format!(
                    "{dtype:?} gemv_normed rows {rows} k {k} n {n} update {with_update} bias {with_bias}"
                );
                let pre = gemv::PreNorm {
                    update: with_update.then(|| prim(u.clone())),
                    weight: prim(nw.clone().reshape([k])),
                    eps,
                };
                let bias = with_bias.then(|| prim(b.clone().reshape([n])));
                // A whole weight takes the vector form where the rows fit its stage; a window
                // may too, where Burn copied it to a fresh (aligned) buffer.
                let vector = gemv::takes_vector_form(
                    &prim(x.clone()),
                    Some(&pre),
                    &prim(w.clone()),
                    bias.as_ref(),
                );
                let fits = rows * k.next_multiple_of(1024) <= 6144;
                assert!(
                    if fits { vector || window } else { !vector },
                    "{name}: vector form {vector}"
                );
                forms[usize::from(vector)] += 1;
                let y = wrap::<R, 2>(gemv::gemv_normed(
                    prim(x.clone()),
                    pre,
                    prim(w.clone()),
                    bias,
                ));
                assert_eq!(y.dims(), [rows, n]);
                let ours = to_vec(y.cast(DType::F32));
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
                                acc += normed[r * k + i] as f64
                                    * w_host[i * (n + skip) + skip + o] as f64;
                            }
                            expected.push(acc as f32);
                        }
                    }
                    expected
                } else {
                    let x3 = x.clone().reshape([1, rows, k]);
                    let weight = prim(nw.clone().reshape([k]));
                    let normed = if with_update {
                        norm::add_rms_norm(
                            prim(x3),
                            prim(u.clone().reshape([1, rows, k])),
                            weight,
                            eps,
                        )
                        .1
                    } else {
                        norm::rms_norm(prim(x3), weight, eps)
                    };
                    let normed = wrap::<R, 3>(normed).reshape([rows, k]);
                    let y = gemv::gemv_single(
                        prim(normed),
                        prim(w.clone()),
                        with_bias.then(|| prim(b.clone().reshape([n]))),
                    );
                    to_vec(wrap::<R, 2>(y).cast(DType::F32))
                };
                assert_close(&name, &ours, &expected, tolerance);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, gemv::NORMED_MAX_ROWS * 24);
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (scalar, vector): {forms:?}"
    );
}

/// A MoE layer's fused input side (`routed_experts_normed`: the residual sums, the norm, the
/// router and the routing in one launch, then the experts) against the separate kernels on the
/// same device (the residual norm, the router's GEMV, `routed_experts`), with and without the
/// first update: tokens one to the slot limit, 4 to 64 experts, widths not multiples of a
/// cube's units.
fn routed_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let eps = 1e-6;
    for &[tokens, experts, top_k, hidden, inner] in &[
        [1usize, 16, 2, 1000, 72],
        [1, 4, 1, 24, 40],
        [3, 8, 2, 300, 64],
        [moe::MAX_SLOTS / 2, 64, 2, 96, 33],
    ] {
        for with_first in [false, true] {
            let tensor = |len: usize, std: f64, rng: &mut Rng| {
                Tensor::<K<R>, 1>::from_data(
                    TensorData::new(rng.normal(len, 0.0, std), [len]),
                    device,
                )
                .cast(dtype)
            };
            let x = tensor(tokens * hidden, 1.0, &mut rng).reshape([tokens, hidden]);
            let first = tensor(tokens * hidden, 1.0, &mut rng).reshape([tokens, hidden]);
            let second = tensor(tokens * hidden, 1.0, &mut rng).reshape([tokens, hidden]);
            let norm_w = tensor(hidden, 0.3, &mut rng).add_scalar(1.0);
            let router = tensor(hidden * experts, 1.0, &mut rng).reshape([hidden, experts]);
            let weights = moe::ExpertWeights {
                gate: prim(
                    tensor(experts * hidden * inner, 0.2, &mut rng)
                        .reshape([experts, hidden, inner]),
                ),
                up: prim(
                    tensor(experts * hidden * inner, 0.2, &mut rng)
                        .reshape([experts, hidden, inner]),
                ),
                down: prim(
                    tensor(experts * inner * hidden, 0.2, &mut rng)
                        .reshape([experts, inner, hidden]),
                ),
            };
            let name = format!(
                "{dtype:?} routed_experts_normed: {tokens} tokens, top {top_k} of {experts}, \
                 {hidden} x {inner}, first update {with_first}"
            );
            assert!(
                moe::supports_normed_routing(tokens, hidden, experts, top_k),
                "{name}"
            );
            let out = moe::routed_experts_normed(
                moe::NormedRouting {
                    sum: moe::ResidualNorm {
                        x: prim(x.clone()),
                        first: with_first.then(|| prim(first.clone())),
                        second: prim(second.clone()),
                        norm: prim(norm_w.clone()),
                        eps,
                    },
                    router: prim(router.clone()),
                },
                weights.clone(),
                top_k,
            );
            let x3 = |t: Tensor<K<R>, 2>| prim(t.reshape([1, tokens, hidden]));
            let (residual, normed) = if with_first {
                norm::add2_rms_norm(x3(x), x3(first), x3(second), prim(norm_w), eps)
            } else {
                norm::add_rms_norm(x3(x), x3(second), prim(norm_w), eps)
            };
            let normed = wrap::<R, 3>(normed).reshape([tokens, hidden]);
            // The router's GEMV over blocks of at most its row limit.
            let logits = prim(Tensor::cat(
                (0..tokens)
                    .step_by(gemv::MAX_ROWS)
                    .map(|start| {
                        let rows = normed
                            .clone()
                            .slice([start..tokens.min(start + gemv::MAX_ROWS)]);
                        wrap::<R, 2>(gemv::gemv_single(prim(rows), prim(router.clone()), None))
                    })
                    .collect(),
                0,
            ));
            let y = moe::routed_experts(prim(normed), logits.clone(), weights, top_k);
            let host = |t: CubeTensor<R>, d: usize| {
                let t = wrap::<R, 2>(t);
                assert_eq!(t.dims()[1], d, "{name}");
                to_vec(t.cast(DType::F32))
            };
            let res_want = to_vec(wrap::<R, 3>(residual).cast(DType::F32));
            assert_close(
                &format!("{name}, residual"),
                &host(out.residual, hidden),
                &res_want,
                0.0,
            );
            assert_close(
                &format!("{name}, logits"),
                &host(out.logits, experts),
                &host(logits, experts),
                tolerance,
            );
            assert_close(
                &format!("{name}, output"),
                &host(out.y, hidden),
                &host(y, hidden),
                tolerance,
            );
        }
    }
}

/// The argmax kernel against a host loop over fresh random rows: widths around a block's size
/// and a vocabulary's, several rows, the maximum repeated at a later index (the first must
/// win) and placed in the last block.
fn argmax_grid<R: CubeRuntime>(device: &R::Device) {
    use jamba::kernels::argmax;
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for &(rows, width) in &[
        (1usize, 1usize),
        (1, 5),
        (3, 1023),
        (2, 1025),
        (1, 65_536),
        (4, 70_001),
    ] {
        let mut x = rng.normal(rows * width, 0.0, 3.0);
        for r in 0..rows {
            let row = &mut x[r * width..(r + 1) * width];
            let at = (rng.0.next_f64() * width as f64) as usize % width;
            let top = row.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            row[at] = top;
            if r % 2 == 1 {
                // A tie after it, and (odd rows) the first copy in the last block.
                row[width - 1] = top;
            }
        }
        let want: Vec<i64> = x
            .chunks_exact(width)
            .map(|row| jamba::generation::argmax(row) as i64)
            .collect();
        let t = Tensor::<K<R>, 2>::from_data(TensorData::new(x, [rows, width]), device);
        let out = argmax::argmax_rows(prim(t), DType::I32);
        let got: Vec<i64> = Tensor::<K<R>, 1, burn::tensor::Int>::from_primitive(out)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int data");
        assert_eq!(got, want, "argmax of {rows} rows of {width}");
    }
}

/// A Mamba layer's scan parameters in one launch (`scan::scan_parameters` through
/// `JambaBackend::scan_parameters`) against Burn's `−exp` and casts of the same values on the
/// same device: `A` to f32 `exp`'s rounding, `D` and the bias exactly; without a bias; `A_log`
/// through a transposed (strided) view; every output f32.
fn scan_parameters_grid<R: CubeRuntime>(device: &R::Device, dtype: DType) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for &(channels, state, with_bias, transposed) in &[
        (2048usize, 16usize, true, false),
        (33, 4, false, false),
        (300, 16, true, true),
        (1, 1, true, false),
    ] {
        let t1 = |v: Vec<f32>| {
            Tensor::<K<R>, 1>::from_data(TensorData::new(v, [channels]), device).cast(dtype)
        };
        let a_log = if transposed {
            Tensor::<K<R>, 2>::from_data(
                TensorData::new(rng.normal(channels * state, 1.0, 1.0), [state, channels]),
                device,
            )
            .cast(dtype)
            .transpose()
        } else {
            Tensor::<K<R>, 2>::from_data(
                TensorData::new(rng.normal(channels * state, 1.0, 1.0), [channels, state]),
                device,
            )
            .cast(dtype)
        };
        let d = t1(rng.normal(channels, 1.0, 0.5));
        let bias = with_bias.then(|| t1(rng.normal(channels, -3.0, 1.0)));
        let (a, d_out, bias_out) = K::<R>::scan_parameters(a_log.clone(), d.clone(), bias.clone());
        let name = format!(
            "{dtype:?} scan parameters {channels}x{state}, bias {with_bias}, transposed {transposed}"
        );
        assert!(
            [a.dtype(), d_out.dtype()].iter().all(|&t| t == DType::F32),
            "{name}: f32 outputs"
        );
        assert_close(
            &format!("{name}: A"),
            &to_vec(a),
            &to_vec(a_log.cast(DType::F32).exp().neg()),
            1e-6,
        );
        assert_close(&format!("{name}: D"), &to_vec(d_out), &to_vec(d), 0.0);
        match (bias_out, bias) {
            (Some(got), Some(want)) => {
                assert_eq!(got.dtype(), DType::F32, "{name}: f32 bias");
                assert_close(&format!("{name}: bias"), &to_vec(got), &to_vec(want), 0.0)
            }
            (None, None) => {}
            _ => panic!("{name}: the bias must come back exactly when one was given"),
        }
    }
}

/// The router's softmax and top-k for many tokens (`moe::route`, the grouped experts' routing)
/// against an f64 loop on the same rounded logits: the experts exactly (ranked by value, an
/// equal logit at a lower index first: rows with planted ties check it), the weights to the
/// dtype's rounding. Shapes: one token, a prefill's 2048 tokens of 16 experts, top-k of every
/// expert, a transposed (strided) view; then the backend op against the same loop.
fn route_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for &(tokens, experts, top_k, transposed) in &[
        (1usize, 16usize, 2usize, false),
        (2048, 16, 2, false),
        (37, 8, 3, false),
        (5, 4, 4, false),
        (70, 16, 2, true),
    ] {
        let mut x = rng.normal(tokens * experts, 0.0, 2.0);
        for t in (0..tokens).step_by(3) {
            // A tie for the top: the lower index must rank first.
            let row = &mut x[t * experts..(t + 1) * experts];
            let top = row.iter().cloned().fold(f32::MIN, f32::max) + 0.5;
            let (a, b) = (t % experts, (t * 7 + 1) % experts);
            row[a] = top;
            row[b] = top;
        }
        let logits =
            Tensor::<K<R>, 2>::from_data(TensorData::new(x, [tokens, experts]), device).cast(dtype);
        let rounded = to_vec(logits.clone());
        let mut want_w = Vec::new();
        let mut want_e = Vec::new();
        for row in rounded.chunks_exact(experts) {
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&i, &j| row[j].partial_cmp(&row[i]).unwrap().then(i.cmp(&j)));
            for &e in &order[..top_k] {
                want_w.push(((row[e] as f64 - max).exp() / sum) as f32);
                want_e.push(e as i64);
            }
        }
        let input = if transposed {
            // The same values through a `[experts, tokens]` buffer's transposed view.
            let t = Tensor::<K<R>, 2>::from_data(logits.clone().transpose().into_data(), device);
            t.cast(dtype).transpose()
        } else {
            logits.clone()
        };
        let (weights, chosen) = moe::route(prim(input), top_k);
        let name =
            format!("{dtype:?} route {tokens}x{experts} top {top_k}, transposed {transposed}");
        let got_e: Vec<i64> = Tensor::<K<R>, 1, burn::tensor::Int>::from_primitive(chosen)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int data");
        assert_eq!(got_e, want_e, "{name}: experts");
        assert_close(&name, &to_vec(wrap::<R, 1>(weights)), &want_w, tolerance);

        let (weights, chosen) =
            K::<R>::route_top_k(logits, top_k).expect("CubeCL routes on the device");
        let got_e: Vec<i64> = chosen
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int data");
        assert_eq!(got_e, want_e, "{name}: the backend op's experts");
        assert_close(
            &format!("{name} (backend op)"),
            &to_vec(weights),
            &want_w,
            tolerance,
        );
    }
}

/// One-query attention over a cache against an f64 loop: grouped heads (1, 2 and 4 query heads
/// per key/value head), head widths below and at a cube's units and not multiples of 32, key
/// counts in one chunk and across several (the online softmax's rescaling), keys and values read
/// in place from a larger preallocated buffer (strided views), and a padding mask that hides
/// some keys of one row and every key of another (which must give zeros). Both forms: head
/// widths that split into 16-byte vectors take the vector kernel, width 30 the scalar one.
/// Inputs are rounded to `dtype` first; the error left is f32 arithmetic and the output's
/// rounding.
fn decode_attention_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    use jamba::kernels::attention;
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let mut cases = 0;
    let mut forms = [0usize; 2];
    for &(batch, heads, kv_heads, dim, keys) in &[
        (1usize, 8usize, 2usize, 128usize, 1usize),
        (1, 8, 2, 128, 300),
        (3, 4, 4, 24, 257),
        (2, 6, 3, 256, 700),
        (3, 2, 1, 40, 33),
        (2, 4, 2, 30, 65),
    ] {
        for masked in [false, true] {
            let capacity = keys + 5;
            let round = |v: Vec<f32>, shape: [usize; 4]| {
                let t = Tensor::<K<R>, 4>::from_data(TensorData::new(v, shape), device).cast(dtype);
                let host = to_vec(t.clone().cast(DType::F32));
                (t, host)
            };
            let q_shape = [batch, heads, 1, dim];
            let (q, q_host) = round(rng.normal(batch * heads * dim, 0.0, 1.0), q_shape);
            let kv_shape = [batch, kv_heads, capacity, dim];
            let n = batch * kv_heads * capacity * dim;
            let (k_full, k_host) = round(rng.normal(n, 0.0, 1.0), kv_shape);
            let (v_full, v_host) = round(rng.normal(n, 0.0, 1.0), kv_shape);
            let view = [0..batch, 0..kv_heads, 0..keys];
            let (k, v) = (k_full.slice(view.clone()), v_full.slice(view));
            // Row 0 hides its first third of keys, the last row (when there are two) all of them.
            let hidden: Vec<bool> = (0..batch * keys)
                .map(|i| {
                    let (row, key) = (i / keys, i % keys);
                    masked && ((row == 0 && key < keys / 3) || (row > 0 && row == batch - 1))
                })
                .collect();
            let scale = 1.0 / (dim as f64).sqrt();
            let mut expected = vec![0f32; batch * heads * dim];
            for b in 0..batch {
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let at = |t: &[f32], j: usize, d: usize| {
                        t[((b * kv_heads + g) * capacity + j) * dim + d] as f64
                    };
                    let scores: Vec<f64> = (0..keys)
                        .map(|j| {
                            if hidden[b * keys + j] {
                                return f64::NEG_INFINITY;
                            }
                            (0..dim)
                                .map(|d| {
                                    q_host[(b * heads + h) * dim + d] as f64 * at(&k_host, j, d)
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue; // every key hidden: zeros
                    }
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..dim {
                        let o: f64 = (0..keys).map(|j| weights[j] * at(&v_host, j, d)).sum();
                        expected[(b * heads + h) * dim + d] = (o / total) as f32;
                    }
                }
            }
            let pad = masked.then(|| {
                let t = Tensor::<K<R>, 1>::from_data(
                    TensorData::new(
                        hidden.iter().map(|&h| h as i32 as f32).collect::<Vec<_>>(),
                        [batch * keys],
                    ),
                    device,
                );
                prim(t.reshape([batch, keys]))
            });
            let (k, v) = (prim(k), prim(v));
            forms[usize::from(attention::takes_vector_form(&k, &v))] += 1;
            let y = wrap::<R, 2>(attention::decode_attention(
                prim(q.reshape([batch, heads, dim])),
                k,
                v,
                pad,
                scale,
            ));
            assert_eq!(y.dims(), [batch, heads * dim]);
            assert_close(
                &format!(
                    "{dtype:?} decode attention b {batch} heads {heads}/{kv_heads} dim {dim} keys {keys} masked {masked}"
                ),
                &to_vec(y.cast(DType::F32)),
                &expected,
                tolerance,
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 12);
    // Both forms ran: the vector form where the head dimension splits into 16-byte vectors.
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (scalar, vector): {forms:?}"
    );
}

/// The device-routed mixture of experts against an f64 loop (softmax, top-k by probability,
/// `Σⱼ pⱼ · down(silu(gate·x) · up·x)`): one token to [`moe::MAX_SLOTS`] (token, expert) pairs,
/// top 1 to 4, widths that fill no cube evenly, `x` a window of wider rows. Inputs are rounded to
/// `dtype` first; the output buffer's memory held NaN just before the call (a pool reuses it),
/// so an element left unwritten fails. Every case runs before the verdict, and a failing case
/// names the first wrong stage (each stage checked on the previous stage's device output).
fn routed_experts_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let mut failures = Vec::new();
    let mut vector_cases = 0;
    let cases = [
        [1usize, 4, 1, 8, 16],
        [1, 16, 2, 40, 72],
        [1, 4, 2, 64, 96],
        [1, 4, 2, 64, 128],
        [3, 8, 2, 33, 50],
        [5, 16, 4, 64, 300],
        [moe::MAX_SLOTS / 2, 16, 2, 24, 40],
    ];
    for dims in cases {
        let mut p = common::MoeProblem::random(&mut rng, dims);
        let [tokens, experts, top_k, hidden, inner] = dims;
        // Round every operand to `dtype`; the host copies take the rounded values.
        let round = |v: &mut Vec<f32>| {
            let t = Tensor::<K<R>, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device)
                .cast(dtype);
            *v = to_vec(t.clone().cast(DType::F32));
            t
        };
        let x = round(&mut p.x);
        let logits = round(&mut p.logits);
        let gate = round(&mut p.gate);
        let up = round(&mut p.up);
        let down = round(&mut p.down);
        let expected = p.expected();
        // `x` as a window of wider rows (strided).
        let extra = 3;
        let x = Tensor::cat(
            vec![
                Tensor::<K<R>, 2>::ones([tokens, extra], (device, dtype)),
                x.reshape([tokens, hidden]),
            ],
            1,
        )
        .slice([0..tokens, extra..hidden + extra]);
        drop(Tensor::<K<R>, 2>::full(
            [tokens, hidden],
            f32::NAN,
            (device, dtype),
        ));
        let vector = moe::takes_vector_form(
            &prim(x.clone()),
            [
                &prim(gate.clone().reshape([experts, hidden, inner])),
                &prim(up.clone().reshape([experts, hidden, inner])),
                &prim(down.clone().reshape([experts, inner, hidden])),
            ],
            &prim(Tensor::<K<R>, 2>::empty([tokens, hidden], (device, dtype))),
            false,
        );
        vector_cases += usize::from(vector);
        let stages = moe::routed_experts_stages(
            prim(x),
            prim(logits.reshape([tokens, experts])),
            moe::ExpertWeights {
                gate: prim(gate.reshape([experts, hidden, inner])),
                up: prim(up.reshape([experts, hidden, inner])),
                down: prim(down.reshape([experts, inner, hidden])),
            },
            top_k,
        );
        let y = wrap::<R, 2>(stages.y.clone());
        assert_eq!(y.dims(), [tokens, hidden]);
        let y = to_vec(y.cast(DType::F32));
        let err = rel_err(&y, &expected);
        let report = format!(
            "{dtype:?} routed experts ({}): {tokens} tokens, top {top_k} of {experts}, \
             {hidden} x {inner}: rel. error {err:.3e} (tolerance {tolerance:.0e}), {} \
             non-finite; stages: {}",
            if vector {
                "vector form"
            } else {
                "partial sums"
            },
            y.iter().filter(|v| !v.is_finite()).count(),
            routed_stage_errors(&p, stages)
        );
        eprintln!("{report}");
        if !(err <= tolerance && y.iter().all(|v| v.is_finite())) {
            failures.push(report);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Both forms ran: the vector form where the widths split into 16-byte vectors.
    assert!(
        (1..cases.len()).contains(&vector_cases),
        "{vector_cases} of {} cases in the vector form",
        cases.len()
    );
}

/// Each stage of the routed experts against the host, given the previous stage's device
/// output: which experts were picked (mismatches) and their weights, the gate and up sums, the
/// SiLU gate, the down sums, the weighted sum.
fn routed_stage_errors<R: CubeRuntime>(p: &common::MoeProblem, s: moe::RoutedStages<R>) -> String {
    use burn::tensor::Int;
    let (hidden, inner, top_k) = (p.hidden, p.inner, p.top_k);
    let slots = p.tokens * top_k;
    let indices: Vec<usize> = Tensor::<K<R>, 1, Int>::from_primitive(s.indices)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let routing = to_vec(wrap::<R, 1>(s.routing));
    let mut want_idx = Vec::new();
    let mut want_w = Vec::new();
    for t in 0..p.tokens {
        let row = &p.logits[t * p.experts..(t + 1) * p.experts];
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let mut order: Vec<usize> = (0..p.experts).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &e in &order[..top_k] {
            want_idx.push(e);
            want_w.push(((row[e] as f64 - max).exp() / sum) as f32);
        }
    }
    let mut out = format!(
        "indices wrong {}/{slots} ({indices:?} vs {want_idx:?}), weights {:.1e}",
        indices
            .iter()
            .zip(&want_idx)
            .filter(|(a, b)| a != b)
            .count(),
        rel_err(&routing, &want_w)
    );
    let (Some(gu), Some(act), Some(dp)) = (s.gate_up_partial, s.act, s.down_partial) else {
        return out;
    };
    let e_of = |slot: usize| indices[slot].min(p.experts - 1);
    let gu = to_vec(wrap::<R, 4>(gu));
    let slices = gu.len() / (2 * slots * inner);
    let sum_slices = |v: &[f32], half: usize, slot: usize, o: usize, n: usize| -> f32 {
        (0..slices)
            .map(|sl| v[((half * slices + sl) * slots + slot) * n + o])
            .sum()
    };
    let (mut g_dev, mut g_host, mut u_dev, mut u_host) = (vec![], vec![], vec![], vec![]);
    for slot in 0..slots {
        let (e, row) = (e_of(slot), slot / top_k);
        for o in 0..inner {
            let (mut a, mut b) = (0f64, 0f64);
            for i in 0..hidden {
                let xv = p.x[row * hidden + i] as f64;
                a += xv * p.gate[(e * hidden + i) * inner + o] as f64;
                b += xv * p.up[(e * hidden + i) * inner + o] as f64;
            }
            g_host.push(a as f32);
            u_host.push(b as f32);
            g_dev.push(sum_slices(&gu, 0, slot, o, inner));
            u_dev.push(sum_slices(&gu, 1, slot, o, inner));
        }
    }
    let act = to_vec(wrap::<R, 2>(act));
    let act_want: Vec<f32> = g_dev
        .iter()
        .zip(&u_dev)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let dp = to_vec(wrap::<R, 3>(dp));
    let dslices = dp.len() / (slots * hidden);
    let (mut d_dev, mut d_host) = (vec![], vec![]);
    for slot in 0..slots {
        let e = e_of(slot);
        for o in 0..hidden {
            d_dev.push(
                (0..dslices)
                    .map(|sl| dp[(sl * slots + slot) * hidden + o])
                    .sum::<f32>(),
            );
            d_host.push(
                (0..inner)
                    .map(|i| {
                        act[slot * inner + i] as f64 * p.down[(e * inner + i) * hidden + o] as f64
                    })
                    .sum::<f64>() as f32,
            );
        }
    }
    let y = to_vec(wrap::<R, 2>(s.y));
    let y_want: Vec<f32> = (0..p.tokens * hidden)
        .map(|i| {
            let (t, o) = (i / hidden, i % hidden);
            (0..top_k)
                .map(|j| d_dev[(t * top_k + j) * hidden + o] * routing[t * top_k + j])
                .sum()
        })
        .collect();
    out += &format!(
        ", gate {:.1e}, up {:.1e}, act {:.1e}, down {:.1e}, y {:.1e} ({slices} and {dslices} slices)",
        rel_err(&g_dev, &g_host),
        rel_err(&u_dev, &u_host),
        rel_err(&act, &act_want),
        rel_err(&d_dev, &d_host),
        rel_err(&y, &y_want),
    );
    out
}

/// Every input's gradient through the scan, for the loss `Σ y·w`.
fn scan_grads<B: burn::tensor::backend::AutodiffBackend + JambaBackend>(
    p: &Problem,
    w: &[f32],
    device: &B::Device,
) -> Vec<(&'static str, Vec<f32>)> {
    let input = p.input::<B>(device);
    let input = jamba::scan::ScanInput {
        u: input.u.require_grad(),
        delta: input.delta.require_grad(),
        a: input.a.require_grad(),
        b: input.b.require_grad(),
        c: input.c.require_grad(),
        d: input.d.map(|t| t.require_grad()),
        z: input.z.map(|t| t.require_grad()),
        delta_bias: input.delta_bias.map(|t| t.require_grad()),
        initial_state: input.initial_state.map(|t| t.require_grad()),
        ..input
    };
    let y = B::selective_scan(input.clone()).y;
    let w = Tensor::<B, 3>::from_data(TensorData::new(w.to_vec(), y.dims()), device);
    let grads = (y * w).sum().backward();
    let g3 = |t: &Tensor<B, 3>| to_vec(t.grad(&grads).expect("tracked input has a gradient"));
    let mut out = vec![
        ("u", g3(&input.u)),
        ("delta", g3(&input.delta)),
        ("A", to_vec(input.a.grad(&grads).unwrap())),
        ("B", g3(&input.b)),
        ("C", g3(&input.c)),
    ];
    if let Some(d) = &input.d {
        out.push(("D", to_vec(d.grad(&grads).unwrap())));
    }
    if let Some(z) = &input.z {
        out.push(("z", g3(z)));
    }
    if let Some(bias) = &input.delta_bias {
        out.push(("delta_bias", to_vec(bias.grad(&grads).unwrap())));
    }
    if let Some(h0) = &input.initial_state {
        out.push(("initial_state", g3(h0)));
    }
    out
}

/// The backward kernel (through `Autodiff<CubeBackend>`) against autodiff of the tensor-op scan
/// on the CPU, on fresh random inputs and output gradients.
fn scan_backward_grid<R: CubeRuntime>(device: &R::Device) {
    type Cpu = burn::backend::Autodiff<jamba::backends::Cpu>;
    type Gpu<R> = burn::backend::Autodiff<K<R>>;
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 300] {
        for &(batch, channels, state) in &[
            (1usize, 3usize, 1usize),
            (2, 37, 4),
            (3, 19, 16),
            (2, 5, 64),
        ] {
            for options in [0u8, 3, 5, 10, 15] {
                let with = [0, 1, 2, 3].map(|bit| options & (1 << bit) != 0);
                let p = Problem::random(&mut rng, batch, seq, channels, state, with);
                let w = rng.normal(batch * seq * channels, 0.0, 1.0);
                let ours = scan_grads::<Gpu<R>>(&p, &w, device);
                let reference = scan_grads::<Cpu>(&p, &w, &Default::default());
                assert_eq!(ours.len(), reference.len());
                for ((name, g), (_, e)) in ours.iter().zip(&reference) {
                    // A gradient of one to three elements is one to three sums over channels
                    // and steps, each of which may cancel: both sides' f32 summation errors are
                    // bounded relative to the terms, not to the result (dB of one step and one
                    // state once measured 1.8e-5). An indexing error is still O(1) there.
                    let tolerance = if e.len() < 4 { 1e-3 } else { 1e-5 };
                    assert_close(
                        &format!(
                            "d{name}, seq {seq} batch {batch} channels {channels} state {state} D/z/bias/h0 {with:?}"
                        ),
                        g,
                        e,
                        tolerance,
                    );
                }
                cases += 1;
            }
        }
    }
    assert!(cases >= 100);
}

/// The fused Mamba decoding step ([`JambaBackend::mamba_step`], one kernel or two) against the
/// same mixer's separate operations on the same device: four steps from a random conv and SSM
/// state, comparing the layer's output and both new states. Every parameter is random (no
/// structured `A_log` or unit `D` that would hide a transposed index), widths are not multiples
/// of the kernels' channels per cube, and the conv width, state size and rank vary. Both forms
/// run: one launch where `x_proj`'s width splits into 16-byte vectors and the batch is small,
/// two otherwise.
///
/// In f32 the two differ by summation order (`x_proj` summed by blocks of channels here, by
/// slices of `k` in the GEMV) and by the exponentials' approximations under fast math, carried
/// through the recurrence and into `y`, where `D · u` can cancel `C · h`: seen up to 5e-6
/// over eight seeds, hence 2e-5. (No rank or state of 1: the norm of one value, `x / √(x² + ε)`,
/// has a condition number up to `1/√ε`, which turned the same differences into 5e-5.)
fn mamba_step_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    use burn::module::Param;
    use burn::tensor::Distribution;
    use burn::tensor::backend::Backend as _;
    use jamba::cache::MambaState;
    use jamba::mamba::MambaMixerConfig;
    let seed = common::fresh_seed();
    K::<R>::seed(device, seed);
    let mut cases = 0;
    let mut forms = [0usize; 2];
    let mut worst = (0.0f64, String::new());
    for &(inner, state, rank, d_conv, conv_bias) in &[
        (37usize, 16usize, 3usize, 4usize, true),
        (128, 16, 8, 4, false),
        (300, 4, 20, 2, true),
        (256, 2, 2, 3, true),
        (200, 64, 13, 8, false),
        (1024, 16, 64, 4, true),
    ] {
        for batch in [1usize, 3] {
            let hidden = 24;
            let random = |shape: Vec<usize>, lo: f64, hi: f64| {
                Tensor::<K<R>, 1>::random(
                    [shape.iter().product::<usize>()],
                    Distribution::Uniform(lo, hi),
                    device,
                )
            };
            let mut mixer = MambaMixerConfig::new(hidden, inner, state, d_conv, rank)
                .with_conv_bias(conv_bias)
                .init::<K<R>>(device);
            mixer.a_log =
                Param::from_tensor(random(vec![inner * state], -1.0, 1.5).reshape([inner, state]));
            mixer.d = Param::from_tensor(random(vec![inner], -1.0, 2.0));
            for norm in [
                &mut mixer.dt_layernorm,
                &mut mixer.b_layernorm,
                &mut mixer.c_layernorm,
            ] {
                let size = norm.weight.dims()[0];
                norm.weight = Param::from_tensor(random(vec![size], 0.5, 1.5));
            }
            let mixer = cast_module(mixer, dtype);
            let fresh = || MambaState {
                conv: Tensor::<K<R>, 3>::random(
                    [batch, d_conv - 1, inner],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )
                .cast(dtype),
                ssm: Tensor::<K<R>, 3>::random(
                    [batch, inner, state],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ),
            };
            let mut fused = fresh();
            let mut unfused = fused.clone();
            let name = format!(
                "{dtype:?} inner {inner} N {state} rank {rank} d_conv {d_conv} bias {conv_bias} batch {batch} (seed {seed})"
            );
            let xz = Tensor::<K<R>, 2>::random(
                [batch, 2 * inner],
                Distribution::Normal(0.0, 1.0),
                device,
            )
            .cast(dtype);
            assert!(
                K::<R>::mamba_step(mixer.step_input(xz, &fused)).is_some(),
                "{name}: the backend did not take the fused step"
            );
            let one = jamba::kernels::mamba_step::takes_one_launch(
                &prim(mixer.x_proj.weight.val()),
                batch,
                state,
            );
            forms[usize::from(one)] += 1;
            for step in 0..4 {
                let x = Tensor::<K<R>, 3>::random(
                    [batch, 1, hidden],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )
                .cast(dtype);
                let y = mixer.forward(x.clone(), None, Some(&mut fused));
                let y_want = mixer.forward_unfused(x, None, Some(&mut unfused));
                let name = format!("{name}, step {step}");
                let (y, y_want) = (to_vec(y), to_vec(y_want));
                let err = rel_err(&y, &y_want);
                if err > worst.0 {
                    worst = (err, name.clone());
                }
                assert_close(&format!("y, {name}"), &y, &y_want, tolerance);
                assert_close(
                    &format!("conv state, {name}"),
                    &to_vec(fused.conv.clone()),
                    &to_vec(unfused.conv.clone()),
                    0.0,
                );
                assert_close(
                    &format!("SSM state, {name}"),
                    &to_vec(fused.ssm.clone()),
                    &to_vec(unfused.ssm.clone()),
                    tolerance,
                );
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 12);
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (two launches, one): {forms:?}"
    );
    eprintln!(
        "fused Mamba step: worst rel. error of y {:.2e} (tolerance {tolerance:.0e}) at {}",
        worst.0, worst.1
    );
}

/// The fused dense MLP ([`JambaBackend::swiglu`], four kernels) against the same MLP's separate
/// operations on the same device, on random weights and inputs: widths that are not multiples
/// of the kernels' 32 columns, one row to the most the kernels take; the vector form where the
/// widths split into 16-byte vectors and the rows are at most four, the partial sums otherwise.
fn swiglu_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    use burn::tensor::Distribution;
    use burn::tensor::backend::Backend as _;
    use jamba::mlp::MlpConfig;
    let seed = common::fresh_seed();
    K::<R>::seed(device, seed);
    let mut forms = [0usize; 2];
    // (64, 256): rows CUDA's allocator does not pad in half precision either (128 and 512 bytes).
    for &(hidden, inner) in &[
        (24usize, 72usize),
        (100, 300),
        (512, 1408),
        (7, 5),
        (64, 256),
    ] {
        let mlp = cast_module(MlpConfig::new(hidden, inner).init::<K<R>>(device), dtype);
        for rows in [1usize, 3, jamba::kernels::moe::MAX_SLOTS] {
            let name = format!("{dtype:?} hidden {hidden} inner {inner} rows {rows} (seed {seed})");
            let x = Tensor::<K<R>, 3>::random(
                [rows, 1, hidden],
                Distribution::Normal(0.0, 1.0),
                device,
            )
            .cast(dtype);
            let vector = jamba::kernels::moe::takes_vector_form(
                &prim(x.clone().reshape([rows, hidden])),
                [
                    &prim(mlp.gate_proj.weight.val()),
                    &prim(mlp.up_proj.weight.val()),
                    &prim(mlp.down_proj.weight.val()),
                ],
                &prim(Tensor::<K<R>, 2>::empty([rows, hidden], (device, dtype))),
                true,
            );
            forms[usize::from(vector)] += 1;
            assert!(
                K::<R>::swiglu(
                    x.clone().reshape([rows, hidden]),
                    mlp.gate_proj.weight.val(),
                    mlp.up_proj.weight.val(),
                    mlp.down_proj.weight.val(),
                )
                .is_some(),
                "{name}: the backend did not take the fused MLP"
            );
            let y = mlp.forward(x.clone());
            let y_want = mlp.forward_unfused(x);
            assert_eq!(y.dims(), y_want.dims());
            assert_close(&name, &to_vec(y), &to_vec(y_want), tolerance);
        }
    }
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (partial sums, vector): {forms:?}"
    );
}

/// The dense MLP with its residual sums and norm folded into the gate/up launch
/// ([`JambaBackend::swiglu_normed`]) against the separate kernels on the same device (the
/// residual norm, then [`JambaBackend::swiglu`]), with and without the first update, one to
/// four rows, on fresh random inputs: the residual must match exactly, the output to the
/// summation order. Widths whose rows CUDA's allocator pads (not contiguous there) and rows
/// too wide for the staged norm must be refused, and the fused form must run somewhere.
fn mlp_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let eps = 1e-6;
    let (mut fused, mut refused) = (0usize, 0usize);
    for &(hidden, inner) in &[(64usize, 256usize), (1024, 512), (40, 96), (2048, 64)] {
        for rows in 1..=gemv::NORMED_MAX_ROWS {
            for with_first in [false, true] {
                let tensor = |shape: [usize; 2], std: f64, rng: &mut Rng| {
                    let len = shape[0] * shape[1];
                    Tensor::<K<R>, 2>::from_data(
                        TensorData::new(rng.normal(len, 0.0, std), shape),
                        device,
                    )
                    .cast(dtype)
                };
                let x = tensor([rows, hidden], 1.0, &mut rng);
                let first = tensor([rows, hidden], 1.0, &mut rng);
                let second = tensor([rows, hidden], 1.0, &mut rng);
                let norm_w = tensor([1, hidden], 0.3, &mut rng)
                    .add_scalar(1.0)
                    .reshape([hidden]);
                let gate = tensor([hidden, inner], 0.2, &mut rng);
                let up = tensor([hidden, inner], 0.2, &mut rng);
                let down = tensor([inner, hidden], 0.2, &mut rng);
                let name = format!(
                    "{dtype:?} swiglu_normed: {rows} rows, {hidden} x {inner}, first {with_first}"
                );
                let takes = moe::takes_normed_mlp(
                    &prim(x.clone()),
                    [&prim(gate.clone()), &prim(up.clone()), &prim(down.clone())],
                    &prim(Tensor::<K<R>, 2>::empty([rows, hidden], (device, dtype))),
                );
                let out = K::<R>::swiglu_normed(jamba::ops::NormedMlp {
                    x: x.clone(),
                    first: with_first.then(|| first.clone()),
                    second: second.clone(),
                    norm: norm_w.clone(),
                    eps,
                    gate: gate.clone(),
                    up: up.clone(),
                    down: down.clone(),
                });
                assert_eq!(
                    out.is_some(),
                    takes,
                    "{name}: fused form ran: {}",
                    out.is_some()
                );
                let Some((residual, y)) = out else {
                    refused += 1;
                    continue;
                };
                fused += 1;
                let x3 = |t: Tensor<K<R>, 2>| t.reshape([1, rows, hidden]);
                let (res_want, normed) = if with_first {
                    K::<R>::add2_rms_norm(x3(x), x3(first), x3(second), norm_w, eps)
                } else {
                    K::<R>::add_rms_norm(x3(x), x3(second), norm_w, eps)
                };
                let y_want = K::<R>::swiglu(normed.reshape([rows, hidden]), gate, up, down)
                    .expect("the separate fused MLP runs for four rows");
                let host = |t: Tensor<K<R>, 2>| to_vec(t.cast(DType::F32));
                assert_close(
                    &format!("{name}, residual"),
                    &host(residual),
                    &host(res_want.reshape([rows, hidden])),
                    0.0,
                );
                assert_close(
                    &format!("{name}, output"),
                    &host(y),
                    &host(y_want),
                    tolerance,
                );
            }
        }
    }
    assert!(
        fused > 0 && refused > 0,
        "cases fused {fused}, refused {refused}"
    );
}

/// Several normalised projections in one launch ([`JambaBackend::normed_projections`], an
/// attention layer's q/k/v) against one [`JambaBackend::normed_projection`] per weight on the
/// same device, on fresh random inputs: one to three weights whose column vectors do not fill
/// the cubes, with and without a pending update, one to four rows. A weight whose width is not
/// a whole number of 16-byte vectors must be refused.
fn normed_projections_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
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
                let tensor = |shape: [usize; 3], std: f64, rng: &mut Rng| {
                    let len = shape.iter().product();
                    Tensor::<K<R>, 3>::from_data(
                        TensorData::new(rng.normal(len, 0.0, std), shape),
                        device,
                    )
                    .cast(dtype)
                };
                let x = tensor([1, rows, k], 1.0, &mut rng);
                let pending = tensor([1, rows, k], 1.0, &mut rng);
                let norm_w = tensor([1, 1, k], 0.3, &mut rng)
                    .add_scalar(1.0)
                    .reshape([k]);
                let ws: Vec<Tensor<K<R>, 2>> = outs
                    .iter()
                    .map(|&n| tensor([1, k, n], 0.2, &mut rng).reshape([k, n]))
                    .collect();
                let name = format!(
                    "{dtype:?} normed_projections: {rows} rows, k {k}, outputs {outs:?}, \
                     pending {with_pending}"
                );
                let ys = K::<R>::normed_projections(jamba::ops::NormedProjections {
                    x: x.clone(),
                    pending: with_pending.then(|| pending.clone()),
                    norm: norm_w.clone(),
                    eps,
                    weights: ws.clone(),
                });
                let whole = outs.iter().all(|n| n % width == 0);
                assert_eq!(
                    ys.is_some(),
                    whole,
                    "{name}: fused form ran: {}",
                    ys.is_some()
                );
                let Some(ys) = ys else { continue };
                assert_eq!(ys.len(), ws.len(), "{name}");
                for (i, (y, w)) in ys.into_iter().zip(ws).enumerate() {
                    let want = K::<R>::normed_projection(jamba::ops::NormedProjection {
                        x: x.clone(),
                        pending: with_pending.then(|| pending.clone()),
                        norm: norm_w.clone(),
                        eps,
                        weight: w,
                        bias: None,
                    })
                    .expect("the normed projection runs for four rows");
                    assert_eq!(y.dims(), want.dims(), "{name}, weight {i}");
                    assert_close(
                        &format!("{name}, weight {i}"),
                        &to_vec(y.cast(DType::F32)),
                        &to_vec(want.cast(DType::F32)),
                        tolerance,
                    );
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 4 * gemv::NORMED_MAX_ROWS * 2, "fused cases");
}

/// The one-launch SwiGLU gate ([`JambaBackend::silu_mul`]) against Burn's `silu` and product
/// on the same device, on fresh random inputs around SiLU's bend: shapes whose element count
/// is a whole number of 16-byte vectors (the kernel runs) and one that is not (the composed
/// form runs); both must agree with the composition.
fn silu_mul_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    use burn::tensor::activation::silu;
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let width = 16 / dtype.size();
    let mut ran = 0usize;
    for shape in [[3usize, 5, 8 * width], [1, 2048, 64], [2, 3, 5]] {
        let len: usize = shape.iter().product();
        let tensor = |rng: &mut Rng| {
            Tensor::<K<R>, 3>::from_data(TensorData::new(rng.normal(len, 0.0, 3.0), shape), device)
                .cast(dtype)
        };
        let (gate, up) = (tensor(&mut rng), tensor(&mut rng));
        let kernel = jamba::kernels::activation::silu_mul(prim(gate.clone()), prim(up.clone()));
        assert_eq!(
            kernel.is_some(),
            len.is_multiple_of(width),
            "{dtype:?} {shape:?}"
        );
        ran += usize::from(kernel.is_some());
        let ours = K::<R>::silu_mul(gate.clone(), up.clone());
        let want = silu(gate.cast(DType::F32)).cast(dtype).cast(DType::F32) * up.cast(DType::F32);
        assert_eq!(ours.dims(), shape);
        assert_close(
            &format!("{dtype:?} silu_mul {shape:?}"),
            &to_vec(ours.cast(DType::F32)),
            &to_vec(want.cast(dtype).cast(DType::F32)),
            tolerance,
        );
    }
    assert_eq!(
        ran, 2,
        "{dtype:?}: the kernel ran on the whole-vector shapes"
    );
}

/// `module` with every float parameter cast to `dtype`.
fn cast_module<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(
    module: M,
    dtype: DType,
) -> M {
    use burn::module::{ModuleMapper, Param};
    struct Cast(DType);
    impl<B: burn::tensor::backend::Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.cast(self.0), mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

macro_rules! kernel_tests {
    ($module:ident, $runtime:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        mod $module {
            type R = $runtime;

            #[test]
            fn scan_kernel_matches_the_definition_over_the_grid() {
                super::scan_grid::<R>(&Default::default());
            }

            #[test]
            fn scan_kernel_matches_tensor_ops_and_takes_strided_views() {
                super::scan_matches_tensor_ops::<R>(&Default::default());
            }

            #[test]
            fn scan_backward_kernel_matches_autodiff_of_tensor_ops() {
                super::scan_backward_grid::<R>(&Default::default());
            }

            #[test]
            fn rms_norm_kernel_matches_the_definition() {
                super::rms_norm_grid::<R>(&Default::default());
            }

            #[test]
            fn conv_kernel_matches_the_definition_over_the_grid() {
                super::conv_grid::<R>(&Default::default());
            }

            #[test]
            fn gemv_kernel_matches_the_definition_over_the_grid() {
                super::gemv_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-6);
            }

            #[test]
            fn decode_attention_kernel_matches_the_definition() {
                super::decode_attention_grid::<R>(
                    &Default::default(),
                    burn::tensor::DType::F32,
                    1e-5,
                );
            }

            #[test]
            fn fused_mamba_step_matches_the_separate_operations() {
                super::mamba_step_grid::<R>(&Default::default(), burn::tensor::DType::F32, 2e-5);
            }

            #[test]
            fn fused_mlp_matches_the_separate_operations() {
                super::swiglu_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-5);
            }

            #[test]
            fn fused_normed_mlp_matches_the_separate_kernels() {
                super::mlp_normed_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-5);
            }

            #[test]
            fn normed_projections_match_one_launch_per_weight() {
                super::normed_projections_grid::<R>(
                    &Default::default(),
                    burn::tensor::DType::F32,
                    1e-5,
                );
            }

            #[test]
            fn silu_mul_kernel_matches_burns_silu_and_product() {
                super::silu_mul_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-6);
            }

            #[test]
            fn normed_gemv_matches_the_definition() {
                super::gemv_normed_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-5);
            }

            #[test]
            fn normed_routing_matches_the_separate_kernels() {
                super::routed_normed_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-5);
            }

            #[test]
            fn scan_parameters_kernel_matches_burns_operations() {
                super::scan_parameters_grid::<R>(&Default::default(), burn::tensor::DType::F32);
            }

            #[test]
            fn route_kernel_matches_softmax_top_k() {
                super::route_grid::<R>(&Default::default(), burn::tensor::DType::F32, 1e-6);
            }

            #[test]
            fn argmax_kernel_matches_a_host_loop() {
                super::argmax_grid::<R>(&Default::default());
            }

            #[test]
            fn routed_experts_kernel_matches_the_definition() {
                super::routed_experts_grid::<R>(
                    &Default::default(),
                    burn::tensor::DType::F32,
                    1e-5,
                );
            }
        }
    };
}

kernel_tests!(wgpu, burn::backend::wgpu::WgpuRuntime, "wgpu");
kernel_tests!(cuda, jamba::burn_cubecl::cubecl::cuda::CudaRuntime, "cuda");

/// Half-precision RMSNorm against the tensor-op form on the same device: both round the
/// normalised value and the product to the half type; only the order of the f32 sum differs, so
/// at most a rare last-bit flip (bf16's unit roundoff is 3.9e-3, f16's 4.9e-4).
#[cfg(feature = "cuda")]
#[test]
fn cuda_rms_norm_kernel_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for (dtype, tolerance) in [(DType::BF16, 1e-3), (DType::F16, 2e-4)] {
        for &(batch, seq, width) in &[(1usize, 1usize, 1024usize), (2, 33, 16), (3, 5, 2048)] {
            let x = Tensor::<K<R>, 3>::from_data(
                TensorData::new(
                    rng.normal(batch * seq * width, 0.0, 1.5),
                    [batch, seq, width],
                ),
                &device,
            )
            .cast(dtype);
            let w = Tensor::<K<R>, 1>::from_data(
                TensorData::new(rng.normal(width, 1.0, 0.5), [width]),
                &device,
            )
            .cast(dtype);
            let ours = to_vec(
                wrap::<R, 3>(norm::rms_norm(prim(x.clone()), prim(w.clone()), 1e-6))
                    .cast(DType::F32),
            );
            let reference = to_vec(rms_norm_tensor_ops(x, w, 1e-6).cast(DType::F32));
            assert_close(
                &format!("{dtype:?} rms_norm {batch}x{seq}x{width}"),
                &ours,
                &reference,
                tolerance,
            );
        }
    }
}

/// Device routing of bf16 and f16 logits: the experts exactly, the weights to the output's
/// rounding (unit roundoff 3.9e-3 for bf16, 4.9e-4 for f16).
#[cfg(feature = "cuda")]
#[test]
fn cuda_route_kernel_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    route_grid::<R>(&Default::default(), DType::BF16, 4e-3);
    route_grid::<R>(&Default::default(), DType::F16, 5e-4);
}

/// The convolution on bf16 and f16 signals with weights and bias in the same dtype (a model's
/// prefill: no casts before the kernel) against the f32 kernel on the same rounded values: the
/// output's rounding (3.9e-3 for bf16, 4.9e-4 for f16); the state exactly.
#[cfg(feature = "cuda")]
#[test]
fn cuda_conv_kernel_takes_half_weights() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for (dtype, tolerance) in [(DType::BF16, 4e-3), (DType::F16, 5e-4)] {
        for &(batch, seq, channels, k) in &[
            (1usize, 2048usize, 256usize, 4usize),
            (2, 3, 33, 4),
            (1, 1, 64, 3),
        ] {
            let mut t = |n: usize, shape: Vec<usize>, std: f64| {
                Tensor::<K<R>, 1>::from_data(TensorData::new(rng.normal(n, 0.0, std), [n]), &device)
                    .cast(dtype)
                    .reshape::<3, _>([shape[0], shape[1], shape[2]])
            };
            let x = t(batch * seq * channels, vec![batch, seq, channels], 1.0);
            let prefix = t(
                batch * (k - 1) * channels,
                vec![batch, k - 1, channels],
                1.0,
            );
            let weight = t(channels * k, vec![1, channels, k], 0.5).reshape([channels, k]);
            let bias = t(channels, vec![1, 1, channels], 0.5).reshape([channels]);
            let input = |d: DType| ConvInput {
                x: x.clone().cast(d),
                weight: weight.clone().cast(d),
                bias: Some(bias.clone().cast(d)),
                prefix: Some(prefix.clone().cast(d)),
                silu: true,
            };
            let (y, s) = conv::causal_conv1d(cube::conv_tensors(input(dtype)));
            let (want_y, want_s) = conv::causal_conv1d(cube::conv_tensors(input(DType::F32)));
            let tag = format!("{dtype:?} conv {batch}x{seq}x{channels} k {k}");
            let want_y = to_vec(wrap::<R, 3>(want_y).cast(dtype));
            assert_close(
                &format!("{tag}: y"),
                &to_vec(wrap::<R, 3>(y)),
                &want_y,
                tolerance,
            );
            assert_close(
                &format!("{tag}: state"),
                &to_vec(wrap::<R, 3>(s)),
                &to_vec(wrap::<R, 3>(want_s)),
                0.0,
            );
        }
    }
}

/// The scan parameters from bf16 and f16 layers (`A_log`, `D` and the bias in the model's dtype).
#[cfg(feature = "cuda")]
#[test]
fn cuda_scan_parameters_take_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    scan_parameters_grid::<R>(&Default::default(), DType::BF16);
    scan_parameters_grid::<R>(&Default::default(), DType::F16);
}

/// The few-row product with bf16 and f16 operands (f32 accumulation): the error is the output's
/// rounding to the half type (unit roundoff 3.9e-3 for bf16, 4.9e-4 for f16).
#[cfg(feature = "cuda")]
#[test]
fn cuda_gemv_kernel_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    gemv_grid::<R>(&Default::default(), DType::BF16, 4e-3);
    gemv_grid::<R>(&Default::default(), DType::F16, 5e-4);
}

/// The folded norm's GEMV and MoE routing in half precision against the separate kernels on the
/// same device (the same roundings; the statistics' sums differ in order only).
#[cfg(feature = "cuda")]
#[test]
fn cuda_normed_kernels_take_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    gemv_normed_grid::<R>(&Default::default(), DType::BF16, 8e-3);
    gemv_normed_grid::<R>(&Default::default(), DType::F16, 1e-3);
    routed_normed_grid::<R>(&Default::default(), DType::BF16, 2e-2);
}

/// One-query attention with bf16 and f16 operands: f32 arithmetic, the output rounded once.
#[cfg(feature = "cuda")]
#[test]
fn cuda_decode_attention_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    decode_attention_grid::<R>(&Default::default(), DType::BF16, 4e-3);
    decode_attention_grid::<R>(&Default::default(), DType::F16, 5e-4);
}

/// A split-k projection (`jamba::ops::split_k`: a long inner dimension into few outputs, as
/// x_proj's, in bf16) against the f64 product of the same rounded operands: the blocks' sums
/// are rounded to bf16 before their f32 sum, the result once more, so a few unit roundoffs
/// (bf16's is 3.9e-3) where the one-pass product has one.
#[cfg(feature = "cuda")]
#[test]
fn cuda_split_k_projection_matches_the_product() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let (rows, inputs, outputs) = (600usize, 2048usize, 96usize);
    assert!(jamba::ops::split_k(rows, inputs, outputs).is_some());
    let x = Tensor::<K<R>, 3>::from_data(
        TensorData::new(rng.normal(rows * inputs, 0.0, 1.0), [1, rows, inputs]),
        &device,
    )
    .cast(DType::BF16);
    let w = Tensor::<K<R>, 2>::from_data(
        TensorData::new(
            rng.normal(inputs * outputs, 0.0, 1.0 / (inputs as f64).sqrt()),
            [inputs, outputs],
        ),
        &device,
    )
    .cast(DType::BF16);
    let (xh, wh) = (to_vec(x.clone()), to_vec(w.clone()));
    let expected: Vec<f32> = (0..rows * outputs)
        .map(|i| {
            let (r, o) = (i / outputs, i % outputs);
            (0..inputs)
                .map(|k| xh[r * inputs + k] as f64 * wh[k * outputs + o] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    let y = to_vec(<K<R> as JambaBackend>::projection(x, w, None));
    assert_close(
        "bf16 split-k projection 600 x 2048 -> 96",
        &y,
        &expected,
        1e-2,
    );
}

/// cubek's TMA kernel for half-precision products of many rows (`matmul_tma`, which the
/// projections and the batched experts take on sm_90+): a prefill's in_proj shape and two
/// small ones, plain (as the projections call it) and batched (as the experts do), against
/// the f64 product of the same rounded operands at sampled outputs: one rounding of the output
/// (bf16's unit roundoff is 3.9e-3) over f32 accumulation. The plain products must take the
/// kernel; a batched one it refuses must still come out right through the fallback.
#[cfg(feature = "cuda")]
#[test]
fn cuda_tma_products_match_the_product() {
    use jamba::kernels::matmul;
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let shapes = [
        (1usize, 2048usize, 1024usize, 4096usize),
        (1, 256, 512, 1024),
        (1, 136, 64, 200),
        (3, 256, 512, 1024),
    ];
    for &(batch, rows, inputs, outputs) in &shapes {
        let x = Tensor::<K<R>, 3>::from_data(
            TensorData::new(
                rng.normal(batch * rows * inputs, 0.0, 1.0),
                [batch, rows, inputs],
            ),
            &device,
        )
        .cast(DType::BF16);
        let w = Tensor::<K<R>, 3>::from_data(
            TensorData::new(
                rng.normal(batch * inputs * outputs, 0.0, 1.0 / (inputs as f64).sqrt()),
                [batch, inputs, outputs],
            ),
            &device,
        )
        .cast(DType::BF16);
        let (xh, wh) = (to_vec(x.clone()), to_vec(w.clone()));
        let picks: Vec<usize> = (0..512)
            .map(|_| (rng.0.next_u64() % (batch * rows * outputs) as u64) as usize)
            .collect();
        let expected: Vec<f32> = picks
            .iter()
            .map(|&i| {
                let (b, r, o) = (i / (rows * outputs), (i / outputs) % rows, i % outputs);
                (0..inputs)
                    .map(|k| {
                        xh[(b * rows + r) * inputs + k] as f64
                            * wh[(b * inputs + k) * outputs + o] as f64
                    })
                    .sum::<f64>() as f32
            })
            .collect();
        let sampled = |y: Vec<f32>| picks.iter().map(|&i| y[i]).collect::<Vec<f32>>();
        let name = format!("bf16 TMA product {batch} x {rows} x {inputs} -> {outputs}");
        let strategy = matmul::strategy("specialized_tma_mma").expect("a known strategy");
        let (lhs, rhs) = if batch == 1 {
            (
                prim(x.clone().reshape([rows, inputs])),
                prim(w.clone().reshape([inputs, outputs])),
            )
        } else {
            (prim(x.clone()), prim(w.clone()))
        };
        match matmul::matmul_with(lhs, rhs, &strategy) {
            Ok(y) => {
                let y = if batch == 1 {
                    to_vec(wrap::<R, 2>(y))
                } else {
                    to_vec(wrap::<R, 3>(y))
                };
                assert_close(&name, &sampled(y), &expected, 1e-2);
            }
            Err(e) if batch > 1 => eprintln!("{name}: refused ({e}); the fallback runs"),
            Err(e) => panic!("{name}: the TMA kernel refused a projection's product: {e}"),
        }
        let y = if batch == 1 {
            <K<R> as JambaBackend>::projection(x, w.reshape([inputs, outputs]), None)
        } else {
            <K<R> as JambaBackend>::batched_matmul(x, w)
        };
        assert_close(
            &format!("{name}, through the model's op"),
            &sampled(to_vec(y)),
            &expected,
            1e-2,
        );
    }
}

/// The device-routed experts with bf16 and f16 tensors: the reference rounds each product, the
/// SiLU, the gate's product, each expert's weighted output (a few unit roundoffs: bf16's is
/// 3.9e-3, f16's 4.9e-4).
#[cfg(feature = "cuda")]
#[test]
fn cuda_routed_experts_take_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    routed_experts_grid::<R>(&Default::default(), DType::BF16, 2e-2);
    routed_experts_grid::<R>(&Default::default(), DType::F16, 3e-3);
}

/// Half-precision inputs (f32 arithmetic inside): the state must match to f32 precision and `y`
/// to the rounding of its half-precision store.
#[cfg(feature = "cuda")]
#[test]
fn cuda_scan_kernel_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    let device = Default::default();
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    for (dtype, tolerance) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for &(batch, seq, channels, state) in &[
            (1usize, 1usize, 7usize, 16usize),
            (2, 300, 37, 16),
            (3, 64, 19, 4),
        ] {
            let mut p = Problem::random(&mut rng, batch, seq, channels, state, [true; 4]);
            check_scan::<R>(
                &format!("{dtype:?} seq {seq}"),
                &mut p,
                dtype,
                tolerance,
                &device,
            );
        }
    }
}

/// The fused Mamba step in bf16 and f16 against the separate operations in the same dtype: both
/// round the same intermediates to the half type, so they differ by summation order, which can
/// flip a rounding of a stored intermediate (bf16's unit roundoff 3.9e-3, f16's 4.9e-4).
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_mamba_step_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    mamba_step_grid::<R>(&Default::default(), DType::BF16, 2e-2);
    mamba_step_grid::<R>(&Default::default(), DType::F16, 3e-3);
}

/// The SwiGLU gate kernel in bf16 and f16: SiLU rounded once, then the product rounded, as the
/// composition (in f32, then rounded) does; a different last bit of `exp` can flip a rounding.
#[cfg(feature = "cuda")]
#[test]
fn cuda_silu_mul_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    silu_mul_grid::<R>(&Default::default(), DType::BF16, 1e-2);
    silu_mul_grid::<R>(&Default::default(), DType::F16, 2e-3);
}

/// The fused MLP in bf16 and f16 against the separate operations in the same dtype. Burn's SiLU
/// rounds each of its six element-wise steps to the half type where the kernel rounds SiLU once
/// (as PyTorch does), so they differ by a few roundings.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_mlp_takes_half_inputs() {
    type R = jamba::burn_cubecl::cubecl::cuda::CudaRuntime;
    swiglu_grid::<R>(&Default::default(), DType::BF16, 2e-2);
    swiglu_grid::<R>(&Default::default(), DType::F16, 3e-3);
    mlp_normed_grid::<R>(&Default::default(), DType::BF16, 2e-2);
    mlp_normed_grid::<R>(&Default::default(), DType::F16, 3e-3);
    normed_projections_grid::<R>(&Default::default(), DType::BF16, 2e-2);
    normed_projections_grid::<R>(&Default::default(), DType::F16, 3e-3);
}
