//! `jamba-bench profile`: where a decoding step's time goes, component by component, on any
//! backend: the whole step, each layer's mixer and feed-forward, the head and the argmax.
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

use burn::tensor::{DType, Distribution, Tensor};
use clap::Args;
use jamba::backends::{BackendKind, parse_dtype};
use jamba::cache::LayerCache;
use jamba::layer::{FeedForward, LayerMasks, Mixer};
use jamba::{JambaBackend, JambaError};

use jamba::generation::SplitMix64;

use crate::{greedy_step, prefill, random_model, sync};

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
/// once at the end.
fn per_call<B: JambaBackend>(
    device: &B::Device,
    n: usize,
    f: impl FnMut() -> jamba::Result<()>,
) -> jamba::Result<f64> {
    Ok(timed::<B>(device, n, f)?.0)
}

/// [`per_call`], and the host's part: milliseconds per call until the last call returned,
/// before the synchronisation. When the two agree, the host's issue of the work is the bound.
fn timed<B: JambaBackend>(
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

pub fn run<B: JambaBackend>(args: &ProfileArgs, device: &B::Device) -> jamba::Result<()> {
    let (config, model) = random_model::<B>(&args.config, args.backend, args.dtype, device)?;
    let (batch, n) = (args.batch, args.steps.max(1));
    let mut rng = SplitMix64::new(1);
    let mut cache = model.new_cache(batch);
    let logits = prefill(
        &model,
        &mut cache,
        &mut rng,
        batch,
        args.context.max(1),
        Some(2048),
    )?;
    let next = jamba::generation::argmax_last(logits).reshape([batch, 1]);
    println!(
        "{}: {:?} {:?}, batch {batch}, context {}, {n} calls per component (ms per call)",
        args.config.display(),
        args.backend,
        args.dtype,
        args.context
    );
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
        let mixer = per_call::<B>(device, n, || {
            let normed = layer.input_layernorm.forward(x.clone());
            let _ = match (&layer.mixer, &mut c.layers[i]) {
                (Mixer::Mamba(m), LayerCache::Mamba(s)) => m.forward(normed, None, Some(s)),
                (Mixer::Attention(a), LayerCache::Attention(kv)) => {
                    a.forward(normed, None, Some(kv))
                }
                _ => return Err(JambaError::Input("cache and layer kinds differ".into())),
            };
            Ok(())
        })?;
        let ff = per_call::<B>(device, n, || {
            let normed = layer.pre_ff_layernorm.forward(x.clone());
            let _ = match &layer.feed_forward {
                FeedForward::Mlp(m) => m.forward(normed),
                FeedForward::Moe(m) => m.forward(normed).0,
            };
            Ok(())
        })?;
        let mut c = cache.clone();
        let (whole_layer, issued) = timed::<B>(device, n, || {
            let _ = layer.forward(x.clone(), &masks, Some(&mut c.layers[i]));
            Ok(())
        })?;
        total += whole_layer;
        println!(
            "layer {i} {} + {}: {whole_layer:.3}, issued in {issued:.3} (mixer + norm {mixer:.3}, feed-forward + norm {ff:.3})",
            match layer.mixer {
                Mixer::Mamba(_) => "mamba",
                Mixer::Attention(_) => "attention",
            },
            match layer.feed_forward {
                FeedForward::Mlp(_) => "mlp",
                FeedForward::Moe(_) => "moe",
            },
        );
    }
    let head = per_call::<B>(device, n, || {
        let h = model.final_layernorm.forward(x.clone());
        if let Some(lm) = &model.lm_head {
            let _ = jamba::ops::project(lm, h);
        }
        Ok(())
    })?;
    let logits =
        Tensor::<B, 3>::random([batch, 1, config.vocab_size], Distribution::Default, device)
            .cast(args.dtype);
    let argmax = per_call::<B>(device, n, || {
        let chosen = jamba::generation::argmax_last(logits.clone());
        let _ = chosen.to_data();
        Ok(())
    })?;
    println!("final norm + head: {head:.3}\nargmax + ids to the host: {argmax:.3}");
    // The whole step as generation runs it: forward, argmax, ids back to the host.
    // The cache itself, not a clone: on CubeCL backends an in-place update of a buffer that a
    // clone shares copies it first (whole preallocated KV buffers, every step).
    let mut c = cache;
    let mut ids: Vec<i64> = next.into_data().convert::<i64>().into_vec().unwrap();
    let step = |c: &mut jamba::JambaCache<B>, ids: &mut Vec<i64>| -> jamba::Result<()> {
        *ids = greedy_step(&model, c, ids, batch)?;
        Ok(())
    };
    let whole = per_call::<B>(device, n, || step(&mut c, &mut ids))?;
    // The same on the backend's device thread (`JambaBackend::exclusive`, `JAMBA_EXCLUSIVE`).
    let whole_exclusive = per_call::<B>(device, n, || {
        B::exclusive(device, || step(&mut c, &mut ids))
    })?;
    println!(
        "whole step: {whole:.3} ms = {:.1} tokens/s; on the device thread: {whole_exclusive:.3} ms = {:.1} tokens/s",
        batch as f64 * 1e3 / whole,
        batch as f64 * 1e3 / whole_exclusive
    );
    // The floor under any step made of backend operations: what one small operation costs
    // the host to issue (a step issues a few hundred).
    let one = Tensor::<B, 1>::ones([hidden], device).cast(args.dtype);
    let ops = 200;
    let chain = || {
        let mut t = one.clone();
        for _ in 0..ops {
            t = t.add_scalar(1.0);
        }
    };
    let (op_ms, op_issued) = timed::<B>(device, n, || {
        chain();
        Ok(())
    })?;
    let (op_excl_ms, _) = timed::<B>(device, n, || {
        B::exclusive(device, chain);
        Ok(())
    })?;
    println!(
        "one element-wise operation on [{hidden}]: {:.2} us per operation, issued in {:.2} us; {:.2} us on the device thread",
        op_ms * 1e3 / ops as f64,
        op_issued * 1e3 / ops as f64,
        op_excl_ms * 1e3 / ops as f64,
    );

    println!("sum of the parts: {:.3} ms", total + head + argmax);
    Ok(())
}
