//! Generate from a batch of prompts at once (left-padded into one batch), streaming each row's
//! text as its tokens arrive, with temperature and nucleus sampling.
//!
//! ```sh
//! cargo run --release --example stream_batch -- path/to/Jamba
//! ```

use jamba::backends::Cpu;
use jamba::generation::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::{JambaTokenizer, TextStream};
use jamba::{Engine, EngineOptions, Jamba, LoadOptions};

fn main() -> jamba::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or("../shared/fixtures/tiny-jamba".into());
    let prompts = ["Once upon a time", "The recipe calls for", "In 1969,"];

    let device = Default::default();
    let model = Jamba::<Cpu>::from_pretrained(&dir, &device, &LoadOptions::default())?;
    let tokenizer = JambaTokenizer::from_file(format!("{dir}/tokenizer.json"))?;
    let config = GenerationConfig {
        max_new_tokens: 24,
        sampling: SamplingConfig {
            temperature: 0.8,
            top_p: Some(0.95),
            top_k: None,
            seed: 7,
        },
        ..GenerationConfig::for_model(&model)
    };
    let engine = Engine::new(model, EngineOptions::default());

    let ids = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true))
        .collect::<jamba::Result<Vec<_>>>()?;
    // One detokenizer per row: a character spelled by several byte tokens comes out whole.
    let mut streams: Vec<TextStream> = prompts.iter().map(|_| TextStream::new(&tokenizer)).collect();
    let mut texts: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
    let out = engine.generate(&ids, &config, |row, token| {
        if let Ok(Some(piece)) = streams[row].push(token) {
            texts[row].push_str(&piece);
            println!("[{row}] {}", texts[row]);
        }
    })?;
    for (row, stream) in streams.iter_mut().enumerate() {
        if let Some(rest) = stream.finish()? {
            texts[row].push_str(&rest);
        }
        println!("final [{row}] ({:?}): {}", out.finish[row], texts[row]);
    }
    let stats = &out.stats;
    println!(
        "{:.1} tokens/s prefill, {:.1} tokens/s decode",
        stats.prefill_tokens_per_sec(),
        stats.decode_tokens_per_sec()
    );
    Ok(())
}
