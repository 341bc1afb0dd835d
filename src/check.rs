//! `jamba check DIR`: load a checkpoint and compare it with its reference outputs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use jamba::reference::{Check, Fixture, decode_checks, parity_checks};
use jamba::{Engine, EngineOptions, Jamba, LoadOptions};

use crate::backends::{BackendKind, DTypeArg};

#[derive(Args)]
pub struct CheckArgs {
    /// A checkpoint folder (`config.json`, safetensors weights, optionally `expected.safetensors`).
    pub dir: PathBuf,
    /// The backend to run on.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// The dtype to compute in.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Multiplies every value tolerance (1: the fixture's own; see `Fixture::tolerance`).
    #[arg(long, default_value_t = 1.0)]
    pub tolerance_scale: f64,
}

pub fn run(args: CheckArgs) -> jamba::Result<ExitCode> {
    jamba::with_backend!(args.backend, |B, device| check::<B>(&args, &device))
}

fn check<B: jamba::EngineBackend>(args: &CheckArgs, device: &B::Device) -> jamba::Result<ExitCode> {
    let options = LoadOptions {
        dtype: Some(args.dtype.into()),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let model = Jamba::<B>::from_pretrained(&args.dir, device, &options)?;
    // Surface an asynchronous device error from the upload here, not at the first read.
    B::sync(device).map_err(|e| {
        jamba::JambaError::Input(format!(
            "device error while loading {}: {e:?}",
            args.dir.display()
        ))
    })?;
    println!(
        "loaded {} in {:.2?} ({:?}, {:?})",
        args.dir.display(),
        start.elapsed(),
        args.backend,
        args.dtype
    );
    if !args.dir.join("expected.safetensors").exists() {
        println!("no expected.safetensors: the checkpoint loads; nothing to compare");
        return Ok(ExitCode::SUCCESS);
    }
    let fixture = Fixture::open(&args.dir)?;
    let mut checks = parity_checks(&model, &fixture)?;
    let engine = Engine::new(model, EngineOptions::default());
    checks.extend(decode_checks(&engine, &fixture)?);
    let scale = args.tolerance_scale;
    if scale != 1.0 {
        println!("value tolerances × {scale} (--tolerance-scale)");
        for c in &mut checks {
            c.tolerance *= scale;
        }
    }
    Ok(print_table(&checks))
}

fn print_table(checks: &[Check]) -> ExitCode {
    let width = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<width$}  {:>11}  {:>11}  {:>9}  result",
        "tensor", "rel. error", "max abs", "tolerance"
    );
    for c in checks {
        println!(
            "{:<width$}  {:>11.3e}  {:>11.3e}  {:>9.1e}  {}",
            c.name,
            c.rel_err,
            c.max_abs,
            c.tolerance,
            if c.passed() { "pass" } else { "FAIL" }
        );
        if let Some(note) = &c.note {
            println!("{:<width$}    ({note})", "");
        }
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!("{} passed, {} failed", checks.len() - failed, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
