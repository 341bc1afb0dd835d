//! `jamba-bench profile`: where a decoding step's time goes on any backend: the engine's whole
//! step against the model's plain forward, then the plain forward's parts (each layer's mixer
//! and feed-forward, the head), the argmax, and what one small operation costs to issue.
//!
//! Each component runs `--steps` times back to back and the device is synchronised once at the
//! end, so a time is what the component costs in a stream of steps: on a GPU bound by host
//! dispatch it is the host's time to issue the component, on a saturated device its device time.
//!
//! ```sh
//! ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
//!   --batch 1 --context 512
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use clap::Args;
use jamba::backends::{BackendKind, parse_dtype};
use jamba::generation::SplitMix64;
use jamba::model::{FeedForward, LayerMasks};
use jamba::{EngineBackend, ForwardOptions};

use crate::{greedy_ids, greedy_step, prefill, random_engine, sync};

#[derive(Args, Clone)]
pub struct ProfileArgs {
    /// A config.json.
    #[arg(long)]
    config: PathBuf,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Rows decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens in the cache before the measured steps.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Calls per component (after one untimed call).
    #[arg(long, default_value_t = 20)]
    steps: usize,
}

/// Milliseconds per call of `f`, `n` calls back to back after one untimed call, synchronised
/// once at the end, and the host's part: milliseconds per call until the last call returned,
/// before the synchronisation. When the two agree, the host's issue of the work is the bound.
fn timed<B: EngineBackend>(
    device: &B::Device,
    n: usize,
    mut f: impl FnMut() -> jamba::Result<()>,
) -> jamba::Result<(f64, f64)> {
    f()?;
    sync::<B>(device)?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    let issued = t.elapsed().as_secs_f64();
    sync::<B>(device)?;
    let n = n as f64;
    Ok((t.elapsed().as_secs_f64() * 1e3 / n, issued * 1e3 / n))
}

pub fn run<B: EngineBackend>(args: &ProfileArgs, device: &B::Device) -> jamba::Result<()> {
    let (config, engine) = random_engine::<B>(&args.config, args.backend, args.dtype, device)?;
    let model = engine.model();
    let (batch, n) = (args.batch, args.steps.max(1));
    let mut rng = SplitMix64::new(1);
    let mut cache = engine.new_cache(batch);
    let logits = prefill(&engine, &mut cache, &mut rng, batch, args.context.max(1), Some(2048))?;
    let mut ids = greedy_ids(logits)?;
    println!(
        "{}: {:?} {:?}, batch {batch}, context {}, {n} calls per component (ms per call)",
        args.config.display(),
        args.backend,
        args.dtype,
        args.context
    );

    // The whole step as generation runs it, read back before the next (the pipelined loop of
    // `throughput` hides the read), on the engine and on the model's plain forward. The cache
    // itself, not a clone: on CubeCL backends an in-place update of a buffer that a clone
    // shares copies it first.
    let (engine_ms, _) = timed::<B>(device, n, || {
        ids = greedy_step(&engine, &mut cache, &ids, batch)?;
        Ok(())
    })?;
    let keep = ForwardOptions {
        logits_to_keep: Some(1),
        ..Default::default()
    };
    let (plain_ms, _) = timed::<B>(device, n, || {
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, 1]), device);
        ids = greedy_ids(model.forward(t, None, Some(&mut cache), &keep)?.logits)?;
        Ok(())
    })?;
    println!(
        "whole step: engine {engine_ms:.3} ms = {:.1} tokens/s; the model's plain forward {plain_ms:.3} ms = {:.1} tokens/s",
        batch as f64 * 1e3 / engine_ms,
        batch as f64 * 1e3 / plain_ms
    );

    // The plain forward's parts.
    let hidden = config.hidden_size;
    let x = Tensor::<B, 3>::random([batch, 1, hidden], Distribution::Normal(0.0, 1.0), device)
        .cast(args.dtype);
    let masks = LayerMasks {
        attention: None,
        keep: None,
    };
    let mut total = 0.0;
    for (i, layer) in model.layers.iter().enumerate() {
        let mut c = cache.clone();
        let (whole, issued) = timed::<B>(device, n, || {
            let _ = layer.forward(x.clone(), &masks, Some(&mut c.layers[i]));
            Ok(())
        })?;
        let (ff, _) = timed::<B>(device, n, || {
            let normed = layer.pre_ff_layernorm.forward(x.clone());
            let _ = match &layer.feed_forward {
                FeedForward::Mlp(m) => m.forward(normed),
                FeedForward::Moe(m) => m.forward(normed).0,
            };
            Ok(())
        })?;
        total += whole;
        println!(
            "layer {i} {:?}: {whole:.3}, issued in {issued:.3} (feed-forward + norm {ff:.3})",
            config.layer(i)
        );
    }
    let (head, _) = timed::<B>(device, n, || {
        let h = model.final_layernorm.forward(x.clone());
        let _ = B::projection(h, model.lm_head.as_ref().map_or_else(
            || model.embed_tokens.weight.val().transpose(),
            |l| l.weight.val(),
        ), None);
        Ok(())
    })?;
    let logits =
        Tensor::<B, 3>::random([batch, 1, config.vocab_size], Distribution::Default, device)
            .cast(args.dtype);
    let (argmax, _) = timed::<B>(device, n, || greedy_ids(logits.clone()).map(drop))?;
    println!("final norm + head: {head:.3}\nargmax + ids to the host: {argmax:.3}");
    println!("sum of the plain parts: {:.3} ms", total + head + argmax);

    // The floor under any step made of backend operations: what one small operation costs the
    // host to issue.
    let one = Tensor::<B, 1>::ones([hidden], device).cast(args.dtype);
    let ops = 200;
    let (op_ms, op_issued) = timed::<B>(device, n, || {
        let mut t = one.clone();
        for _ in 0..ops {
            t = t.add_scalar(1.0);
        }
        Ok(())
    })?;
    println!(
        "one element-wise operation on [{hidden}]: {:.2} us per operation, issued in {:.2} us",
        op_ms * 1e3 / ops as f64,
        op_issued * 1e3 / ops as f64,
    );
    Ok(())
}
