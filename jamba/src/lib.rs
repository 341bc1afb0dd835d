//! # jamba
//!
//! The Jamba language model (AI21, [arXiv 2403.19887](https://arxiv.org/abs/2403.19887)), a hybrid
//! of Transformer attention layers, Mamba selective-state-space layers and mixture-of-experts
//! feed-forward blocks, as backend-generic [Burn](https://burn.dev) modules that load Hugging Face
//! checkpoints and reproduce transformers' `JambaForCausalLM`.
//!
//! ```no_run
//! use jamba::backends::Cpu;
//! use burn::tensor::{Int, Tensor};
//! use jamba::{ForwardOptions, Jamba, LoadOptions};
//!
//! let device = Default::default();
//! let model = Jamba::<Cpu>::from_pretrained("path/to/checkpoint", &device, &LoadOptions::default())?;
//! let ids = Tensor::<Cpu, 2, Int>::from_ints([[1, 2, 3]], &device);
//! let out = model.forward(ids, None, None, &ForwardOptions::default())?;
//! println!("{:?}", out.logits.dims());
//! # Ok::<(), jamba::JambaError>(())
//! ```
//!
//! One module per concept: [`config`], [`norm`], [`attention`], [`mamba`] (with the selective
//! scan in [`scan`] and the backend extension with the fused kernels in [`ops`]), [`mlp`], [`moe`], [`layer`], [`model`], [`cache`], [`loading`],
//! [`reference`] (the fixture format used for parity checks).

pub mod attention;
pub mod backends;
pub mod cache;
pub mod config;
pub mod error;
pub mod generation;
pub mod host;
pub mod layer;
pub mod loading;
pub mod mamba;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod norm;
pub mod ops;
pub mod reference;
pub mod scan;
#[cfg(feature = "tokenizer")]
pub mod tokenizer;

pub use cache::JambaCache;
pub use config::JambaConfig;
pub use error::{JambaError, Result};
pub use loading::LoadOptions;
pub use model::{ForwardOptions, Jamba, JambaOutput};
pub use ops::JambaBackend;

/// Burn's CubeCL backend, whose tensors the [`kernels`] take.
#[cfg(feature = "kernels")]
pub use burn_cubecl;
/// The CubeCL kernels (for direct use and tests), with the `kernels` feature.
#[cfg(feature = "kernels")]
pub use jamba_kernels as kernels;
