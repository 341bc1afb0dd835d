//! `jamba info`: what a configuration implies, without weights.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use jamba::JambaConfig;
use jamba::config::{FeedForwardKind, MixerKind};

#[derive(Args)]
pub struct InfoArgs {
    /// A `config.json`, or a checkpoint folder holding one.
    pub config: PathBuf,
    /// Context lengths for the cache table.
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize, 32768, 262144])]
    pub context: Vec<usize>,
    /// Batch size for the cache table.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

pub fn run(args: InfoArgs) -> jamba::Result<ExitCode> {
    let path = if args.config.is_dir() {
        args.config.join("config.json")
    } else {
        args.config.clone()
    };
    let config = JambaConfig::from_file(&path)?;
    let plan: String = config
        .layer_plan()
        .iter()
        .map(|l| match (l.mixer, l.feed_forward) {
            (MixerKind::Attention, FeedForwardKind::Mlp) => "A",
            (MixerKind::Attention, FeedForwardKind::Moe { .. }) => "a",
            (MixerKind::Mamba, FeedForwardKind::Mlp) => "M",
            (MixerKind::Mamba, FeedForwardKind::Moe { .. }) => "m",
        })
        .collect();
    let p = config.param_count();
    println!("{}", path.display());
    println!("layers      {plan}  (A/M: attention/Mamba; lower case: MoE feed-forward)");
    println!(
        "parameters  {:.2}B total, {:.2}B active",
        p.total as f64 / 1e9,
        p.active as f64 / 1e9
    );
    println!(
        "cache (batch {}, 16-bit KV and conv, f32 SSM state):",
        args.batch
    );
    println!(
        "{:>10} {:>14} {:>14} {:>14}",
        "context", "KV", "Mamba state", "total"
    );
    for ctx in args.context {
        let c = config.cache_size(args.batch, ctx, 2);
        println!(
            "{:>10} {:>14} {:>14} {:>14}",
            ctx,
            human(c.kv_bytes),
            human(c.mamba_bytes()),
            human(c.total())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024f64.powi(3) {
        format!("{:.2} GiB", b / 1024f64.powi(3))
    } else if b >= 1024f64.powi(2) {
        format!("{:.2} MiB", b / 1024f64.powi(2))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
