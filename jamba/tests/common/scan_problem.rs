//! A random selective-scan problem on the host, with its f64 solution.
#![allow(dead_code)]

use burn::tensor::{Tensor, TensorData, backend::Backend};
use jamba::generation::SplitMix64;
use jamba::ops::ScanInput;

/// Normal draws from a seeded generator.
pub struct Rng(pub SplitMix64);
impl Rng {
    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.0.next_f64().max(1e-12), self.0.next_f64());
                (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                    as f32
            })
            .collect()
    }
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

    pub fn input<B: Backend>(&self, dev: &B::Device) -> ScanInput<B> {
        let dev = dev.clone();
        let t3 = |v: &Vec<f32>, w: usize| {
            Tensor::<B, 3>::from_data(TensorData::new(v.clone(), [self.batch, self.seq, w]), &dev)
        };
        let t1 = |v: &Vec<f32>| {
            Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [self.channels]), &dev)
        };
        ScanInput {
            u: t3(&self.u, self.channels),
            delta: t3(&self.delta, self.channels),
            a: Tensor::from_data(
                TensorData::new(self.a.clone(), [self.channels, self.state]),
                &dev,
            ),
            b: t3(&self.b, self.state),
            c: t3(&self.c, self.state),
            d: self.d.as_ref().map(t1),
            z: self.z.as_ref().map(|z| t3(z, self.channels)),
            delta_bias: self.bias.as_ref().map(t1),
            delta_softplus: true,
            initial_state: self.h0.as_ref().map(|h| {
                Tensor::from_data(
                    TensorData::new(h.clone(), [self.batch, self.channels, self.state]),
                    &dev,
                )
            }),
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
