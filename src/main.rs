//! `jamba`: check a checkpoint against reference outputs, describe a configuration, generate text.

mod backends;
mod check;
mod generate;
mod info;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "jamba",
    version,
    about = "The Jamba hybrid Transformer-Mamba MoE language model on Burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a checkpoint folder and, where it holds an `expected.safetensors` in the fixture
    /// format, compare every output with it; exits non-zero on any failure.
    Check(check::CheckArgs),
    /// Generate text (streams it, then prints throughput and cache size).
    Generate(generate::GenerateArgs),
    /// Print a configuration's layer plan, parameter counts and cache sizes.
    Info(info::InfoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Info(args) => info::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
