//! # jamba
//!
//! The Jamba language model (AI21, [arXiv 2403.19887](https://arxiv.org/abs/2403.19887)), a
//! hybrid of Transformer attention layers, Mamba selective-state-space layers and
//! mixture-of-experts feed-forward blocks, on [Burn](https://burn.dev): modules that load
//! Hugging Face checkpoints and reproduce transformers' `JambaForCausalLM`, and an inference
//! engine that generates from them fast.
//!
//! - [`model`]: the modules, one per concept, each forward as the paper writes it. Generic over
//!   any Burn backend that implements [`JambaBackend`] (every backend Burn ships, `Autodiff`
//!   and `Fusion` included): train and fine-tune through it.
//! - [`engine`]: [`Engine`], the inference fast path built from a loaded model (fused decoding
//!   steps, routing on the device, host loops on the CPU), tested against the model.
//! - [`generation`]: batched, streamed generation with greedy and sampled decoding.
//! - [`JambaCache`]: keys and values for the attention layers only, a fixed-size state for the
//!   Mamba layers.
//! - Loading and saving ([`Jamba::from_pretrained`], [`Jamba::save_pretrained`]), the
//!   [`tokenizer`], the parity harness against reference outputs ([`reference`]).
//!
//! ```no_run
//! use jamba::backends::Cpu;
//! use jamba::generation::GenerationConfig;
//! use jamba::tokenizer::JambaTokenizer;
//! use jamba::{Engine, EngineOptions, Jamba, LoadOptions};
//!
//! let device = Default::default();
//! let model = Jamba::<Cpu>::from_pretrained("path/to/Jamba", &device, &LoadOptions::default())?;
//! let tokenizer = JambaTokenizer::from_file("path/to/Jamba/tokenizer.json")?;
//! let config = GenerationConfig { max_new_tokens: 20, ..GenerationConfig::for_model(&model) };
//! let engine = Engine::new(model, EngineOptions::default());
//! let prompt = tokenizer.encode("Hello", true)?;
//! let out = engine.generate(&[prompt], &config, |_row, _token| {})?;
//! println!("{}", tokenizer.decode(&out.tokens[0], true)?);
//! # Ok::<(), jamba::JambaError>(())
//! ```

pub mod backends;
pub mod cache;
pub mod config;
#[cfg(feature = "kernels")]
mod cube;
pub mod engine;
mod error;
pub mod generation;
#[cfg(any(feature = "flex", feature = "ndarray"))]
mod host;
mod loading;
pub mod model;
pub mod ops;
pub mod reference;
#[cfg(feature = "tokenizer")]
pub mod tokenizer;

pub use cache::JambaCache;
pub use config::JambaConfig;
pub use engine::{Engine, EngineBackend, EngineOptions, GreedyPipeline};
pub use error::{JambaError, Result};
pub use loading::{LoadOptions, ProgressFn};
pub use model::{ForwardOptions, Jamba, JambaOutput};
pub use ops::JambaBackend;

/// The CubeCL kernels (for direct use, benchmarks and tests), with the `kernels` feature.
#[cfg(feature = "kernels")]
pub use jamba_kernels as kernels;
/// Burn's CubeCL backend, whose tensors the [`kernels`] take.
#[cfg(feature = "kernels")]
pub use burn_cubecl;
