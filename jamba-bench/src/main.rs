//! `jamba-bench`: throughput and memory of a configuration with random weights on any compiled
//! backend and dtype, and the analytic tables of the published models.
//!
//! ```text
//! jamba-bench throughput --config ../shared/configs/bench-jamba-1b.config.json --backend cuda \
//!     --dtype bf16 --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --out results.json
//! jamba-bench tables
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use clap::{Args, Parser, Subcommand};
use indicatif::ProgressBar;
use jamba::backends::{BackendKind, parse_dtype};
use jamba::generation::SplitMix64;
use jamba::{Engine, EngineBackend, EngineOptions, Jamba, JambaConfig, JambaError};
use serde::Serialize;

mod kernels;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod launch;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod matmul;
mod paper;
#[cfg(feature = "plot")]
mod plot;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod probe;
mod profile;

#[derive(Parser)]
#[command(name = "jamba-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill and decode throughput of one configuration with random weights.
    Throughput(ThroughputArgs),
    /// Parameters and cache sizes of the published configurations, next to the paper's Table 1.
    Tables(TablesArgs),
    /// The selective scan, decoding state update and conv1d: the backend's path (fused kernels
    /// on CubeCL backends) against the tensor-op path, with bandwidth against the floor.
    Kernels(kernels::KernelArgs),
    /// The paper's comparisons: prefill and decode throughput and cache bytes of several
    /// configurations (hybrid, all attention, all Mamba) side by side.
    Paper(paper::PaperArgs),
    /// Where a decoding step's time goes: the engine's step against the model's plain forward,
    /// each layer's mixer and feed-forward, the head, the argmax.
    Profile(profile::ProfileArgs),
    /// Half-precision products of a prefill's shapes: each cubek strategy against Burn's
    /// autotuned choice, in TFLOP/s.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    Matmul(matmul::MatmulArgs),
    /// What the host pays per kernel launch, by how the kernel takes its buffers (tensors or
    /// arrays, output reused or fresh), from the caller's thread and from CubeCL's device thread.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    Launch(launch::LaunchArgs),
    /// Draws the rows of `paper` as PNG and SVG figures.
    #[cfg(feature = "plot")]
    Plot(plot::PlotArgs),
}

#[derive(Args, Clone)]
struct ThroughputArgs {
    /// A config.json.
    #[arg(long)]
    config: PathBuf,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Prompt lengths for prefill (0: none).
    #[arg(long, value_delimiter = ',', default_values_t = [512usize])]
    prefill: Vec<usize>,
    /// Batch size of the prefill runs.
    #[arg(long, default_value_t = 1)]
    prefill_batch: usize,
    /// Feed prefill prompts in chunks of this many tokens (bounds memory for long prompts).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Batch sizes for decode.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
    decode_batch: Vec<usize>,
    /// Context (prompt tokens in the cache) before the timed decode steps.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize])]
    decode_context: Vec<usize>,
    /// Timed decode steps per measurement (0: no decode measurement).
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Write the results here as JSON (and as CSV beside it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TablesArgs {
    /// Folder of the published configs.
    #[arg(long, default_value = "../shared/configs")]
    configs: PathBuf,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
struct Row {
    config: String,
    backend: String,
    dtype: String,
    phase: &'static str,
    batch: usize,
    context: usize,
    tokens: usize,
    median_secs: f64,
    tokens_per_sec: f64,
    cache_bytes: u64,
    error: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Throughput(args) => {
            let a = args.clone();
            jamba::with_backend!(a.backend, |B, device| throughput::<B>(&args, &device))
        }
        Command::Tables(args) => tables(&args),
        Command::Kernels(args) => {
            let a = args.clone();
            jamba::with_backend!(a.backend, |B, device| kernels::run::<B>(&args, &device))
        }
        Command::Paper(args) => {
            let a = args.clone();
            jamba::with_backend!(a.backend, |B, device| paper::run::<B>(&args, &device))
        }
        Command::Profile(args) => {
            let a = args.clone();
            jamba::with_backend!(a.backend, |B, device| profile::run::<B>(&args, &device))
        }
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        Command::Matmul(args) => match args.backend {
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                matmul::run::<jamba::burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>(
                    &args,
                    &Default::default(),
                )
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => matmul::run::<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>(
                &args,
                &Default::default(),
            ),
            other => Err(jamba::JambaError::Input(format!(
                "matmul runs on a CubeCL backend (cuda or wgpu), not {other:?}"
            ))),
        },
        #[cfg(any(feature = "cuda", feature = "wgpu"))]
        Command::Launch(args) => match args.backend {
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => launch::run::<jamba::burn_cubecl::cubecl::cuda::CudaRuntime>(
                &args,
                &Default::default(),
            ),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                launch::run::<burn::backend::wgpu::WgpuRuntime>(&args, &Default::default())
            }
            other => Err(jamba::JambaError::Input(format!(
                "launch runs on a CubeCL backend (cuda or wgpu), not {other:?}"
            ))),
        },
        #[cfg(feature = "plot")]
        Command::Plot(args) => plot::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

/// `bench-jamba-1b` for `.../bench-jamba-1b.config.json`.
pub(crate) fn config_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().replace(".config.json", ""))
        .unwrap_or_default()
}

fn random_ids(rng: &mut SplitMix64, n: usize, vocab: usize) -> Vec<i64> {
    (0..n)
        .map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as i64)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Feeds `len` random tokens per row through `cache` (in chunks), returning the last logits.
pub(crate) fn prefill<B: EngineBackend>(
    engine: &Engine<B>,
    cache: &mut jamba::JambaCache<B>,
    rng: &mut SplitMix64,
    batch: usize,
    len: usize,
    chunk: Option<usize>,
) -> jamba::Result<Tensor<B, 3>> {
    let vocab = engine.model().config().vocab_size;
    let chunk = chunk.unwrap_or(len).max(1);
    let mut logits = None;
    let mut done = 0;
    while done < len {
        let n = chunk.min(len - done);
        let ids = random_ids(rng, batch * n, vocab);
        logits = Some(engine.forward(&ids, batch, None, cache, Some(1))?);
        done += n;
    }
    logits.ok_or_else(|| JambaError::Input("a prefill of no tokens".into()))
}

/// The configuration at `path` and an engine of a model of it with random weights (seeded, so
/// runs agree) in `dtype`; an error if the backend lacks the dtype.
pub(crate) fn random_engine<B: EngineBackend>(
    path: &std::path::Path,
    backend: BackendKind,
    dtype: DType,
    device: &B::Device,
) -> jamba::Result<(JambaConfig, Engine<B>)> {
    let config = JambaConfig::from_file(path)?;
    if !B::supports_dtype(device, dtype) {
        return Err(JambaError::Input(format!(
            "{backend:?} does not support {dtype:?}"
        )));
    }
    B::seed(device, 0);
    let model = Jamba::<B>::init(&config, device).cast(dtype);
    Ok((config, Engine::new(model, EngineOptions::default())))
}

/// The argmax of each row of `[batch, 1, vocab]` logits, on the host.
pub(crate) fn greedy_ids<B: EngineBackend>(logits: Tensor<B, 3>) -> jamba::Result<Vec<i64>> {
    let [batch, _, vocab] = logits.dims();
    B::queue_read_ids(B::argmax_rows(logits.reshape([batch, vocab]))).wait()
}

/// One greedy decoding step read back before the next (the unpipelined loop): `ids` `[batch]`
/// in, the chosen ids back on the host.
pub(crate) fn greedy_step<B: EngineBackend>(
    engine: &Engine<B>,
    cache: &mut jamba::JambaCache<B>,
    ids: &[i64],
    batch: usize,
) -> jamba::Result<Vec<i64>> {
    greedy_ids(engine.forward(ids, batch, None, cache, Some(1))?)
}

pub(crate) fn sync<B: Backend>(device: &B::Device) -> jamba::Result<()> {
    B::sync(device).map_err(|e| JambaError::Input(format!("device error: {e:?}")))
}

fn throughput<B: EngineBackend>(args: &ThroughputArgs, device: &B::Device) -> jamba::Result<()> {
    let start = Instant::now();
    let (config, engine) = random_engine::<B>(&args.config, args.backend, args.dtype, device)?;
    sync::<B>(device)?;
    let name = config_name(&args.config);
    eprintln!(
        "{name}: {:.2}B parameters ({:.2}B active), random weights, {:?} {:?}, built in {:.1?}",
        config.param_count().total as f64 / 1e9,
        config.param_count().active as f64 / 1e9,
        args.backend,
        args.dtype,
        start.elapsed()
    );
    let mut rng = SplitMix64::new(1);
    let mut rows = Vec::new();
    let row =
        |phase, batch, context, tokens, times: Vec<f64>, cache_bytes, error: Option<String>| {
            let m = if times.is_empty() {
                f64::NAN
            } else {
                median(times)
            };
            Row {
                config: name.clone(),
                backend: format!("{:?}", args.backend).to_lowercase(),
                dtype: format!("{:?}", args.dtype).to_lowercase(),
                phase,
                batch,
                context,
                tokens,
                median_secs: m,
                tokens_per_sec: tokens as f64 / m,
                cache_bytes,
                error,
            }
        };
    let total = args.prefill.len() + args.decode_batch.len() * args.decode_context.len();
    let bar = ProgressBar::new(total as u64);
    for &len in &args.prefill {
        if len == 0 {
            bar.inc(1);
            continue; // `--prefill 0`: decode only
        }
        let mut times = Vec::new();
        let mut cache_bytes = 0;
        let mut error = None;
        for rep in 0..args.warmup + args.reps {
            let mut cache = engine.new_cache(args.prefill_batch);
            let t = Instant::now();
            let result = prefill(
                &engine,
                &mut cache,
                &mut rng,
                args.prefill_batch,
                len,
                args.prefill_chunk,
            )
            .and_then(|logits| {
                greedy_ids(logits)?; // the first token is part of prefill
                sync::<B>(device)
            });
            if let Err(e) = result {
                error = Some(e.to_string());
                break;
            }
            if rep >= args.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
            cache_bytes = cache.size_bytes();
        }
        let r = row(
            "prefill",
            args.prefill_batch,
            len,
            len * args.prefill_batch,
            times,
            cache_bytes,
            error,
        );
        bar.suspend(|| {
            eprintln!(
                "prefill b={} len={len}: {:.1} tokens/s ({:.4}s)",
                r.batch, r.tokens_per_sec, r.median_secs
            )
        });
        rows.push(r);
        bar.inc(1);
    }
    for &context in &args.decode_context {
        for &batch in &args.decode_batch {
            if args.decode_steps == 0 {
                bar.inc(1);
                continue; // `--decode-steps 0`: prefill only
            }
            let mut times = Vec::new();
            let mut cache_bytes = 0;
            let mut error = None;
            for rep in 0..args.warmup + args.reps {
                let mut cache = engine.new_cache(batch);
                let result = (|| -> jamba::Result<f64> {
                    let logits = prefill(
                        &engine,
                        &mut cache,
                        &mut rng,
                        batch,
                        context,
                        args.prefill_chunk.or(Some(2048)),
                    )?;
                    decode_steps(&engine, &mut cache, logits, 0, args.decode_steps)
                })();
                match result {
                    Ok(secs) if rep >= args.warmup => times.push(secs),
                    Ok(_) => {}
                    Err(e) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
                cache_bytes = cache.size_bytes();
            }
            let r = row(
                "decode",
                batch,
                context,
                batch * args.decode_steps,
                times,
                cache_bytes,
                error,
            );
            bar.suspend(|| {
                eprintln!(
                    "decode b={batch} context={context}: {:.1} tokens/s ({:.2} ms/step), cache {:.1} MiB",
                    r.tokens_per_sec,
                    r.median_secs * 1e3 / args.decode_steps as f64,
                    r.cache_bytes as f64 / (1 << 20) as f64
                )
            });
            rows.push(r);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::to_string_pretty(&rows).expect("rows serialise")
    );
    write_rows(args.out.as_deref(), &rows)
}

/// Seconds for `steps` greedy decoding steps as generation runs them from a prefill's
/// `logits`: each step queued from the previous step's argmax on the device, its ids read back
/// behind it ([`jamba::GreedyPipeline`]).
pub(crate) fn decode_steps<B: EngineBackend>(
    engine: &Engine<B>,
    cache: &mut jamba::JambaCache<B>,
    logits: Tensor<B, 3>,
    warmup: usize,
    steps: usize,
) -> jamba::Result<f64> {
    let device = engine.model().device();
    let mut pipe = jamba::GreedyPipeline::new(engine, logits)?;
    pipe.next_tokens()?; // the prefill's token, before the clock starts
    for _ in 0..warmup {
        pipe.queue_step(cache)?;
        pipe.next_tokens()?;
    }
    sync::<B>(&device)?;
    let t = Instant::now();
    for _ in 0..steps {
        pipe.queue_step(cache)?;
        if pipe.queued() > 1 {
            pipe.next_tokens()?;
        }
    }
    while pipe.queued() > 0 {
        pipe.next_tokens()?;
    }
    sync::<B>(&device)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Writes `rows` to `out` as JSON and, beside it, as CSV (one column per field).
pub(crate) fn write_rows<T: Serialize>(
    out: Option<&std::path::Path>,
    rows: &[T],
) -> jamba::Result<()> {
    let Some(out) = out else { return Ok(()) };
    let write = |path: &std::path::Path, text: String| {
        std::fs::write(path, text).map_err(|e| JambaError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    };
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).expect("rows serialise"))
        .collect();
    write(
        out,
        serde_json::to_string_pretty(&values).expect("rows serialise"),
    )?;
    let mut csv = String::new();
    if let Some(serde_json::Value::Object(first)) = values.first() {
        csv += &first.keys().cloned().collect::<Vec<_>>().join(",");
        csv.push('\n');
        for v in &values {
            let cells: Vec<String> = first
                .keys()
                .map(|k| match &v[k] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(s) => s.replace(',', ";"),
                    other => other.to_string(),
                })
                .collect();
            csv += &cells.join(",");
            csv.push('\n');
        }
    }
    write(&out.with_extension("csv"), csv)
}

/// Parses `AxBxC` into `N` sizes.
pub(crate) fn parse_shape<const N: usize>(s: &str) -> jamba::Result<[usize; N]> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| JambaError::Input(format!("bad shape `{s}`: {e}")))?;
    parts
        .try_into()
        .map_err(|_| JambaError::Input(format!("shape `{s}` needs {N} sizes separated by `x`")))
}

fn tables(args: &TablesArgs) -> jamba::Result<()> {
    // Jamba paper, Table 1 (KV cache at 256K tokens, 16-bit) and its stated parameter counts.
    let paper = [("jamba-v0.1", "52B total, 12B active, KV 4GB")];
    println!(
        "| model | total params | active params | KV 4K | KV 32K | KV 256K | Mamba state | paper |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut entries: Vec<_> = std::fs::read_dir(&args.configs)
        .map_err(|e| JambaError::Io {
            path: args.configs.clone(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    let mut v01 = None;
    for path in entries {
        let config = JambaConfig::from_file(&path)?;
        let name = config_name(&path);
        let p = config.param_count();
        let kv = |ctx| gib(config.cache_size(1, ctx, 2).kv_bytes);
        let note = paper
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, t)| t);
        println!(
            "| {name} | {:.2}B | {:.2}B | {:.3} GiB | {:.2} GiB | {:.2} GiB | {:.1} MiB | {note} |",
            p.total as f64 / 1e9,
            p.active as f64 / 1e9,
            kv(4096),
            kv(32768),
            kv(262144),
            config.cache_size(1, 4096, 2).mamba_bytes() as f64 / (1u64 << 20) as f64
        );
        if name == "jamba-v0.1" {
            v01 = Some(config);
        }
    }
    // The paper's Table 1, next to the same arithmetic (2 · layers · kv_heads · head_dim · 2
    // bytes per token) on each model's published attention shape.
    println!();
    println!(
        "| model (paper, Table 1) | params | active | KV cache at 256K, paper | computed here |"
    );
    println!("|---|---|---|---|---|");
    let kv_256k = |layers: u64, kv_heads: u64, head_dim: u64| {
        gib(2 * layers * kv_heads * head_dim * 2 * 262_144)
    };
    for (model, params, active, paper_gb, layers, kv_heads) in [
        ("Llama-2 (7B)", "6.7B", "6.7B", "128GB", 32, 32),
        ("Mistral (7B)", "7.2B", "7.2B", "32GB", 32, 8),
        ("Mixtral (8x7B)", "46.7B", "12.9B", "32GB", 32, 8),
    ] {
        println!(
            "| {model} | {params} | {active} | {paper_gb} | {:.0} GiB |",
            kv_256k(layers, kv_heads, 128)
        );
    }
    if let Some(c) = v01 {
        let size = c.cache_size(1, 262_144, 2);
        let p = c.param_count();
        println!(
            "| Jamba (v0.1) | 52B | 12B | 4GB | {:.0} GiB KV (+ {:.1} MiB Mamba state); {:.1}B / {:.1}B params |",
            gib(size.kv_bytes),
            size.mamba_bytes() as f64 / (1u64 << 20) as f64,
            p.total as f64 / 1e9,
            p.active as f64 / 1e9
        );
    }
    Ok(())
}
