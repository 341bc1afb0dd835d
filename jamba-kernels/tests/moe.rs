//! The mixture of experts of a few tokens with the routing on the device: the router's
//! softmax and top-k, the routed expert MLPs (stage by stage where they fail), and the fused
//! input side (residual sums, norm, router) ahead of them.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use common::{K, MoeProblem, Rng, assert_close, host, host_ids, prim, rel_err, to_vec, wrap};
use jamba_kernels::{gemv, moe, norm};

/// The router's softmax and top-k for many tokens (`moe::route`, the grouped experts' routing)
/// against an f64 loop on the same rounded logits: the experts exactly (ranked by value, an
/// equal logit at a lower index first: rows with planted ties check it), the weights to the
/// dtype's rounding. Shapes: one token, a prefill's 2048 tokens of 16 experts, top-k of every
/// expert, a transposed (strided) view.
fn route_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(12);
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
        let rounded_logits = to_vec(logits.clone());
        let mut want_w = Vec::new();
        let mut want_e = Vec::new();
        for row in rounded_logits.chunks_exact(experts) {
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
        assert_eq!(host_ids::<R, 1>(chosen), want_e, "{name}: experts");
        assert_close(&name, &host::<R, 1>(weights), &want_w, tolerance);
    }
}

/// The device-routed mixture of experts against an f64 loop (softmax, top-k by probability,
/// `Σⱼ pⱼ · down(silu(gate·x) · up·x)`): one token to [`moe::MAX_SLOTS`] (token, expert) pairs,
/// top 1 to 4, widths that fill no cube evenly, `x` a window of wider rows. Inputs are rounded to
/// `dtype` first; the output buffer's memory held NaN just before the call (a pool reuses it),
/// so an element left unwritten fails. Every case runs before the verdict, and a failing case
/// names the first wrong stage (each stage checked on the previous stage's device output).
fn routed_experts_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(13);
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
        let mut p = MoeProblem::random(&mut rng, dims);
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
fn routed_stage_errors<R: CubeRuntime>(p: &MoeProblem, s: moe::RoutedStages<R>) -> String {
    let (hidden, inner, top_k) = (p.hidden, p.inner, p.top_k);
    let slots = p.tokens * top_k;
    let indices: Vec<usize> = host_ids::<R, 1>(s.indices)
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

/// A MoE layer's fused input side (`routed_experts_normed`: the residual sums, the norm, the
/// router and the routing in one launch, then the experts) against the separate kernels on the
/// same device (the residual norm, the router's GEMV, `routed_experts`), with and without the
/// first update: tokens one to the slot limit, 4 to 64 experts, widths not multiples of a
/// cube's units.
fn routed_normed_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(14);
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
                        wrap::<R, 2>(gemv::gemv(prim(rows), prim(router.clone()), None))
                    })
                    .collect(),
                0,
            ));
            let y = moe::routed_experts(prim(normed), logits.clone(), weights, top_k);
            let host2 = |t: CubeTensor<R>, d: usize| {
                let t = wrap::<R, 2>(t);
                assert_eq!(t.dims()[1], d, "{name}");
                to_vec(t.cast(DType::F32))
            };
            let res_want = to_vec(wrap::<R, 3>(residual).cast(DType::F32));
            assert_close(
                &format!("{name}, residual"),
                &host2(out.residual, hidden),
                &res_want,
                0.0,
            );
            assert_close(
                &format!("{name}, logits"),
                &host2(out.logits, experts),
                &host2(logits, experts),
                tolerance,
            );
            assert_close(
                &format!("{name}, output"),
                &host2(out.y, hidden),
                &host2(y, hidden),
                tolerance,
            );
        }
    }
}


fn route_kernel_matches_softmax_top_k<R: CubeRuntime>(device: &R::Device) {
    route_grid::<R>(device, DType::F32, 1e-6);
}

fn routed_experts_kernel_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    routed_experts_grid::<R>(device, DType::F32, 1e-5);
}

fn normed_routing_matches_the_separate_kernels<R: CubeRuntime>(device: &R::Device) {
    routed_normed_grid::<R>(device, DType::F32, 1e-5);
}

/// bf16 and f16: the experts exactly, the weights to the output's rounding (unit roundoff
/// 3.9e-3 for bf16, 4.9e-4 for f16); the routed experts round each product, the SiLU, the
/// gate's product and each expert's weighted output (a few unit roundoffs).
fn moe_kernels_take_half_inputs<R: CubeRuntime>(device: &R::Device) {
    route_grid::<R>(device, DType::BF16, 4e-3);
    route_grid::<R>(device, DType::F16, 5e-4);
    routed_experts_grid::<R>(device, DType::BF16, 2e-2);
    routed_experts_grid::<R>(device, DType::F16, 3e-3);
    routed_normed_grid::<R>(device, DType::BF16, 2e-2);
}

runtime_tests!(
    route_kernel_matches_softmax_top_k,
    routed_experts_kernel_matches_the_definition,
    normed_routing_matches_the_separate_kernels;
    cuda: moe_kernels_take_half_inputs,
);
