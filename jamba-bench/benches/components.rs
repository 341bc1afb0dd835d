//! Criterion benches of the components: a full forward of `tiny-jamba` at 64, 256 and 1024
//! tokens; the selective scan (sequential and chunked tensor-op forms, and the backend's own:
//! the host loop on CPU backends, the fused kernel on GPU ones); the causal conv1d (tensor ops
//! against the backend's); the MoE block (dispatch to the routed experts against running every
//! expert densely); an attention layer (prefill and one decode step over a long cache); and a
//! decode step at growing contexts.
//!
//! CPU (flex) by default; `--features cuda` or `--features wgpu` benches that GPU backend:
//!
//! ```text
//! cargo bench -p jamba-bench --bench components
//! cargo bench -p jamba-bench --bench components --features cuda
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::activation::softmax;
use burn::tensor::{DType, Distribution, IndexingUpdateOp, Int, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jamba::cache::KvCache;
use jamba::config::MixerKind;
use jamba::model::{AttentionConfig, LayerMasks, SparseMoe, SparseMoeConfig};
use jamba::ops::{
    ConvInput, JambaBackend, ScanInput, causal_conv1d_tensor_ops, selective_scan_chunked,
    selective_scan_reference,
};
use jamba::{Engine, EngineOptions, ForwardOptions, Jamba, LoadOptions};

#[cfg(feature = "cuda")]
type B = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type B = burn::backend::Wgpu;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
type B = jamba::backends::Cpu;

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
        group.bench_with_input(BenchmarkId::new("backend", len), &len, |b, _| {
            b.iter(|| B::selective_scan(input.clone()).y.into_data())
        });
    }
}

fn conv1d(c: &mut Criterion) {
    let dev = Default::default();
    let mut group = c.benchmark_group("causal conv1d (batch 1, 1024 channels, k 4, SiLU)");
    group.sample_size(10);
    for len in [1, 256, 1024] {
        let input = ConvInput::<B> {
            x: Tensor::random([1, len, 1024], Distribution::Normal(0.0, 1.0), &dev),
            weight: Tensor::random([1024, 4], Distribution::Normal(0.0, 0.5), &dev),
            bias: Some(Tensor::random([1024], Distribution::Normal(0.0, 0.5), &dev)),
            prefix: Some(Tensor::random(
                [1, 3, 1024],
                Distribution::Normal(0.0, 1.0),
                &dev,
            )),
            silu: true,
        };
        group.bench_with_input(BenchmarkId::new("tensor ops", len), &len, |b, _| {
            b.iter(|| causal_conv1d_tensor_ops(input.clone()).y.into_data())
        });
        group.bench_with_input(BenchmarkId::new("backend", len), &len, |b, _| {
            b.iter(|| B::causal_conv1d(input.clone()).y.into_data())
        });
    }
}

/// Every expert on every token, weighted by the routing (zero where not selected): the
/// baseline that dispatch avoids.
fn moe_dense(moe: &SparseMoe<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let tokens = x.dims()[0];
    let probs = softmax(moe.router.forward(x.clone()).cast(DType::F32), 1);
    let (weights, selected) = probs.clone().topk_with_indices(moe.top_k, 1);
    let combine = probs
        .zeros_like()
        .scatter(1, selected, weights, IndexingUpdateOp::Add)
        .cast(x.dtype());
    (0..moe.num_experts()).fold(x.zeros_like(), |acc, e| {
        let out = moe.experts.forward(e, x.clone());
        acc + out * combine.clone().slice([0..tokens, e..e + 1])
    })
}

fn moe(c: &mut Criterion) {
    let dev = Default::default();
    // bench-jamba-cpu's MoE: hidden 512, experts of width 1024, 8 experts, top 2.
    let moe = SparseMoeConfig::new(512, 1024, 8, 2).init::<B>(&dev);
    let mut group = c.benchmark_group("MoE (hidden 512, 8 experts of 1024, top 2)");
    group.sample_size(10);
    for tokens in [1, 16, 256] {
        let x = Tensor::<B, 3>::random([1, tokens, 512], Distribution::Normal(0.0, 1.0), &dev);
        group.bench_with_input(BenchmarkId::new("dispatch", tokens), &tokens, |b, _| {
            b.iter(|| moe.forward(x.clone()).0.into_data())
        });
        let flat = x.clone().reshape([tokens, 512]);
        group.bench_with_input(BenchmarkId::new("dense", tokens), &tokens, |b, _| {
            b.iter(|| moe_dense(&moe, flat.clone()).into_data())
        });
    }
}

fn attention(c: &mut Criterion) {
    let dev = Default::default();
    // bench-jamba-cpu's attention: hidden 512, 8 query heads, 2 key/value heads.
    let attn = AttentionConfig::new(512, 8, 2).init::<B>(&dev);
    let mut group = c.benchmark_group("attention (hidden 512, 8 heads, 2 kv heads)");
    group.sample_size(10);
    for len in [256, 1024] {
        let x = Tensor::<B, 3>::random([1, len, 512], Distribution::Normal(0.0, 1.0), &dev);
        group.bench_with_input(BenchmarkId::new("prefill", len), &len, |b, _| {
            b.iter(|| attn.forward(x.clone(), None, None).into_data())
        });
    }
    for context in [1024, 8192] {
        let mut cache = KvCache::new(256);
        let prompt =
            Tensor::<B, 3>::random([1, context, 512], Distribution::Normal(0.0, 1.0), &dev);
        attn.forward(prompt, None, Some(&mut cache));
        let x = Tensor::<B, 3>::random([1, 1, 512], Distribution::Normal(0.0, 1.0), &dev);
        group.bench_with_input(
            BenchmarkId::new("decode step", context),
            &context,
            |b, _| {
                b.iter_custom(|iters| {
                    // The first (untimed) step makes the private copy and any growth of the cache.
                    let mut c = cache.clone();
                    attn.forward(x.clone(), None, Some(&mut c));
                    let start = Instant::now();
                    for _ in 0..iters {
                        attn.forward(x.clone(), None, Some(&mut c)).into_data();
                    }
                    start.elapsed()
                })
            },
        );
    }
}

fn decode_step(c: &mut Criterion) {
    let engine = Engine::new(model(), EngineOptions::default());
    let model = engine.model();
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
        run("whole model, plain forward", &|c| {
            model
                .forward(next.clone(), None, Some(c), &keep)
                .unwrap()
                .logits
                .into_data();
        });
        run("whole model, engine", &|c| {
            engine.forward(&[7], 1, None, c, Some(1)).unwrap().into_data();
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

criterion_group!(benches, forward, scan, conv1d, moe, attention, decode_step);
criterion_main!(benches);
