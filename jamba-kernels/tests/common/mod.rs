//! What the kernel tests share: the backend type, tensor round trips, a seeded generator, the
//! scan and mixture-of-experts problems with their f64 solutions, and the f64 definitions of
//! the simpler kernels.
#![allow(dead_code)]

use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::{CubeBackend, CubeRuntime, tensor::CubeTensor};
use jamba_kernels::scan::ScanTensors;

/// The CubeCL backend the tests build their inputs with.
pub type K<R> = CubeBackend<R, f32, i32, u32>;

pub fn prim<R: CubeRuntime, const D: usize>(t: Tensor<K<R>, D>) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

pub fn wrap<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Tensor<K<R>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A tensor of NaN: what an output buffer holds before the kernel writes it.
pub fn poisoned<R: CubeRuntime, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    device: &R::Device,
) -> CubeTensor<R> {
    prim(Tensor::<K<R>, D>::full(shape, f32::NAN, (device, dtype)))
}

/// A tensor's values on the host, as f32.
pub fn to_vec<R: CubeRuntime, const D: usize>(t: Tensor<K<R>, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("float data")
}

/// A kernel's float output on the host.
pub fn host<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Vec<f32> {
    to_vec(wrap::<R, D>(t))
}

/// An integer kernel output on the host.
pub fn host_ids<R: CubeRuntime, const D: usize>(t: CubeTensor<R>) -> Vec<i64> {
    Tensor::<K<R>, D, burn::tensor::Int>::from_primitive(t)
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("int data")
}

/// `v` as a tensor of `shape` rounded to `dtype`, and the rounded values on the host.
pub fn rounded<R: CubeRuntime, const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    dtype: DType,
    device: &R::Device,
) -> (Tensor<K<R>, D>, Vec<f32>) {
    let t = Tensor::<K<R>, D>::from_data(TensorData::new(v, shape), device).cast(dtype);
    let host = to_vec(t.clone());
    (t, host)
}

/// ‖ours − reference‖₂ / ‖reference‖₂ (the absolute error when the reference is zero).
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

pub fn assert_close(name: &str, ours: &[f32], expected: &[f32], tolerance: f64) {
    let err = rel_err(ours, expected);
    assert!(
        err <= tolerance && ours.iter().all(|x| x.is_finite()),
        "{name}: rel. error {err:.3e} (tolerance {tolerance:.0e}); {} non-finite",
        ours.iter().filter(|x| !x.is_finite()).count()
    );
}

/// A seeded generator (SplitMix64) with normal draws: every test fixes its seed, so a failure
/// reproduces.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.next_f64().max(1e-12), self.next_f64());
                (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                    as f32
            })
            .collect()
    }

    pub fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| (lo + (hi - lo) * self.next_f64()) as f32).collect()
    }
}

/// RMSNorm of each row of `width` in f64 (the f32 kernel's only rounding is its arithmetic).
pub fn rms_norm_expected(x: &[f32], weight: &[f32], width: usize, eps: f64) -> Vec<f32> {
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

/// `x [rows, k] · w [k, n] (+ bias)` in f64.
pub fn matmul_expected(x: &[f32], w: &[f32], bias: Option<&[f32]>, [rows, k, n]: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * n);
    for r in 0..rows {
        for o in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..k {
                acc += x[r * k + i] as f64 * w[i * n + o] as f64;
            }
            out.push(acc as f32);
        }
    }
    out
}

/// A test module per compiled runtime: `runtime_tests!(a, b; cuda: c)` runs `super::a::<R>`
/// and `super::b::<R>` on every runtime (wgpu in CI, CUDA on a GPU machine) and `super::c::<R>`
/// on CUDA only (half-precision inputs, which WGSL lacks).
#[macro_export]
macro_rules! runtime_tests {
    ($($test:ident),* $(,)?) => {
        runtime_tests!($($test),*; cuda:);
    };
    ($($test:ident),* $(,)?; cuda: $($cuda_test:ident),* $(,)?) => {
        #[cfg(feature = "wgpu")]
        mod wgpu {
            type R = cubecl::wgpu::WgpuRuntime;
            $(
                #[test]
                fn $test() {
                    super::$test::<R>(&Default::default());
                }
            )*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            type R = cubecl::cuda::CudaRuntime;
            $(
                #[test]
                fn $test() {
                    super::$test::<R>(&Default::default());
                }
            )*
            $(
                #[test]
                fn $cuda_test() {
                    super::$cuda_test::<R>(&Default::default());
                }
            )*
        }
    };
}

/// Host copy of one scan problem.
pub struct Problem {
    pub batch: usize,
    pub seq: usize,
    pub channels: usize,
    pub state: usize,
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
    pub h0: Option<Vec<f32>>,
}

impl Problem {
    pub fn random(
        rng: &mut Rng,
        batch: usize,
        seq: usize,
        channels: usize,
        state: usize,
        with: [bool; 4],
    ) -> Self {
        let bt = batch * seq;
        Self {
            batch,
            seq,
            channels,
            state,
            u: rng.normal(bt * channels, 0.0, 1.0),
            delta: rng.normal(bt * channels, 0.0, 1.0),
            a: rng
                .normal(channels * state, 0.0, 0.5)
                .into_iter()
                .map(|x| -(x.exp()))
                .collect(),
            b: rng.normal(bt * state, 0.0, 1.0),
            c: rng.normal(bt * state, 0.0, 1.0),
            d: with[0].then(|| rng.normal(channels, 1.0, 0.2)),
            z: with[1].then(|| rng.normal(bt * channels, 0.0, 1.0)),
            bias: with[2].then(|| rng.normal(channels, -1.0, 0.5)),
            h0: with[3].then(|| rng.normal(batch * channels * state, 0.0, 1.0)),
        }
    }

    /// The problem on the device, `u`, `Δ`, `B`, `C` and `z` in `dtype` (the host copies then
    /// take the rounded values), the rest in f32.
    pub fn tensors<R: CubeRuntime>(&mut self, dtype: DType, device: &R::Device) -> ScanTensors<R> {
        let (b, l, d, n) = (self.batch, self.seq, self.channels, self.state);
        let round = |v: &mut Vec<f32>, shape: [usize; 3]| {
            let t = Tensor::<K<R>, 3>::from_data(TensorData::new(v.clone(), shape), device)
                .cast(dtype);
            *v = to_vec(t.clone().cast(DType::F32));
            prim(t)
        };
        let f32_1 = |v: Option<&Vec<f32>>| {
            let v = v.cloned().unwrap_or_else(|| vec![0.0; d]);
            prim(Tensor::<K<R>, 1>::from_data(TensorData::new(v, [d]), device))
        };
        let h0 = self.h0.clone().unwrap_or_else(|| vec![0.0; b * d * n]);
        ScanTensors {
            u: round(&mut self.u, [b, l, d]),
            delta: round(&mut self.delta, [b, l, d]),
            a: prim(Tensor::<K<R>, 2>::from_data(TensorData::new(self.a.clone(), [d, n]), device)),
            b: round(&mut self.b, [b, l, n]),
            c: round(&mut self.c, [b, l, n]),
            d: f32_1(self.d.as_ref()),
            z: match self.z.as_mut() {
                Some(z) => Some(round(z, [b, l, d])),
                None => None,
            },
            delta_bias: f32_1(self.bias.as_ref()),
            state: prim(Tensor::<K<R>, 3>::from_data(TensorData::new(h0, [b, d, n]), device)),
            delta_softplus: true,
        }
    }

    /// The recurrence in f64, written out with plain loops.
    pub fn expected(&self) -> (Vec<f32>, Vec<f32>) {
        let (bs, l, dn, n) = (self.batch, self.seq, self.channels, self.state);
        let mut y = vec![0f32; bs * l * dn];
        let mut hs = vec![0f32; bs * dn * n];
        for b in 0..bs {
            for d in 0..dn {
                let mut h: Vec<f64> = (0..n)
                    .map(|s| {
                        self.h0
                            .as_ref()
                            .map_or(0.0, |h0| h0[(b * dn + d) * n + s] as f64)
                    })
                    .collect();
                for t in 0..l {
                    let i = (b * l + t) * dn + d;
                    let mut delta =
                        self.delta[i] as f64 + self.bias.as_ref().map_or(0.0, |v| v[d] as f64);
                    delta = if delta > 20.0 {
                        delta
                    } else {
                        delta.exp().ln_1p()
                    };
                    let u = self.u[i] as f64;
                    let mut out = 0.0;
                    for s in 0..n {
                        let bt = self.b[(b * l + t) * n + s] as f64;
                        let ct = self.c[(b * l + t) * n + s] as f64;
                        h[s] = (delta * self.a[d * n + s] as f64).exp() * h[s] + delta * bt * u;
                        out += ct * h[s];
                    }
                    out += self.d.as_ref().map_or(0.0, |v| v[d] as f64) * u;
                    if let Some(z) = &self.z {
                        let z = z[i] as f64;
                        out *= z / (1.0 + (-z).exp());
                    }
                    y[i] = out as f32;
                }
                for s in 0..n {
                    hs[(b * dn + d) * n + s] = h[s] as f32;
                }
            }
        }
        (y, hs)
    }
}

/// A mixture of experts' operands on the host (`[in, out]` weights stacked over the experts),
/// and its definition in f64: softmax over the router's logits, each token's `top_k` most
/// probable experts (lowest index among equals), `Σⱼ pⱼ · down(silu(gate·x) · up·x)`.
#[allow(dead_code)]
pub struct MoeProblem {
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inner: usize,
    /// `[tokens, hidden]`.
    pub x: Vec<f32>,
    /// `[tokens, experts]`.
    pub logits: Vec<f32>,
    /// `[experts, hidden, inner]`.
    pub gate: Vec<f32>,
    /// `[experts, hidden, inner]`.
    pub up: Vec<f32>,
    /// `[experts, inner, hidden]`.
    pub down: Vec<f32>,
}

#[allow(dead_code)]
impl MoeProblem {
    /// Normal draws: `x` with unit deviation, logits with deviation 2, weights `1/√fan_in`.
    pub fn random(
        rng: &mut Rng,
        [tokens, experts, top_k, hidden, inner]: [usize; 5],
    ) -> Self {
        let scale = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        Self {
            tokens,
            experts,
            top_k,
            hidden,
            inner,
            x: rng.normal(tokens * hidden, 0.0, 1.0),
            logits: rng.normal(tokens * experts, 0.0, 2.0),
            gate: rng.normal(experts * hidden * inner, 0.0, scale(hidden)),
            up: rng.normal(experts * hidden * inner, 0.0, scale(hidden)),
            down: rng.normal(experts * inner * hidden, 0.0, scale(inner)),
        }
    }

    /// The output, `[tokens, hidden]`, in f64 from these (f32) values.
    pub fn expected(&self) -> Vec<f32> {
        let (experts, hidden, inner) = (self.experts, self.hidden, self.inner);
        let mut out = vec![0f32; self.tokens * hidden];
        for t in 0..self.tokens {
            let row = &self.logits[t * experts..(t + 1) * experts];
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let xt = &self.x[t * hidden..(t + 1) * hidden];
            for &e in &order[..self.top_k] {
                let p = (row[e] as f64 - max).exp() / sum;
                let act: Vec<f64> = (0..inner)
                    .map(|o| {
                        let (mut a, mut b) = (0f64, 0f64);
                        for (i, &xv) in xt.iter().enumerate() {
                            a += xv as f64 * self.gate[(e * hidden + i) * inner + o] as f64;
                            b += xv as f64 * self.up[(e * hidden + i) * inner + o] as f64;
                        }
                        a / (1.0 + (-a).exp()) * b
                    })
                    .collect();
                for o in 0..hidden {
                    let y: f64 = (0..inner)
                        .map(|i| act[i] * self.down[(e * inner + i) * hidden + o] as f64)
                        .sum();
                    out[t * hidden + o] += (p * y) as f32;
                }
            }
        }
        out
    }
}
