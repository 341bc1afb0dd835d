//! The GPU backends' operations against the CPU backend's on the same seeded inputs: the
//! model's (`JambaBackend`: the scan and its backward, the convolution, products) and the
//! engine's (every method of its concept traits, fused kernels on CubeCL, tensor-op defaults
//! or host loops on the CPU), with `tiny-jamba`'s layers for weights. The kernels' own tests
//! (against f64 definitions) are in `jamba-kernels/tests`; these check what the engine builds
//! on them, including each implementation's fallback where a kernel declines a shape.
#![cfg(all(any(feature = "wgpu", feature = "cuda"), feature = "flex"))]

mod common;

use burn::tensor::{Bool, Int, Tensor, TensorData};
use common::scan_problem::{Problem, Rng};
use jamba::backends::Cpu;
use jamba::cache::MambaState;
use jamba::engine::ScanParams;
use jamba::generation::SplitMix64;
use jamba::model::{FeedForward, Mixer};
use jamba::engine::ops::{
    AttentionOps, DeviceOps, FeedForwardOps, LinearOps, MambaOps, NormOps,
};
use jamba::ops::{ConvInput, JambaBackend};
use jamba::reference::{rel_err, to_vec};
use jamba::{EngineBackend, Jamba, LoadOptions};

/// The GPU backends under test.
trait Gpu: EngineBackend {}
#[cfg(feature = "wgpu")]
impl Gpu for jamba::backends::Wgpu {}
#[cfg(feature = "cuda")]
impl Gpu for jamba::backends::Cuda {}

fn assert_close(name: &str, ours: &[f32], expected: &[f32], tolerance: f64) {
    let err = rel_err(ours, expected);
    assert!(
        err <= tolerance && ours.iter().all(|x| x.is_finite()),
        "{name}: rel. error {err:.3e} (tolerance {tolerance:.0e}); {} non-finite",
        ours.iter().filter(|x| !x.is_finite()).count()
    );
}

/// `t`'s values on another backend.
fn moved<A: EngineBackend, B: EngineBackend, const D: usize>(t: &Tensor<A, D>, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(t.to_data(), device)
}

/// Standard normal values from the seeded generator, on the CPU.
fn random<const D: usize>(rng: &mut Rng, shape: [usize; D]) -> Tensor<Cpu, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(rng.normal(n, 0.0, 1.0), shape), &Default::default())
}

/// `tiny-jamba` on both backends.
fn models<G: Gpu>(device: &G::Device) -> (Jamba<Cpu>, Jamba<G>) {
    let dir = common::fixture("tiny-jamba");
    let options = LoadOptions::default();
    (
        Jamba::<Cpu>::from_pretrained(&dir, &Default::default(), &options).unwrap(),
        Jamba::<G>::from_pretrained(&dir, device, &options).unwrap(),
    )
}

const TOL: f64 = 1e-5;

/// The scan kernel through `JambaBackend::selective_scan` against the CPU's host loop and the
/// f64 definition, with `z` a strided slice of a wider tensor (as in the mixer).
fn scan_kernel_matches_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(30));
    for &(batch, seq, channels, state) in &[(2usize, 70usize, 24usize, 16usize), (1, 1, 40, 8), (3, 9, 5, 4)] {
        let p = Problem::random(&mut rng, batch, seq, channels, state, [true; 4]);
        let expected = p.expected();
        let cpu = Cpu::selective_scan(p.input(&Default::default()));
        let mut input = p.input::<G>(device);
        let z = input.z.take().unwrap();
        let wide = Tensor::cat(vec![z.clone(), z * 3.0], 2);
        input.z = Some(wide.slice([0..batch, 0..seq, 0..channels]));
        let gpu = G::selective_scan(input);
        let tag = format!("scan {batch}x{seq}x{channels} state {state}");
        assert_close(&format!("{tag}: y"), &to_vec(gpu.y), &expected.0, TOL);
        assert_close(&format!("{tag}: state"), &to_vec(gpu.state), &expected.1, TOL);
        assert_close(&format!("{tag}: cpu y"), &to_vec(cpu.y), &expected.0, TOL);
    }
}

include!("common/scan_grads.rs");

/// The convolution kernel against the CPU's host loop: bias, prefix, SiLU, and a transposed
/// weight.
fn conv_kernel_matches_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(32));
    for &(batch, seq, channels, k) in &[(2usize, 33usize, 40usize, 4usize), (1, 1, 7, 3), (3, 5, 16, 2)] {
        let x = random(&mut rng, [batch, seq, channels]);
        let weight = random(&mut rng, [k, channels]);
        let bias = random(&mut rng, [1, channels]).reshape([channels]);
        let prefix = random(&mut rng, [batch, k - 1, channels]);
        let cpu = Cpu::causal_conv1d(ConvInput {
            x: x.clone(),
            weight: weight.clone().transpose(),
            bias: Some(bias.clone()),
            prefix: Some(prefix.clone()),
            silu: true,
        });
        let gpu = G::causal_conv1d(ConvInput {
            x: moved(&x, device),
            weight: moved::<Cpu, G, 2>(&weight, device).transpose(),
            bias: Some(moved(&bias, device)),
            prefix: Some(moved(&prefix, device)),
            silu: true,
        });
        let tag = format!("conv {batch}x{seq}x{channels} k {k}");
        assert_close(&format!("{tag}: y"), &to_vec(gpu.y), &to_vec(cpu.y), TOL);
        assert_close(&format!("{tag}: state"), &to_vec(gpu.state), &to_vec(cpu.state), 0.0);
    }
}

/// The engine's norms and products of every width of the model, at row counts inside and past
/// each kernel's limits (the GEMV's 16, the folded norm's 4), against the CPU's.
fn norms_and_products_match_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(33));
    let (cpu, gpu) = models::<G>(device);
    for (lc, lg) in cpu.layers.iter().zip(&gpu.layers) {
        let (nc, ng) = (&lc.input_layernorm, &lg.input_layernorm);
        let hidden = cpu.config().hidden_size;
        for rows in [1usize, 3, 4, 16, 40] {
            let (x, p, s) = (random(&mut rng, [1, rows, hidden]), random(&mut rng, [1, rows, hidden]), random(&mut rng, [1, rows, hidden]));
            let (xg, pg, sg) = (moved::<Cpu, G, 3>(&x, device), moved::<Cpu, G, 3>(&p, device), moved::<Cpu, G, 3>(&s, device));
            let tag = format!("rows {rows}");
            assert_close(&format!("rms_norm, {tag}"), &to_vec(G::rms_norm(xg.clone(), ng)), &to_vec(Cpu::rms_norm(x.clone(), nc)), TOL);
            let (sum_g, norm_g) = G::add2_rms_norm(xg.clone(), pg.clone(), sg.clone(), ng);
            let (sum_c, norm_c) = Cpu::add2_rms_norm(x.clone(), p.clone(), s.clone(), nc);
            assert_close(&format!("add2_rms_norm sum, {tag}"), &to_vec(sum_g), &to_vec(sum_c), 0.0);
            assert_close(&format!("add2_rms_norm, {tag}"), &to_vec(norm_g), &to_vec(norm_c), TOL);
            let weights = match (&lc.mixer, &lg.mixer) {
                (Mixer::Attention(a), Mixer::Attention(b)) => vec![
                    (a.q_proj.weight.val(), b.q_proj.weight.val()),
                    (a.k_proj.weight.val(), b.k_proj.weight.val()),
                    (a.v_proj.weight.val(), b.v_proj.weight.val()),
                ],
                (Mixer::Mamba(a), Mixer::Mamba(b)) => vec![(a.in_proj.weight.val(), b.in_proj.weight.val())],
                _ => unreachable!("one fixture on both backends"),
            };
            for (wc, wg) in &weights {
                let want = Cpu::project(x.clone(), wc.clone(), None);
                assert_close(&format!("project, {tag}"), &to_vec(G::project(xg.clone(), wg.clone(), None)), &to_vec(want), TOL);
                let want = Cpu::project_normed(&x, Some(&p), nc, wc.clone(), None);
                let got = G::project_normed(&xg, Some(&pg), ng, wg.clone(), None);
                assert_close(&format!("project_normed, {tag}"), &to_vec(got), &to_vec(want), TOL);
            }
            if let [(q, qg), (k, kg), (v, vg)] = &weights[..] {
                let want = Cpu::project_normed_many(&x, None, nc, [q.clone(), k.clone(), v.clone()]);
                let got = G::project_normed_many(&xg, None, ng, [qg.clone(), kg.clone(), vg.clone()]);
                for (i, (g, c)) in got.into_iter().zip(want).enumerate() {
                    assert_close(&format!("project_normed_many {i}, {tag}"), &to_vec(g), &to_vec(c), TOL);
                }
            }
        }
    }
    // The head: 512 outputs.
    let head_c = cpu.lm_head.as_ref().unwrap().weight.val();
    let head_g = gpu.lm_head.as_ref().unwrap().weight.val();
    let x = random(&mut rng, [2, 1, cpu.config().hidden_size]);
    assert_close(
        "head",
        &to_vec(G::project(moved(&x, device), head_g, None)),
        &to_vec(Cpu::project(x, head_c, None)),
        TOL,
    );
}

/// The fused Mamba step (one launch for up to four rows, two past it) against the CPU's separate
/// operations, four steps from a random state: the output and both new states.
fn mamba_step_matches_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(34));
    let (cpu, gpu) = models::<G>(device);
    for (lc, lg) in cpu.layers.iter().zip(&gpu.layers) {
        let (Mixer::Mamba(mc), Mixer::Mamba(mg)) = (&lc.mixer, &lg.mixer) else { continue };
        let (pc, pg) = (ScanParams::new(mc), ScanParams::new(mg));
        let inner = mc.intermediate_size();
        for batch in [1usize, 3, 6] {
            let conv = random(&mut rng, [batch, mc.d_conv() - 1, inner]);
            let ssm = random(&mut rng, [batch, inner, mc.d_state]);
            let mut sc = MambaState { conv: conv.clone(), ssm: ssm.clone() };
            let mut sg = MambaState::<G> { conv: moved(&conv, device), ssm: moved(&ssm, device) };
            for step in 0..4 {
                let xz = random(&mut rng, [batch, 1, 2 * inner]).reshape([batch, 2 * inner]);
                let yc = Cpu::mamba_step(mc, &pc, xz.clone(), &mut sc);
                let yg = G::mamba_step(mg, &pg, moved(&xz, device), &mut sg);
                let tag = format!("mamba step, batch {batch}, step {step}");
                assert_close(&format!("{tag}: y"), &to_vec(yg), &to_vec(yc), 2e-5);
                assert_close(&format!("{tag}: conv"), &to_vec(sg.conv.clone()), &to_vec(sc.conv.clone()), 0.0);
                assert_close(&format!("{tag}: ssm"), &to_vec(sg.ssm.clone()), &to_vec(sc.ssm.clone()), 2e-5);
            }
        }
    }
}

/// One-query attention over keys and values read in place from a preallocated buffer, with a
/// padding mask that hides some keys of one row and all of another (which gives zeros).
fn decode_attention_matches_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(35));
    for &(batch, heads, kv_heads, dim, keys) in &[(2usize, 4usize, 2usize, 16usize, 9usize), (3, 8, 2, 32, 300), (1, 2, 2, 30, 5)] {
        let q = random(&mut rng, [batch, heads, dim]);
        let kv = random(&mut rng, [batch, kv_heads, keys + 4, dim]);
        let v = kv.clone().exp();
        let view = [0..batch, 0..kv_heads, 0..keys];
        let hidden: Vec<bool> = (0..batch * keys)
            .map(|i| (i / keys == 0 && i % keys < keys / 3) || (batch > 1 && i / keys == batch - 1))
            .collect();
        let hidden_c = Tensor::<Cpu, 2, Bool>::from_data(TensorData::new(hidden.clone(), [batch, keys]), &Default::default());
        let hidden_g = Tensor::<G, 2, Bool>::from_data(TensorData::new(hidden, [batch, keys]), device);
        let scale = 1.0 / (dim as f64).sqrt();
        let want = Cpu::decode_attention(q.clone(), kv.clone().slice(view.clone()), v.clone().slice(view.clone()), Some(hidden_c), scale);
        let got = G::decode_attention(
            moved(&q, device),
            moved::<Cpu, G, 4>(&kv, device).slice(view.clone()),
            moved::<Cpu, G, 4>(&v, device).slice(view),
            Some(hidden_g),
            scale,
        );
        assert_close(&format!("decode attention b {batch} heads {heads}/{kv_heads} dim {dim} keys {keys}"), &to_vec(got), &to_vec(want), TOL);
    }
}

/// The feed-forward operations of every layer: routing, the experts of one to 40 tokens (the
/// device kernel, flex's host loop, the grouped and batched forms), the folded MoE and MLP
/// blocks, the dense MLP, the SwiGLU gate, and the argmax.
fn feed_forward_ops_match_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(36));
    let (cpu, gpu) = models::<G>(device);
    let hidden = cpu.config().hidden_size;
    for (lc, lg) in cpu.layers.iter().zip(&gpu.layers) {
        let (nc, ng) = (&lc.pre_ff_layernorm, &lg.pre_ff_layernorm);
        for rows in [1usize, 3, 4, 20, 40] {
            let (x, f, s) = (random(&mut rng, [rows, hidden]), random(&mut rng, [rows, hidden]), random(&mut rng, [rows, hidden]));
            let (xg, fg, sg) = (moved::<Cpu, G, 2>(&x, device), moved::<Cpu, G, 2>(&f, device), moved::<Cpu, G, 2>(&s, device));
            let tag = format!("rows {rows}");
            match (&lc.feed_forward, &lg.feed_forward) {
                (FeedForward::Moe(mc), FeedForward::Moe(mg)) => {
                    let logits = random(&mut rng, [rows, mc.num_experts()]);
                    let (wc, ec) = Cpu::route(logits.clone(), mc.top_k);
                    let (wg, eg) = G::route(moved(&logits, device), mc.top_k);
                    assert_eq!(ids(eg), ids(ec), "route experts, {tag}");
                    assert_close(&format!("route weights, {tag}"), &to_vec(wg), &to_vec(wc), 1e-6);
                    let want = Cpu::moe_experts(x.clone(), logits.clone(), &mc.experts, mc.top_k);
                    let got = G::moe_experts(xg.clone(), moved(&logits, device), &mg.experts, mg.top_k);
                    assert_close(&format!("moe_experts, {tag}"), &to_vec(got), &to_vec(want), TOL);
                    let want = Cpu::moe_normed(x.clone(), Some(f.clone()), s.clone(), nc, mc);
                    let got = G::moe_normed(xg.clone(), Some(fg.clone()), sg.clone(), ng, mg);
                    for (name, (g, c)) in ["residual", "output", "router logits"].iter().zip(got.into_iter().zip(want)) {
                        assert_close(&format!("moe_normed {name}, {tag}"), &to_vec(g), &to_vec(c), TOL);
                    }
                }
                (FeedForward::Mlp(mc), FeedForward::Mlp(mg)) => {
                    let want = Cpu::mlp(x.clone(), mc);
                    assert_close(&format!("mlp, {tag}"), &to_vec(G::mlp(xg.clone(), mg)), &to_vec(want), TOL);
                    let want = Cpu::mlp_normed(x.clone(), Some(f.clone()), s.clone(), nc, mc);
                    let got = G::mlp_normed(xg.clone(), Some(fg.clone()), sg.clone(), ng, mg);
                    for (name, (g, c)) in ["residual", "output"].iter().zip(got.into_iter().zip(want)) {
                        assert_close(&format!("mlp_normed {name}, {tag}"), &to_vec(g), &to_vec(c), TOL);
                    }
                }
                _ => unreachable!("one fixture on both backends"),
            }
            let want = Cpu::silu_mul(x.clone(), f.clone());
            assert_close(&format!("silu_mul, {tag}"), &to_vec(G::silu_mul(xg.clone(), fg.clone())), &to_vec(want), 1e-6);
        }
    }
    for (rows, width) in [(1usize, 512usize), (3, 65_536), (2, 5003)] {
        let x = random(&mut rng, [rows, width]);
        assert_eq!(ids(G::argmax_rows(moved(&x, device))), ids(Cpu::argmax_rows(x)), "argmax {rows} x {width}");
    }
}

fn ids<B: EngineBackend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec().unwrap()
}

/// The model's f32 products on the GPU (kept off TF32 tensor cores) against the CPU's.
fn products_match_the_cpu<G: Gpu>(device: &G::Device) {
    let mut rng = Rng(SplitMix64::new(37));
    for &(rows, k, n) in &[(1usize, 64usize, 512usize), (300, 128, 96), (2048, 64, 64)] {
        let x = random(&mut rng, [1, rows, k]);
        let w = random(&mut rng, [k, n]);
        let b = random(&mut rng, [1, n]).reshape([n]);
        let want = <Cpu as JambaBackend>::projection(x.clone(), w.clone(), Some(b.clone()));
        let got = <G as JambaBackend>::projection(moved(&x, device), moved(&w, device), Some(moved(&b, device)));
        assert_close(&format!("projection {rows} x {k} -> {n}"), &to_vec(got), &to_vec(want), TOL);
    }
}

macro_rules! gpu_tests {
    ($module:ident, $backend:ty, $feature:literal) => {
        #[cfg(feature = $feature)]
        mod $module {
            type G = $backend;
            #[test]
            fn scan_kernel_matches_the_cpu() {
                super::scan_kernel_matches_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn scan_backward_kernel_matches_autodiff_of_tensor_ops() {
                super::scan_backward_kernel_matches_autodiff_of_tensor_ops::<G>(&Default::default());
            }
            #[test]
            fn conv_kernel_matches_the_cpu() {
                super::conv_kernel_matches_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn products_match_the_cpu() {
                super::products_match_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn norms_and_products_match_the_cpu() {
                super::norms_and_products_match_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn mamba_step_matches_the_cpu() {
                super::mamba_step_matches_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn decode_attention_matches_the_cpu() {
                super::decode_attention_matches_the_cpu::<G>(&Default::default());
            }
            #[test]
            fn feed_forward_ops_match_the_cpu() {
                super::feed_forward_ops_match_the_cpu::<G>(&Default::default());
            }
        }
    };
}

gpu_tests!(wgpu, jamba::backends::Wgpu, "wgpu");
gpu_tests!(cuda, jamba::backends::Cuda, "cuda");
