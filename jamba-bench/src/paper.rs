//! `jamba-bench paper`: the paper's comparisons on this implementation. For each configuration
//! (by default the three same-size ones: hybrid 1:7, all attention, all Mamba), with random
//! weights: prefill throughput over growing prompt lengths and where memory runs out (Fig. 2),
//! decode throughput over batch sizes and context lengths (Fig. 3), and the cache each holds
//! (Table 1), measured from the cache and next to the analytic size.
//!
//! ```text
//! jamba-bench paper --backend cuda --dtype bf16 --out results/h200-paper.json
//! jamba-bench plot results/h200-paper.json --out-dir jamba-bench/plots
//! ```
//!
//! Decode runs start from [`JambaCache::synthetic`]: a cache holding `context` positions of random
//! keys, values and states. A step costs what the cached length makes it cost, whatever the
//! tokens were, and this way a 64K-context decode at batch 32 does not first need 2M tokens of
//! prefill.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use jamba::backends::{BackendKind, parse_dtype};
use jamba::cache::KV_BLOCK;
use jamba::config::MixerKind;
use jamba::generation::SplitMix64;
use jamba::{Engine, EngineBackend, EngineOptions, Jamba, JambaCache, JambaConfig, JambaError};
use serde::{Deserialize, Serialize};

use crate::{median, sync, write_rows};

#[derive(Args, Clone)]
pub struct PaperArgs {
    /// The configurations to compare (config.json files).
    #[arg(long, value_delimiter = ',', default_values = [
        "../shared/configs/bench-jamba-1b.config.json",
        "../shared/configs/bench-transformer-1b.config.json",
        "../shared/configs/bench-mamba-1b.config.json",
    ])]
    configs: Vec<PathBuf>,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Prompt lengths for prefill (batch 1).
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096, 16384, 65536, 262144])]
    prefill: Vec<usize>,
    /// Prompts are fed through the cache in chunks of this many tokens (bounds the attention
    /// scores and the scan's working set, as chunked prefill does in serving).
    #[arg(long, default_value_t = 2048)]
    prefill_chunk: usize,
    /// Batch sizes for decode.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    decode_batch: Vec<usize>,
    /// Context lengths (positions in the cache) for decode.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 16384, 65536])]
    decode_context: Vec<usize>,
    /// Timed decode steps per measurement.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Untimed decode steps first.
    #[arg(long, default_value_t = 2)]
    decode_warmup: usize,
    /// Timed repetitions of each prefill (the median is reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Untimed prefills of the same length first, for lengths up to `--warmup-max-len` (beyond,
    /// a warm-up costs as much as the measurement; kernels are compiled by then).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// See `--warmup`.
    #[arg(long, default_value_t = 16384)]
    warmup_max_len: usize,
    /// Once a configuration's prefill takes longer than this many seconds, its longer prompts
    /// are reported as skipped (keeps CPU runs short).
    #[arg(long)]
    max_secs: Option<f64>,
    /// Memory the run may use, in GiB: a case whose estimated footprint (weights, cache,
    /// largest transient) exceeds it is reported as out of memory without being run. Default:
    /// the host's available memory on the CPU backend; none on GPUs (a case is attempted, and a
    /// failed allocation is reported).
    #[arg(long)]
    memory_gib: Option<f64>,
    /// Write the rows here as JSON (and CSV beside it); `jamba-bench plot` draws them.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One measurement or one case that could not run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaperRow {
    pub config: String,
    pub backend: String,
    pub dtype: String,
    /// `prefill` or `decode`.
    pub phase: String,
    pub batch: usize,
    /// Prompt length (prefill) or cached positions (decode).
    pub context: usize,
    /// Tokens produced or consumed by the timed part.
    pub tokens: usize,
    pub median_secs: f64,
    pub tokens_per_sec: f64,
    /// Bytes the cache has allocated at the end (key/value capacity plus Mamba states).
    pub cache_bytes: u64,
    /// Bytes the cache holds for the positions in use.
    pub cache_used_bytes: u64,
    /// The analytic size for `batch` and `context` (keys, values and Mamba states).
    pub cache_analytic_bytes: u64,
    /// The analytic key/value part alone.
    pub kv_analytic_bytes: u64,
    /// The device allocator's reservation after the case (its peak since the cleanup before
    /// it), where the backend reports one.
    pub device_reserved_bytes: Option<u64>,
    /// `ok`, `out of memory`, `skipped` or `error`.
    pub status: String,
    pub note: Option<String>,
}

/// Rough peak bytes of a case: weights, the cache (key/value growth by doubling keeps up to
/// three times the final size alive while copying) and the largest transient (attention
/// scores in f32, the tensor-op scan's `[chunk, inner, state]` tensors).
fn estimate_bytes(
    config: &JambaConfig,
    phase: &str,
    batch: usize,
    context: usize,
    chunk: usize,
    dtype: DType,
) -> u64 {
    let s = dtype.size() as u64;
    let weights = config.param_count().total * s;
    let size = config.cache_size(batch, context + KV_BLOCK, dtype.size());
    let has_attention = config
        .layer_plan()
        .iter()
        .any(|l| l.mixer == MixerKind::Attention);
    let heads = config.num_attention_heads as u64;
    let (b, t) = (batch as u64, context as u64);
    let transient = if phase == "prefill" {
        let c = chunk.min(context) as u64;
        let scores = if has_attention {
            2 * b * heads * c * t * 4
        } else {
            0
        };
        let scan = 6 * b * c * (config.mamba_inner() * config.mamba_d_state) as u64 * 4;
        scores.max(scan) + 2 * size.kv_bytes
    } else {
        2 * b * heads * t * 4
    };
    weights + size.total() + transient
}

fn available_host_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Runs `f`, turning a panic (a failed device allocation panics in some backends) into an error.
fn guarded<T>(f: impl FnOnce() -> jamba::Result<T>) -> jamba::Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(JambaError::Input(format!("panicked: {}", panic_message(p)))))
}

fn is_memory_error(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    e.contains("memory") || e.contains("alloc")
}

pub fn run<B: EngineBackend>(args: &PaperArgs, device: &B::Device) -> jamba::Result<()> {
    if !B::supports_dtype(device, args.dtype) {
        return Err(JambaError::Input(format!(
            "{:?} does not support {:?}",
            args.backend, args.dtype
        )));
    }
    let memory_limit = args
        .memory_gib
        .map(|g| (g * (1u64 << 30) as f64) as u64)
        .or_else(|| {
            (args.backend == BackendKind::Cpu)
                .then(available_host_bytes)
                .flatten()
        });
    let configs = args
        .configs
        .iter()
        .map(|p| Ok((crate::config_name(p), JambaConfig::from_file(p)?)))
        .collect::<jamba::Result<Vec<_>>>()?;
    let cases =
        configs.len() * (args.prefill.len() + args.decode_batch.len() * args.decode_context.len());
    let bar = ProgressBar::new(cases as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} {elapsed}")
            .expect("valid template"),
    );
    let mut rows = Vec::new();
    for (name, config) in &configs {
        B::seed(device, 0);
        let engine = Engine::new(
            Jamba::<B>::init(config, device).cast(args.dtype),
            EngineOptions::default(),
        );
        sync::<B>(device)?;
        let params = config.param_count();
        bar.suspend(|| {
            eprintln!(
                "{name}: {:.2}B parameters ({:.2}B active), {:?} {:?}",
                params.total as f64 / 1e9,
                params.active as f64 / 1e9,
                args.backend,
                args.dtype
            )
        });
        let mut rng = SplitMix64::new(1);
        let base = |phase: &str, batch: usize, context: usize| {
            let analytic = config.cache_size(batch, context, args.dtype.size());
            PaperRow {
                config: name.clone(),
                backend: format!("{:?}", args.backend).to_lowercase(),
                dtype: format!("{:?}", args.dtype).to_lowercase(),
                phase: phase.into(),
                batch,
                context,
                tokens: 0,
                median_secs: f64::NAN,
                tokens_per_sec: f64::NAN,
                cache_bytes: 0,
                cache_used_bytes: 0,
                cache_analytic_bytes: analytic.total(),
                kv_analytic_bytes: analytic.kv_bytes,
                device_reserved_bytes: None,
                status: "ok".into(),
                note: None,
            }
        };
        // Outcome of a case that did not run or failed.
        let refuse = |mut row: PaperRow, estimate: u64| -> Option<PaperRow> {
            let limit = memory_limit?;
            (estimate > limit).then(|| {
                row.status = "out of memory".into();
                row.note = Some(format!(
                    "estimated {:.1} GiB > {:.1} GiB available; not run",
                    estimate as f64 / (1u64 << 30) as f64,
                    limit as f64 / (1u64 << 30) as f64
                ));
                row
            })
        };
        let measured =
            |row: PaperRow, tokens: usize, secs: f64, (allocated, used): (u64, u64)| PaperRow {
                tokens,
                median_secs: secs,
                tokens_per_sec: tokens as f64 / secs,
                cache_bytes: allocated,
                cache_used_bytes: used,
                device_reserved_bytes: B::memory_reserved(device),
                ..row
            };
        let fail = |mut row: PaperRow, e: JambaError| {
            let text = e.to_string();
            row.status = if is_memory_error(&text) {
                "out of memory".into()
            } else {
                "error".into()
            };
            row.note = Some(text);
            row
        };

        let mut too_slow = false;
        for &len in &args.prefill {
            bar.set_message(format!("{name} prefill {len}"));
            let row = base("prefill", 1, len);
            let estimate =
                estimate_bytes(config, "prefill", 1, len, args.prefill_chunk, args.dtype);
            let row = if too_slow {
                PaperRow {
                    status: "skipped".into(),
                    note: Some("a shorter prompt already exceeded --max-secs".into()),
                    ..row
                }
            } else if let Some(row) = refuse(row.clone(), estimate) {
                row
            } else {
                B::memory_cleanup(device);
                let warmup = if len <= args.warmup_max_len {
                    args.warmup
                } else {
                    0
                };
                let mut times = Vec::new();
                let mut cache_bytes = (0, 0);
                let result = guarded(|| {
                    for rep in 0..warmup + args.reps.max(1) {
                        let mut cache = engine.new_cache(1);
                        let t = Instant::now();
                        let logits = crate::prefill(
                            &engine,
                            &mut cache,
                            &mut rng,
                            1,
                            len,
                            Some(args.prefill_chunk),
                        )?;
                        crate::greedy_ids(logits)?;
                        sync::<B>(device)?;
                        if rep >= warmup {
                            times.push(t.elapsed().as_secs_f64());
                        }
                        cache_bytes = (cache.size_bytes(), cache.used_bytes());
                    }
                    Ok(())
                });
                match result {
                    Ok(()) => {
                        let secs = median(times);
                        too_slow = args.max_secs.is_some_and(|m| secs > m);
                        measured(row, len, secs, cache_bytes)
                    }
                    Err(e) => fail(row, e),
                }
            };
            bar.suspend(|| eprintln!("{}", describe(&row)));
            rows.push(row);
            bar.inc(1);
        }

        for &context in &args.decode_context {
            for &batch in &args.decode_batch {
                bar.set_message(format!("{name} decode b{batch} @{context}"));
                let row = base("decode", batch, context);
                let estimate = estimate_bytes(config, "decode", batch, context, 1, args.dtype);
                let row = if let Some(row) = refuse(row.clone(), estimate) {
                    row
                } else {
                    B::memory_cleanup(device);
                    let result = guarded(|| {
                        let mut cache =
                            JambaCache::<B>::synthetic(config, batch, context, args.dtype, device);
                        // As generation runs: each step queued from the previous step's
                        // argmax on the device, the chosen ids read back behind it.
                        let ids: Vec<i64> = (0..batch)
                            .map(|_| 3 + (rng.next_u64() % (config.vocab_size as u64 - 3)) as i64)
                            .collect();
                        let logits = engine.forward(&ids, batch, None, &mut cache, Some(1))?;
                        let secs = crate::decode_steps(
                            &engine,
                            &mut cache,
                            logits,
                            args.decode_warmup,
                            args.decode_steps,
                        )?;
                        Ok((
                            secs,
                            (cache.size_bytes(), cache.used_bytes()),
                        ))
                    });
                    match result {
                        Ok((secs, cache)) => measured(row, batch * args.decode_steps, secs, cache),
                        Err(e) => fail(row, e),
                    }
                };
                bar.suspend(|| eprintln!("{}", describe(&row)));
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    print_summary(&rows);
    write_rows(args.out.as_deref(), &rows)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn describe(r: &PaperRow) -> String {
    let what = format!(
        "{} {} b={} context={}",
        r.config, r.phase, r.batch, r.context
    );
    if r.status != "ok" {
        return format!("{what}: {} ({})", r.status, r.note.as_deref().unwrap_or(""));
    }
    let reserved = r
        .device_reserved_bytes
        .map(|b| format!(", device {:.2} GiB", gib(b)))
        .unwrap_or_default();
    format!(
        "{what}: {:.1} tokens/s ({:.3}s), cache {:.3} GiB used / {:.3} GiB allocated{reserved}",
        r.tokens_per_sec,
        r.median_secs,
        gib(r.cache_used_bytes),
        gib(r.cache_bytes)
    )
}

/// Markdown tables: throughput per configuration and the ratio of the first configuration (the
/// hybrid) to each other one at the same point.
pub(crate) fn print_summary(rows: &[PaperRow]) {
    let mut configs: Vec<&str> = Vec::new();
    for r in rows {
        if !configs.contains(&r.config.as_str()) {
            configs.push(&r.config);
        }
    }
    let Some(&first) = configs.first() else {
        return;
    };
    let cell = |r: Option<&PaperRow>| match r {
        Some(r) if r.status == "ok" => format!("{:.0}", r.tokens_per_sec),
        Some(r) => r.status.clone(),
        None => "".into(),
    };
    let find = |config: &str, phase: &str, batch: usize, context: usize| {
        rows.iter().find(|r| {
            r.config == config && r.phase == phase && r.batch == batch && r.context == context
        })
    };
    let ratio = |a: Option<&PaperRow>, b: Option<&PaperRow>| match (a, b) {
        (Some(a), Some(b)) if a.status == "ok" && b.status == "ok" => {
            format!("{:.2}×", a.tokens_per_sec / b.tokens_per_sec)
        }
        _ => "".into(),
    };
    let mut points: Vec<(&str, usize, usize)> = Vec::new();
    for r in rows {
        let p = (r.phase.as_str(), r.batch, r.context);
        if !points.contains(&p) {
            points.push(p);
        }
    }
    let others: Vec<&str> = configs[1..].to_vec();
    let mut header = String::from("| phase | batch | context |");
    for c in &configs {
        header += &format!(" {c} tokens/s |");
    }
    for c in &others {
        header += &format!(" {first} / {c} |");
    }
    println!("{header}");
    println!("|{}", "---|".repeat(3 + configs.len() + others.len()));
    for (phase, batch, context) in points {
        let mut line = format!("| {phase} | {batch} | {context} |");
        for c in &configs {
            line += &format!(" {} |", cell(find(c, phase, batch, context)));
        }
        for c in &others {
            line += &format!(
                " {} |",
                ratio(
                    find(first, phase, batch, context),
                    find(c, phase, batch, context)
                )
            );
        }
        println!("{line}");
    }

    // Table 1's question: the cache each configuration holds after its prompt, measured, and the
    // hybrid's key/value part (its cache less the fixed Mamba state) against each other's.
    println!();
    let mut header = String::from("| prompt |");
    for c in &configs {
        header += &format!(" {c} cache (MiB) |");
    }
    for c in &others {
        header += &format!(" {first} KV / {c} KV |");
    }
    println!("{header}");
    println!("|{}", "---|".repeat(1 + configs.len() + others.len()));
    let kv = |r: &PaperRow| {
        let mamba_state = r.cache_analytic_bytes - r.kv_analytic_bytes;
        r.cache_used_bytes.saturating_sub(mamba_state) as f64
    };
    for r0 in rows
        .iter()
        .filter(|r| r.config == first && r.phase == "prefill")
    {
        let mut line = format!("| {} |", r0.context);
        for c in &configs {
            line += &match find(c, "prefill", 1, r0.context) {
                Some(r) if r.status == "ok" => {
                    format!(" {:.2} |", r.cache_used_bytes as f64 / (1u64 << 20) as f64)
                }
                Some(r) => format!(" {} |", r.status),
                None => " |".into(),
            };
        }
        for c in &others {
            line += &match find(c, "prefill", 1, r0.context) {
                Some(r) if r.status == "ok" && r0.status == "ok" && kv(r) > 0.0 => {
                    format!(" 1/{:.3} |", kv(r) / kv(r0))
                }
                _ => " |".into(),
            };
        }
        println!("{line}");
    }
}
