//! The CPU operations against independent f64 loops, on seeded random inputs over grids of
//! shapes and options: the selective scan's tensor-op forms and the CPU backend's host loop
//! (`JambaBackend::selective_scan`), the host conv1d, and flex's host GEMV and mixture of
//! experts of a decoding step (the engine's `LinearOps::project`, `FeedForwardOps::moe_experts`).

mod common;

use burn::tensor::Tensor;
use common::scan_problem::{Problem, Rng};
use jamba::generation::SplitMix64;
use jamba::reference::{rel_err, to_vec};
use jamba::JambaBackend;
use jamba::ops::{ScanInput, ScanOutput, selective_scan_chunked, selective_scan_reference};

type B = jamba::backends::Cpu;

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
    let mut rng = Rng(SplitMix64::new(101));
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 300] {
        // (2, 70, 16) at 300 steps is enough work for the host loop to split channels across
        // threads (a range ending inside a block of 16).
        for &(batch, channels, state) in &[
            (1usize, 3usize, 1usize),
            (2, 17, 4),
            (3, 5, 16),
            (2, 70, 16),
        ] {
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
                    selective_scan_reference(p.input::<B>(&Default::default())),
                    &expected,
                );
                check(
                    &format!("host loop, {tag}"),
                    B::selective_scan(p.input::<B>(&Default::default())),
                    &expected,
                );
                for chunk in [None, Some(1), Some(5), Some(64)] {
                    check(
                        &format!("chunked {chunk:?}, {tag}"),
                        selective_scan_chunked(p.input::<B>(&Default::default()), chunk),
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
    let mut rng = Rng(SplitMix64::new(102));
    let mut p = Problem::random(&mut rng, 1, 512, 4, 8, [true, false, true, true]);
    p.a.iter_mut().for_each(|a| *a *= 40.0);
    p.delta.iter_mut().for_each(|d| *d += 4.0);
    let expected = p.expected();
    check(
        "strong decay, chunk 256",
        selective_scan_chunked(p.input::<B>(&Default::default()), Some(256)),
        &expected,
    );
}

/// Splitting a sequence and carrying the state gives the same result as one pass (what the
/// cache and chunked prefill rely on).
#[test]
fn state_carries_across_calls() {
    let mut rng = Rng(SplitMix64::new(103));
    let p = Problem::random(&mut rng, 2, 40, 6, 4, [true, true, true, true]);
    let whole = selective_scan_chunked(p.input::<B>(&Default::default()), None);
    let input = p.input::<B>(&Default::default());
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

/// The convolution's host loop against an f64 loop, over lengths, widths (one and several
/// threads' worth of channels), kernel sizes, with and without bias, prefix and SiLU.
#[test]
fn host_conv_matches_the_definition() {
    use burn::tensor::TensorData;
    use jamba::ops::ConvInput;
    let mut seed = SplitMix64::new(104);
    let dev = Default::default();
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 300] {
        // (2, 150, 4) at 300 steps is enough work to split channels across threads.
        for &(batch, channels, k) in &[
            (1usize, 5usize, 4usize),
            (2, 70, 2),
            (3, 33, 4),
            (2, 150, 4),
        ] {
            for options in 0..8u8 {
                let (with_bias, with_prefix, silu) =
                    (options & 1 != 0, options & 2 != 0, options & 4 != 0);
                let mut draw = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| (seed.next_f64() * 4.0 - 2.0) as f32)
                        .collect()
                };
                let x = draw(batch * seq * channels);
                let weight = draw(channels * k);
                let bias = draw(channels);
                let prefix = draw(batch * (k - 1) * channels);
                let at = |b: usize, p: usize, d: usize| -> f64 {
                    if p < k - 1 {
                        if with_prefix {
                            prefix[(b * (k - 1) + p) * channels + d] as f64
                        } else {
                            0.0
                        }
                    } else {
                        x[(b * seq + p - (k - 1)) * channels + d] as f64
                    }
                };
                let (mut ey, mut es) = (Vec::new(), Vec::new());
                for b in 0..batch {
                    for t in 0..seq {
                        for d in 0..channels {
                            let mut acc = if with_bias { bias[d] as f64 } else { 0.0 };
                            for j in 0..k {
                                acc += weight[d * k + j] as f64 * at(b, t + j, d);
                            }
                            if silu {
                                acc /= 1.0 + (-acc).exp();
                            }
                            ey.push(acc as f32);
                        }
                    }
                    for j in 0..k - 1 {
                        for d in 0..channels {
                            es.push(at(b, seq + j, d) as f32);
                        }
                    }
                }
                let t3 = |v: &Vec<f32>, s: [usize; 3]| {
                    Tensor::<B, 3>::from_data(TensorData::new(v.clone(), s), &dev)
                };
                let out = B::causal_conv1d(ConvInput {
                    x: t3(&x, [batch, seq, channels]),
                    weight: Tensor::from_data(TensorData::new(weight, [channels, k]), &dev),
                    bias: with_bias
                        .then(|| Tensor::from_data(TensorData::new(bias, [channels]), &dev)),
                    prefix: with_prefix.then(|| t3(&prefix, [batch, k - 1, channels])),
                    silu,
                });
                let tag =
                    format!("seq {seq} batch {batch} channels {channels} k {k} options {options}");
                let (y, s) = (to_vec(out.y), to_vec(out.state));
                assert!(
                    rel_err(&y, &ey) <= 1e-6,
                    "{tag}: y rel. error {:.3e}",
                    rel_err(&y, &ey)
                );
                assert_eq!(s, es, "{tag}: state");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 128);
}

/// flex's host GEMV for decoding rows against an f64 product (the error relative to the size of
/// the products' terms, which bounds f32 summation): row counts up to the GEMV's limit,
/// input counts that leave a tail after the groups of four, output counts that are not whole
/// bands of 16 and products large enough to split across threads; with and without bias.
#[cfg(feature = "flex")]
#[test]
fn host_projection_matches_the_definition() {
    use burn::tensor::TensorData;
    type F = burn::backend::Flex;
    let mut seed = SplitMix64::new(105);
    let dev = Default::default();
    let mut cases = 0;
    use jamba::engine::ops::LinearOps;
    for &rows in &[1usize, 3, 8] {
        for &(inputs, outputs) in &[(1usize, 1usize), (5, 17), (64, 300), (1027, 4100)] {
            for with_bias in [false, true] {
                let mut draw = |n: usize| -> Vec<f32> {
                    (0..n)
                        .map(|_| (seed.next_f64() * 2.0 - 1.0) as f32)
                        .collect()
                };
                let (x, w, b) = (draw(rows * inputs), draw(inputs * outputs), draw(outputs));
                // Each output's f64 value and the sum of its terms' magnitudes: an f32 sum's
                // rounding error is bounded relative to the latter, not to the result (a single
                // `x·w + b` may cancel to almost nothing).
                let mut expected = Vec::with_capacity(rows * outputs);
                let mut magnitude = Vec::with_capacity(rows * outputs);
                for r in 0..rows {
                    for o in 0..outputs {
                        let mut acc = if with_bias { b[o] as f64 } else { 0.0 };
                        let mut size = acc.abs();
                        for i in 0..inputs {
                            let term = x[r * inputs + i] as f64 * w[i * outputs + o] as f64;
                            acc += term;
                            size += term.abs();
                        }
                        expected.push(acc);
                        magnitude.push(size);
                    }
                }
                let y = F::project(
                    Tensor::<F, 3>::from_data(TensorData::new(x, [1, rows, inputs]), &dev),
                    Tensor::from_data(TensorData::new(w, [inputs, outputs]), &dev),
                    with_bias.then(|| Tensor::from_data(TensorData::new(b, [outputs]), &dev)),
                );
                assert_eq!(y.dims(), [1, rows, outputs]);
                let y = to_vec(y);
                let diff: f64 = y
                    .iter()
                    .zip(&expected)
                    .map(|(&a, &e)| (a as f64 - e).powi(2))
                    .sum();
                let size: f64 = magnitude.iter().map(|m| m * m).sum();
                let err = (diff / size.max(f64::MIN_POSITIVE)).sqrt();
                assert!(
                    err <= 1e-6,
                    "rows {rows} inputs {inputs} outputs {outputs} bias {with_bias}: rel. error {err:.3e}"
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 24);
}

/// The host mixture of experts of a decoding step (flex, f32) against the f64 definition: one
/// token to 8 (the host loop's limit), top 1 to 4, several tokens sharing an expert; and past the
/// limit (the grouped form).
#[cfg(feature = "flex")]
#[test]
fn host_routed_experts_match_the_definition() {
    use burn::tensor::TensorData;
    type F = burn::backend::Flex;
    let dev = Default::default();
    let mut rng = Rng(SplitMix64::new(106));
    for dims in [
        [1usize, 4, 1, 8, 16],
        [1, 16, 2, 40, 72],
        [3, 4, 2, 33, 50],
        [8, 16, 4, 64, 300],
        [20, 8, 2, 24, 40],
    ] {
        let p = common::MoeProblem::random(&mut rng, dims);
        let [tokens, experts, top_k, hidden, inner] = dims;
        let t = |v: &[f32], shape: [usize; 3]| {
            Tensor::<F, 3>::from_data(TensorData::new(v.to_vec(), shape), &dev)
        };
        use burn::module::Param;
        use jamba::engine::ops::FeedForwardOps;
        let experts_module = jamba::model::Experts::<F> {
            gate_proj: Param::from_tensor(t(&p.gate, [experts, hidden, inner])),
            up_proj: Param::from_tensor(t(&p.up, [experts, hidden, inner])),
            down_proj: Param::from_tensor(t(&p.down, [experts, inner, hidden])),
        };
        let y = F::moe_experts(
            t(&p.x, [1, tokens, hidden]).reshape([tokens, hidden]),
            t(&p.logits, [1, tokens, experts]).reshape([tokens, experts]),
            &experts_module,
            top_k,
        );
        let err = rel_err(&to_vec(y), &p.expected());
        assert!(err <= 1e-5, "{dims:?}: rel. error {err:.3e}");
    }
}
