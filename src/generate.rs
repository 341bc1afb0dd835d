//! `jamba generate`: text generation from a checkpoint, or from the embedded demo model.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use jamba::generation::{FinishReason, GenerationConfig, SamplingConfig};
use jamba::tokenizer::{JambaTokenizer, TextStream};
use jamba::{Engine, EngineOptions, Jamba, JambaConfig, JambaError, LoadOptions};

use crate::backends::{BackendKind, DTypeArg};
use crate::info::human;

/// The embedded demo: Jamba's layer pattern at a small size, with the byte-fallback tokenizer of
/// the `tiny-jamba` fixture. Its weights are random.
const DEMO_CONFIG: &str = include_str!("../assets/demo-config.json");
const DEMO_TOKENIZER: &[u8] = include_bytes!("../assets/demo-tokenizer.json");

#[derive(Args)]
pub struct GenerateArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json). Without it,
    /// an embedded demo model with random weights runs.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt; repeat the flag for a batch of prompts.
    #[arg(long, default_value = "Beautiful is better than ugly.")]
    pub prompt: Vec<String>,
    /// Run each prompt this many times in the batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Longest sequence (prompt + generated); defaults to the model's maximum.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens reaching this probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampler (and of the demo model's random weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt through the cache in chunks of this many tokens.
    #[arg(long)]
    pub prefill_chunk: Option<usize>,
    /// The backend.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// The dtype of weights and activations.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// A tokenizer.json other than the checkpoint's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> jamba::Result<ExitCode> {
    jamba::with_backend!(args.backend, |B, device| run_on::<B>(&args, &device))
}

fn load<B: Backend>(
    args: &GenerateArgs,
    device: &B::Device,
) -> jamba::Result<(Jamba<B>, JambaTokenizer)> {
    let dtype = args.dtype.into();
    if !B::supports_dtype(device, dtype) {
        return Err(JambaError::Input(format!(
            "the {:?} backend does not support {dtype:?}",
            args.backend
        )));
    }
    let Some(dir) = &args.model else {
        eprintln!(
            "note: no --model given: running the embedded demo (Jamba's layer pattern, 8 layers, hidden 256) \
                   with RANDOM weights, so the text is noise. Pass --model DIR for a real checkpoint."
        );
        B::seed(device, args.seed);
        let config = JambaConfig::from_json_str(DEMO_CONFIG)?;
        let model = Jamba::<B>::init(&config, device).cast(dtype);
        return Ok((model, JambaTokenizer::from_bytes(DEMO_TOKENIZER)?));
    };
    let tokenizer_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    let tokenizer = JambaTokenizer::from_file(&tokenizer_path)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {bar:40} {pos}/{len} tensors {elapsed}")
            .expect("valid template"),
    );
    let progress_bar = bar.clone();
    let options = LoadOptions {
        dtype: Some(dtype),
        progress: Some(Arc::new(move |done, total| {
            progress_bar.set_length(total as u64);
            progress_bar.set_position(done as u64);
        })),
    };
    let model = Jamba::<B>::from_pretrained(dir, device, &options)?;
    bar.finish_and_clear();
    Ok((model, tokenizer))
}

fn run_on<B: jamba::EngineBackend>(
    args: &GenerateArgs,
    device: &B::Device,
) -> jamba::Result<ExitCode> {
    let (model, tokenizer) = load::<B>(args, device)?;
    let mut prompts = Vec::new();
    for text in &args.prompt {
        let ids = tokenizer.encode(text, true)?;
        prompts.extend(std::iter::repeat_n(ids, args.batch.max(1)));
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        max_context: args.max_context,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        prefill_chunk: args.prefill_chunk,
        ..GenerationConfig::for_model(&model)
    };
    let streaming = prompts.len() == 1;
    let mut stream = TextStream::new(&tokenizer);
    let mut stdout = std::io::stdout();
    if streaming {
        print!("{}", args.prompt[0]);
    }
    let engine = Engine::new(model, EngineOptions::default());
    let out = engine.generate(&prompts, &config, |_, token| {
        if streaming && let Ok(Some(piece)) = stream.push(token) {
            print!("{piece}");
            let _ = stdout.flush();
        }
    })?;
    if streaming {
        if let Some(piece) = stream.finish()? {
            print!("{piece}");
        }
        println!();
    } else {
        for (row, tokens) in out.tokens.iter().enumerate() {
            let prompt = &args.prompt[row / args.batch.max(1)];
            println!("[{row}] {prompt}{}", tokenizer.decode(tokens, true)?);
        }
    }
    let s = &out.stats;
    let eos = out
        .finish
        .iter()
        .filter(|f| **f == FinishReason::Eos)
        .count();
    eprintln!(
        "\nprefill: {} tokens in {:.3}s ({:.1} tokens/s) | decode: {} tokens in {:.3}s ({:.1} tokens/s) | \
         peak cache {} | {} of {} sequences ended on EOS | {:?} {:?}",
        s.prefill_tokens,
        s.prefill_secs,
        s.prefill_tokens_per_sec(),
        s.decode_tokens,
        s.decode_secs,
        s.decode_tokens_per_sec(),
        human(s.peak_cache_bytes),
        eos,
        out.finish.len(),
        args.backend,
        args.dtype,
    );
    Ok(ExitCode::SUCCESS)
}
