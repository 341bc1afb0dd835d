//! An interactive chat loop: each turn is appended to the conversation in a chat template and
//! the model answers, streamed. The template is Jamba-1.5's (`<|bom|><|user|> … <|eom|>`),
//! whose markers the instruct checkpoints' tokenizers carry; type an empty line to quit.
//!
//! ```sh
//! cargo run --release --example chat -- path/to/AI21-Jamba-1.5-Mini
//! ```

use std::io::{BufRead, Write};

use jamba::backends::Cpu;
use jamba::generation::{GenerationConfig, SamplingConfig};
use jamba::tokenizer::{JambaTokenizer, TextStream};
use jamba::{Engine, EngineOptions, Jamba, LoadOptions};

/// A conversation rendered in Jamba-1.5's chat template, ready for the assistant's turn.
fn render(turns: &[(&str, String)]) -> String {
    let mut text = String::from("<|startoftext|>");
    for (role, content) in turns {
        text += &format!("<|bom|><|{role}|> {content}<|eom|>");
    }
    text + "<|bom|><|assistant|>"
}

fn main() -> jamba::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or("../shared/fixtures/tiny-jamba".into());
    let device = Default::default();
    let model = Jamba::<Cpu>::from_pretrained(&dir, &device, &LoadOptions::default())?;
    let tokenizer = JambaTokenizer::from_file(format!("{dir}/tokenizer.json"))?;
    let mut config = GenerationConfig {
        max_new_tokens: 64,
        sampling: SamplingConfig {
            temperature: 0.7,
            top_p: Some(0.9),
            ..Default::default()
        },
        ..GenerationConfig::for_model(&model)
    };
    // The end of a turn ends the answer, where the tokenizer knows the marker.
    config.eos_token_ids.extend(tokenizer.token_to_id("<|eom|>"));
    let engine = Engine::new(model, EngineOptions::default());

    let mut turns: Vec<(&str, String)> = vec![("system", "You are a helpful assistant.".into())];
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).is_err() || line.trim().is_empty() {
            return Ok(());
        }
        turns.push(("user", line.trim().to_string()));
        let prompt = tokenizer.encode(&render(&turns), false)?;
        let mut stream = TextStream::new(&tokenizer);
        let mut answer = String::new();
        engine.generate(&[prompt], &config, |_, token| {
            if let Ok(Some(piece)) = stream.push(token) {
                print!("{piece}");
                std::io::stdout().flush().ok();
                answer.push_str(&piece);
            }
        })?;
        answer.extend(stream.finish()?);
        println!();
        turns.push(("assistant", answer));
    }
}
