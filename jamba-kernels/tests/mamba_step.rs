//! A Mamba mixer's decoding step between `in_proj` and `out_proj` (one launch for a few rows,
//! two otherwise) against an f64 loop of the definition.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, host, prim};
use jamba_kernels::mamba_step;

/// One step's operands on the host, `[in, out]` weights.
struct Step {
    batch: usize,
    inner: usize,
    state: usize,
    rank: usize,
    d_conv: usize,
    xz: Vec<f32>,
    conv_state: Vec<f32>,
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    x_proj: Vec<f32>,
    norms: [Vec<f32>; 3],
    dt_proj: Vec<f32>,
    dt_bias: Vec<f32>,
    a_log: Vec<f32>,
    d: Vec<f32>,
    ssm: Vec<f32>,
}

const EPS: f64 = 1e-6;

impl Step {
    /// Every parameter random (no structured `A_log` or unit `D` that would hide a transposed
    /// index).
    fn random(rng: &mut Rng, [batch, inner, state, rank, d_conv]: [usize; 5], bias: bool) -> Self {
        let outputs = rank + 2 * state;
        Self {
            batch,
            inner,
            state,
            rank,
            d_conv,
            xz: rng.normal(batch * 2 * inner, 0.0, 1.0),
            conv_state: rng.normal(batch * (d_conv - 1) * inner, 0.0, 1.0),
            conv_weight: rng.uniform(inner * d_conv, -0.5, 0.5),
            conv_bias: bias.then(|| rng.uniform(inner, -0.5, 0.5)),
            x_proj: rng.normal(inner * outputs, 0.0, 1.0 / (inner as f64).sqrt()),
            norms: [
                rng.uniform(rank, 0.5, 1.5),
                rng.uniform(state, 0.5, 1.5),
                rng.uniform(state, 0.5, 1.5),
            ],
            dt_proj: rng.normal(rank * inner, 0.0, 1.0 / (rank as f64).sqrt()),
            dt_bias: rng.uniform(inner, -4.0, -1.0),
            a_log: rng.uniform(inner * state, -1.0, 1.5),
            d: rng.uniform(inner, -1.0, 2.0),
            ssm: rng.normal(batch * inner * state, 0.0, 1.0),
        }
    }

    /// `(y, new conv state, new SSM state)` in f64.
    fn expected(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (b, i, n, r, k) = (self.batch, self.inner, self.state, self.rank, self.d_conv);
        let outputs = r + 2 * n;
        let silu = |v: f64| v / (1.0 + (-v).exp());
        let rms = |v: &[f64], w: &[f32]| -> Vec<f64> {
            let scale = 1.0 / (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64 + EPS).sqrt();
            v.iter().zip(w).map(|(x, &w)| x * scale * w as f64).collect()
        };
        let (mut y, mut conv, mut ssm) = (vec![0f32; b * i], vec![0f32; b * (k - 1) * i], self.ssm.clone());
        for row in 0..b {
            let x = |c: usize| self.xz[row * 2 * i + c] as f64;
            let window = |j: usize, c: usize| -> f64 {
                if j < k - 1 { self.conv_state[(row * (k - 1) + j) * i + c] as f64 } else { x(c) }
            };
            let u: Vec<f64> = (0..i)
                .map(|c| {
                    let acc = (0..k).map(|j| self.conv_weight[c * k + j] as f64 * window(j, c)).sum::<f64>()
                        + self.conv_bias.as_ref().map_or(0.0, |b| b[c] as f64);
                    silu(acc)
                })
                .collect();
            for j in 0..k - 1 {
                for c in 0..i {
                    conv[(row * (k - 1) + j) * i + c] = window(j + 1, c) as f32;
                }
            }
            let dbc: Vec<f64> = (0..outputs)
                .map(|o| (0..i).map(|c| u[c] * self.x_proj[c * outputs + o] as f64).sum())
                .collect();
            let dt = rms(&dbc[..r], &self.norms[0]);
            let bm = rms(&dbc[r..r + n], &self.norms[1]);
            let cm = rms(&dbc[r + n..], &self.norms[2]);
            for c in 0..i {
                let pre = (0..r).map(|q| dt[q] * self.dt_proj[q * i + c] as f64).sum::<f64>()
                    + self.dt_bias[c] as f64;
                let delta = if pre > 20.0 { pre } else { pre.exp().ln_1p() };
                let mut out = 0.0;
                for s in 0..n {
                    let a = -(self.a_log[c * n + s] as f64).exp();
                    let h = &mut ssm[(row * i + c) * n + s];
                    let next = (delta * a).exp() * *h as f64 + delta * bm[s] * u[c];
                    *h = next as f32;
                    out += cm[s] * next;
                }
                out += self.d[c] as f64 * u[c];
                y[row * i + c] = (out * silu(self.xz[row * 2 * i + i + c] as f64)) as f32;
            }
        }
        (y, conv, ssm)
    }

    fn tensors<R: CubeRuntime>(&self, device: &R::Device) -> mamba_step::MambaStepTensors<R> {
        fn up<R: CubeRuntime, const D: usize>(v: &[f32], shape: [usize; D], device: &R::Device) -> burn_cubecl::tensor::CubeTensor<R> {
            prim(Tensor::<K<R>, D>::from_data(TensorData::new(v.to_vec(), shape), device))
        }
        let (b, i, n, r, k) = (self.batch, self.inner, self.state, self.rank, self.d_conv);
        mamba_step::MambaStepTensors {
            xz: up::<R, 2>(&self.xz, [b, 2 * i], device),
            conv_state: up::<R, 3>(&self.conv_state, [b, k - 1, i], device),
            conv_weight: up::<R, 2>(&self.conv_weight, [i, k], device),
            conv_bias: self.conv_bias.as_ref().map(|v| up::<R, 1>(v, [i], device)),
            x_proj: up::<R, 2>(&self.x_proj, [i, r + 2 * n], device),
            dt_norm: up::<R, 1>(&self.norms[0], [r], device),
            b_norm: up::<R, 1>(&self.norms[1], [n], device),
            c_norm: up::<R, 1>(&self.norms[2], [n], device),
            eps: EPS,
            dt_proj: up::<R, 2>(&self.dt_proj, [r, i], device),
            dt_bias: Some(up::<R, 1>(&self.dt_bias, [i], device)),
            a_log: up::<R, 2>(&self.a_log, [i, n], device),
            d: up::<R, 1>(&self.d, [i], device),
            ssm_state: up::<R, 3>(&self.ssm, [b, i, n], device),
        }
    }
}

/// Widths not multiples of the kernels' channels per cube, conv widths 2 to 8, states and ranks
/// of several sizes, batches of one and three (one launch) and six (two): the output and both
/// new states. In f32 the kernel and the loop differ by the order of `x_proj`'s sums and the
/// exponentials' fast-math forms, carried through the recurrence into `y`, where `D · u` can
/// cancel `C · h`. (No rank or state of 1: the norm of one value, `x / √(x² + ε)`, has a
/// condition number up to `1/√ε`.)
fn mamba_step_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(20);
    let mut forms = [0usize; 2];
    for &(dims, bias) in &[
        ([1usize, 37usize, 16usize, 3usize, 4usize], true),
        ([3, 128, 16, 8, 4], false),
        ([6, 300, 4, 20, 2], true),
        ([1, 256, 2, 2, 3], true),
        ([3, 200, 64, 13, 8], false),
        ([6, 1024, 16, 64, 4], true),
    ] {
        let step = Step::random(&mut rng, dims, bias);
        let [batch, inner, state, rank, d_conv] = dims;
        assert!(mamba_step::supports(d_conv, rank, state));
        let tensors = step.tensors::<R>(device);
        forms[usize::from(mamba_step::takes_one_launch(&tensors.x_proj, batch, state))] += 1;
        let (y, conv, ssm) = mamba_step::mamba_step(tensors);
        let (y_want, conv_want, ssm_want) = step.expected();
        let name = format!("inner {inner} N {state} rank {rank} d_conv {d_conv} bias {bias} batch {batch}");
        assert_close(&format!("y, {name}"), &host::<R, 2>(y), &y_want, 2e-5);
        assert_close(&format!("conv state, {name}"), &host::<R, 3>(conv), &conv_want, 0.0);
        assert_close(&format!("SSM state, {name}"), &host::<R, 3>(ssm), &ssm_want, 2e-5);
    }
    assert!(forms.iter().all(|&n| n > 0), "cases per form (two launches, one): {forms:?}");
}

/// bf16 and f16 against the f32 kernel on the same rounded operands: the half kernel rounds the
/// conv output, `x_proj`'s and the norms' outputs and `y` to the half type, so a few unit
/// roundoffs apart (bf16's is 3.9e-3, f16's 4.9e-4).
fn mamba_step_takes_half_inputs<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(21);
    for (dtype, tolerance) in [(DType::BF16, 3e-2), (DType::F16, 4e-3)] {
        for &dims in &[[1usize, 256usize, 16usize, 16usize, 4usize], [6, 512, 16, 32, 4]] {
            let mut step = Step::random(&mut rng, dims, true);
            let round = |v: &mut Vec<f32>| {
                let n = v.len();
                let t = Tensor::<K<R>, 1>::from_data(TensorData::new(v.clone(), [n]), device).cast(dtype);
                *v = common::to_vec(t);
            };
            for v in [
                &mut step.xz,
                &mut step.conv_state,
                &mut step.conv_weight,
                &mut step.x_proj,
                &mut step.dt_proj,
                &mut step.dt_bias,
                &mut step.a_log,
                &mut step.d,
            ] {
                round(v);
            }
            step.conv_bias.iter_mut().for_each(round);
            step.norms.iter_mut().for_each(round);
            let full = step.tensors::<R>(device);
            let cast = |t: burn_cubecl::tensor::CubeTensor<R>| prim(common::wrap::<R, 1>(t).cast(dtype));
            let half = mamba_step::MambaStepTensors {
                xz: prim(common::wrap::<R, 2>(full.xz.clone()).cast(dtype)),
                conv_state: prim(common::wrap::<R, 3>(full.conv_state.clone()).cast(dtype)),
                conv_weight: prim(common::wrap::<R, 2>(full.conv_weight.clone()).cast(dtype)),
                conv_bias: full.conv_bias.clone().map(cast),
                x_proj: prim(common::wrap::<R, 2>(full.x_proj.clone()).cast(dtype)),
                dt_norm: cast(full.dt_norm.clone()),
                b_norm: cast(full.b_norm.clone()),
                c_norm: cast(full.c_norm.clone()),
                eps: EPS,
                dt_proj: prim(common::wrap::<R, 2>(full.dt_proj.clone()).cast(dtype)),
                dt_bias: full.dt_bias.clone().map(cast),
                a_log: prim(common::wrap::<R, 2>(full.a_log.clone()).cast(dtype)),
                d: cast(full.d.clone()),
                ssm_state: full.ssm_state.clone(),
            };
            let (y, _, ssm) = mamba_step::mamba_step(half);
            let (y_want, _, ssm_want) = mamba_step::mamba_step(full);
            let name = format!("{dtype:?} mamba step {dims:?}");
            assert_close(&format!("y, {name}"), &host::<R, 2>(y), &host::<R, 2>(y_want), tolerance);
            assert_close(&format!("SSM state, {name}"), &host::<R, 3>(ssm), &host::<R, 3>(ssm_want), tolerance);
        }
    }
}

runtime_tests!(
    mamba_step_matches_the_definition;
    cuda: mamba_step_takes_half_inputs,
);
