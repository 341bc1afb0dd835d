//! Criterion benches on the CPU backend: a full forward of `tiny-jamba` at 64, 256 and 1024
//! tokens; the chunked scan against the sequential one; a decode step at growing contexts.
//!
//! `cargo bench -p jamba-bench --bench components`

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jamba::backends::Cpu as B;
use jamba::config::MixerKind;
use jamba::layer::LayerMasks;
use jamba::scan::{ScanInput, selective_scan_chunked, selective_scan_reference};
use jamba::{ForwardOptions, Jamba, LoadOptions};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/tiny-jamba")
}

fn model() -> Jamba<B> {
    Jamba::from_pretrained(fixture(), &Default::default(), &LoadOptions::default())
        .expect("tiny-jamba fixture")
}

fn ids(len: usize, batch: usize) -> Tensor<B, 2, Int> {
    Tensor::<B, 2>::random(
        [batch, len],
        Distribution::Uniform(3.0, 500.0),
        &Default::default(),
    )
    .int()
}

fn forward(c: &mut Criterion) {
    let model = model();
    let mut group = c.benchmark_group("forward tiny-jamba");
    group.sample_size(10);
    for len in [64, 256, 1024] {
        let input = ids(len, 1);
        group.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| {
                model
                    .forward(input.clone(), None, None, &ForwardOptions::default())
                    .unwrap()
                    .logits
                    .into_data()
            })
        });
    }
}

fn scan_input(len: usize) -> ScanInput<B> {
    let dev = Default::default();
    let (batch, d, n) = (1, 128, 8);
    let normal =
        |shape: [usize; 3]| Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    ScanInput {
        u: normal([batch, len, d]),
        delta: normal([batch, len, d]),
        a: Tensor::<B, 2>::random([d, n], Distribution::Normal(0.0, 0.5), &dev)
            .exp()
            .neg(),
        b: normal([batch, len, n]),
        c: normal([batch, len, n]),
        d: Some(Tensor::ones([d], &dev)),
        z: Some(normal([batch, len, d])),
        delta_bias: Some(Tensor::<B, 1>::random(
            [d],
            Distribution::Normal(-1.0, 0.5),
            &dev,
        )),
        delta_softplus: true,
        initial_state: None,
    }
}

fn scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("selective scan (batch 1, 128 channels, state 8)");
    group.sample_size(10);
    for len in [64, 256, 1024] {
        let input = scan_input(len);
        group.bench_with_input(BenchmarkId::new("sequential", len), &len, |b, _| {
            b.iter(|| selective_scan_reference(input.clone()).y.into_data())
        });
        group.bench_with_input(BenchmarkId::new("chunked", len), &len, |b, _| {
            b.iter(|| selective_scan_chunked(input.clone(), None).y.into_data())
        });
    }
}

fn decode_step(c: &mut Criterion) {
    let model = model();
    let keep = ForwardOptions {
        logits_to_keep: Some(1),
        ..Default::default()
    };
    let dev = Default::default();
    let attention = model
        .mixer_kinds()
        .iter()
        .position(|k| *k == MixerKind::Attention)
        .unwrap();
    let mamba = model
        .mixer_kinds()
        .iter()
        .position(|k| *k == MixerKind::Mamba)
        .unwrap();
    let masks = LayerMasks {
        attention: None,
        keep: None,
    };
    let mut group = c.benchmark_group("decode step tiny-jamba");
    group.sample_size(20);
    for context in [16, 1024, 8192] {
        let mut cache = model.new_cache(1);
        model
            .forward(ids(context, 1), None, Some(&mut cache), &keep)
            .unwrap();
        let next = ids(1, 1);
        let x = Tensor::<B, 3>::random(
            [1, 1, model.config().hidden_size],
            Distribution::Normal(0.0, 1.0),
            &dev,
        );
        // Each sample steps a private copy of the cache (the copy is made by an untimed first
        // step), so the context drifts by at most the sample's iteration count.
        let mut run = |name: &str, step: &dyn Fn(&mut jamba::JambaCache<B>)| {
            group.bench_with_input(BenchmarkId::new(name, context), &context, |b, _| {
                b.iter_custom(|iters| {
                    let mut c = cache.clone();
                    step(&mut c);
                    let start = Instant::now();
                    for _ in 0..iters {
                        step(&mut c);
                    }
                    start.elapsed()
                })
            });
        };
        run("whole model", &|c| {
            model
                .forward(next.clone(), None, Some(c), &keep)
                .unwrap()
                .logits
                .into_data();
        });
        run("one attention layer", &|c| {
            model.layers[attention]
                .forward(x.clone(), &masks, Some(&mut c.layers[attention]))
                .0
                .into_data();
        });
        run("one Mamba layer", &|c| {
            model.layers[mamba]
                .forward(x.clone(), &masks, Some(&mut c.layers[mamba]))
                .0
                .into_data();
        });
    }
}

criterion_group!(benches, forward, scan, decode_step);
criterion_main!(benches);
