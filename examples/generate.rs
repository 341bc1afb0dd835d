//! Load a Hugging Face checkpoint and generate a continuation of a prompt.
//!
//! ```sh
//! cargo run --release --example generate -- path/to/Jamba "The capital of France is"
//! ```

use jamba::backends::Cpu;
use jamba::generation::GenerationConfig;
use jamba::tokenizer::JambaTokenizer;
use jamba::{Engine, EngineOptions, Jamba, LoadOptions};

fn main() -> jamba::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or("../shared/fixtures/tiny-jamba".into());
    let prompt = args.next().unwrap_or("Beautiful is better than ugly.".into());

    let device = Default::default();
    let model = Jamba::<Cpu>::from_pretrained(&dir, &device, &LoadOptions::default())?;
    let tokenizer = JambaTokenizer::from_file(format!("{dir}/tokenizer.json"))?;
    let config = GenerationConfig {
        max_new_tokens: 20,
        ..GenerationConfig::for_model(&model)
    };
    let engine = Engine::new(model, EngineOptions::default());

    let ids = tokenizer.encode(&prompt, true)?;
    let out = engine.generate(&[ids], &config, |_row, _token| {})?;
    println!("{prompt}{}", tokenizer.decode(&out.tokens[0], true)?);
    Ok(())
}
