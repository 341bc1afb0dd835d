//! The selective scan: both tensor-op forms against an independent f64 loop on the host, on fresh
//! random inputs over a grid of shapes and options.

mod common;

use burn::tensor::{Tensor, TensorData};
use jamba::generation::SplitMix64;
use jamba::reference::{rel_err, to_vec};
use jamba::scan::{ScanInput, ScanOutput, selective_scan_chunked, selective_scan_reference};

type B = jamba::backends::Cpu;

struct Rng(SplitMix64);
impl Rng {
    fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
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
struct Problem {
    batch: usize,
    seq: usize,
    channels: usize,
    state: usize,
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Option<Vec<f32>>,
    z: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    h0: Option<Vec<f32>>,
}

impl Problem {
    fn random(
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

    fn input(&self) -> ScanInput<B> {
        let dev = Default::default();
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
    fn expected(&self) -> (Vec<f32>, Vec<f32>) {
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

fn check(name: &str, out: ScanOutput<B>, expected: &(Vec<f32>, Vec<f32>)) {
    let (y, h) = (to_vec(out.y), to_vec(out.state));
    let (ey, eh) = (rel_err(&y, &expected.0), rel_err(&h, &expected.1));
    assert!(
        ey <= 1e-5 && eh <= 1e-5,
        "{name}: y rel. error {ey:.3e}, state rel. error {eh:.3e}"
    );
    assert!(
        y.iter().chain(&h).all(|x| x.is_finite()),
        "{name}: non-finite output"
    );
}

#[test]
fn both_forms_match_the_definition_over_a_grid() {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 300] {
        for &(batch, channels, state) in &[(1usize, 3usize, 1usize), (2, 17, 4), (3, 5, 16)] {
            for options in 0..16u8 {
                if seq > 64 && options % 5 != 0 {
                    continue; // the long cases with a few option sets keep the test fast
                }
                let with = [
                    options & 1 != 0,
                    options & 2 != 0,
                    options & 4 != 0,
                    options & 8 != 0,
                ];
                let p = Problem::random(&mut rng, batch, seq, channels, state, with);
                let expected = p.expected();
                let tag = format!(
                    "seq {seq} batch {batch} channels {channels} state {state} D/z/bias/h0 {with:?}"
                );
                check(
                    &format!("reference, {tag}"),
                    selective_scan_reference(p.input()),
                    &expected,
                );
                for chunk in [None, Some(1), Some(5), Some(64)] {
                    check(
                        &format!("chunked {chunk:?}, {tag}"),
                        selective_scan_chunked(p.input(), chunk),
                        &expected,
                    );
                }
                cases += 1;
            }
        }
    }
    assert!(cases > 100);
}

/// Fast decay over a long chunk: a cumulative-sum formulation would overflow exp(−ΣΔA) here.
#[test]
fn chunked_scan_is_stable_with_strong_decay() {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let mut p = Problem::random(&mut rng, 1, 512, 4, 8, [true, false, true, true]);
    p.a.iter_mut().for_each(|a| *a *= 40.0);
    p.delta.iter_mut().for_each(|d| *d += 4.0);
    let expected = p.expected();
    check(
        "strong decay, chunk 256",
        selective_scan_chunked(p.input(), Some(256)),
        &expected,
    );
}

/// Splitting a sequence and carrying the state gives the same result as one pass (what the
/// cache and chunked prefill rely on).
#[test]
fn state_carries_across_calls() {
    let mut rng = Rng(SplitMix64::new(common::fresh_seed()));
    let p = Problem::random(&mut rng, 2, 40, 6, 4, [true, true, true, true]);
    let whole = selective_scan_chunked(p.input(), None);
    let input = p.input();
    // The time steps `r` of the input, starting from `initial_state`.
    let part = |r: std::ops::Range<usize>, initial_state| {
        let split = |t: &Tensor<B, 3>| t.clone().slice([0..2, r.clone()]);
        ScanInput {
            u: split(&input.u),
            delta: split(&input.delta),
            b: split(&input.b),
            c: split(&input.c),
            z: input.z.as_ref().map(split),
            initial_state,
            ..input.clone()
        }
    };
    let a = selective_scan_chunked(part(0..25, input.initial_state.clone()), Some(4));
    let second = part(25..40, Some(a.state));
    let b = selective_scan_reference(second);
    let y = Tensor::cat(vec![a.y, b.y], 1);
    assert!(rel_err(&to_vec(y), &to_vec(whole.y)) < 1e-6);
    assert!(rel_err(&to_vec(b.state), &to_vec(whole.state)) < 1e-6);
}
