//! The inference engine: the fast path of prefill and decoding, built once from a loaded
//! [`Jamba`] and tested against its plain forward.
//!
//! The engine computes what [`Jamba::forward`] computes with a cache, in the order that runs
//! fastest: each layer's last residual addition deferred into the next layer's first norm; for
//! a decoding step of a few rows, each norm folded into the launch after it (the mixer's input
//! projections, the feed-forward block's first launch, the head); a Mamba layer's decoding step
//! in one or two launches; a few tokens' experts routed on the device; a prefill's experts as
//! batched products; the scan's parameters in f32 computed once; greedy decoding one step
//! ahead of the host ([`GreedyPipeline`]). Its operations are a trait per concept
//! ([`ops`]), fused kernels on CubeCL backends and host loops on the CPU.
//!
//! ```
//! use jamba::backends::Cpu;
//! use jamba::{Engine, EngineOptions, Jamba, JambaConfig};
//! let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 2,
//!     "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64,
//!     "attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 4}"#).unwrap();
//! let engine = Engine::new(Jamba::<Cpu>::init(&config, &Default::default()), EngineOptions::default());
//! let mut cache = engine.new_cache(1);
//! let logits = engine.forward(&[5, 6, 7], 1, None, &mut cache, Some(1)).unwrap();
//! assert_eq!((logits.dims(), cache.seq_len()), ([1, 1, 64], 3));
//! ```

mod attention;
mod layer;
mod mamba;
pub mod ops;
mod pipeline;

pub use ops::{EngineBackend, QueuedIds, ScanParams};
pub use pipeline::GreedyPipeline;

use burn::tensor::{Bool, Int, Tensor, TensorData, backend::Backend};

use crate::cache::JambaCache;
use crate::error::{JambaError, Result};
use crate::generation::{GenerationConfig, GenerationOutput};
use crate::model::{Jamba, Mixer, check_ids, check_input, padding_masks};

/// Choices of an [`Engine`]; the defaults are the measured best.
///
/// ```
/// let options = jamba::EngineOptions { sync_each_layer: true, ..Default::default() };
/// assert!(options.greedy_pipeline);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Greedy generation issues each decoding step from the previous step's argmax while it is
    /// still on the device, and reads the tokens back behind it ([`GreedyPipeline`]). A row
    /// that stops on an end-of-sequence token costs one step computed for nothing.
    pub greedy_pipeline: bool,
    /// Waits for the device after every layer, so that an asynchronous device error (GPU
    /// backends report one at the next synchronisation) names the layer that raised it. Slow:
    /// for debugging a backend.
    pub sync_each_layer: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            greedy_pipeline: true,
            sync_each_layer: false,
        }
    }
}

/// The inference engine of a [`Jamba`] model (see the [module](self) documentation).
#[derive(Debug)]
pub struct Engine<B: EngineBackend> {
    model: Jamba<B>,
    /// Each layer's scan parameters (Mamba layers).
    scan: Vec<Option<ScanParams<B>>>,
    options: EngineOptions,
}

impl<B: EngineBackend> Engine<B> {
    /// An engine for `model`.
    pub fn new(model: Jamba<B>, options: EngineOptions) -> Self {
        let scan = model
            .layers
            .iter()
            .map(|layer| match &layer.mixer {
                Mixer::Mamba(mamba) => Some(ScanParams::new(mamba)),
                Mixer::Attention(_) => None,
            })
            .collect();
        Self {
            model,
            scan,
            options,
        }
    }

    /// The model.
    pub fn model(&self) -> &Jamba<B> {
        &self.model
    }

    /// The model back.
    pub fn into_model(self) -> Jamba<B> {
        self.model
    }

    /// The options.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// An empty cache for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> JambaCache<B> {
        self.model.new_cache(batch)
    }

    /// Feeds `ids` (`[batch, ids.len() / batch]`, row-major) through `cache` and returns the
    /// logits of the last `logits_to_keep` positions (`None`: every position),
    /// `[batch, kept, vocab]`: a prefill, a chunk of a chunked prefill, or a decoding step.
    /// `attention_mask` (the layout of `ids`) marks real tokens 1 and left padding 0.
    ///
    /// Everything is checked on the host, so a decoding step reads nothing back from the device
    /// before its logits. Errors on an empty or ragged input, an id outside the vocabulary, a
    /// mask of another shape, or a cache built for another model or batch size.
    pub fn forward(
        &self,
        ids: &[i64],
        batch: usize,
        attention_mask: Option<&[i64]>,
        cache: &mut JambaCache<B>,
        logits_to_keep: Option<usize>,
    ) -> Result<Tensor<B, 3>> {
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(JambaError::Input(format!(
                "{} token ids do not make {batch} non-empty rows",
                ids.len()
            )));
        }
        let seq = ids.len() / batch;
        if let Some(mask) = attention_mask
            && mask.len() != ids.len()
        {
            return Err(JambaError::Input(format!(
                "attention mask has {} entries but the input ids have [{batch}, {seq}]",
                mask.len()
            )));
        }
        check_input(&self.model, [batch, seq], None, Some(cache))?;
        let (min, max) = ids.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        check_ids(self.model.config(), min, max)?;
        let device = self.model.device();
        let upload = |v: &[i64]| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [batch, seq]), &device)
        };
        let padding = attention_mask
            .filter(|m| m.contains(&0))
            .map(|m| upload(m).equal_elem(0));
        let ids = upload(ids);
        B::run(|| self.run(ids, padding, cache, logits_to_keep))
    }

    /// [`forward`](Self::forward) of ids this model chose on the device (its own argmax, inside
    /// the vocabulary by construction), `[batch, 1]`, keeping the last logits: nothing is read
    /// back before the step is queued.
    pub(crate) fn forward_chosen(
        &self,
        ids: Tensor<B, 2, Int>,
        cache: &mut JambaCache<B>,
    ) -> Result<Tensor<B, 3>> {
        check_input(&self.model, ids.dims(), None, Some(cache))?;
        B::run(|| self.run(ids, None, cache, Some(1)))
    }

    /// Generates continuations of `prompts` ([`generate`](crate::generation::generate)).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        on_token: impl FnMut(usize, u32),
    ) -> Result<GenerationOutput> {
        crate::generation::generate(self, prompts, config, on_token)
    }

    /// Embedding → layers → final norm → head, for checked inputs.
    fn run(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<Tensor<B, 2, Bool>>,
        cache: &mut JambaCache<B>,
        logits_to_keep: Option<usize>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, seq] = ids.dims();
        let model = &self.model;
        let masks = padding_masks(padding, Some(&mut *cache), seq, model.dtype());
        let mut x = model.embed_tokens.forward(ids);
        let mut pending = None;
        for (i, layer) in model.layers.iter().enumerate() {
            let scan = self.scan[i].as_ref();
            let out = layer::forward(layer, scan, x, pending.take(), &masks, &mut cache.layers[i]);
            (x, pending) = (out.residual, Some(out.feed_forward));
            if self.options.sync_each_layer {
                sync::<B>(&model.device(), &format!("layer {i}"))?;
            }
        }
        let keep_from = seq - logits_to_keep.filter(|&n| n > 0).unwrap_or(seq).min(seq);
        let tail = |t: Tensor<B, 3>| t.slice([0..batch, keep_from..seq]);
        let (x, pending) = (tail(x), pending.map(tail));
        let head_bias = model.lm_head.as_ref().and_then(|h| h.bias.as_ref());
        let logits = B::project_normed(
            &x,
            pending.as_ref(),
            &model.final_layernorm,
            model.head_weight(),
            head_bias.map(|b| b.val()),
        );
        if self.options.sync_each_layer {
            sync::<B>(&model.device(), "the head")?;
        }
        Ok(logits)
    }
}

/// Waits for `device`, turning an asynchronous device error into one that names `stage`.
fn sync<B: Backend>(device: &B::Device, stage: &str) -> Result<()> {
    B::sync(device).map_err(|e| JambaError::Input(format!("device error after {stage}: {e:?}")))
}
