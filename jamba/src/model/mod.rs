//! The Jamba model as Burn modules, one file per concept, each forward written as the paper and
//! the checkpoint keys say it: [`Jamba`] (`JambaForCausalLM`: embedding → decoder layers →
//! final norm → head), [`DecoderLayer`] (`x + mixer(norm(x))`, `x + feed_forward(norm(x))`),
//! [`Attention`], [`MambaMixer`], [`SparseMoe`], [`Mlp`], [`RmsNorm`].
//!
//! This is the path training differentiates and the reference the inference
//! [`Engine`](crate::engine::Engine) is tested against. It runs on every Burn backend: the few
//! operations tensor ops express badly (the selective scan, the causal convolution) go through
//! [`JambaBackend`], whose defaults are tensor ops and whose CubeCL and CPU implementations are
//! fused kernels and host loops.

mod attention;
mod decoder_layer;
mod mamba;
mod mlp;
mod moe;
mod rms_norm;

pub use attention::{Attention, AttentionConfig, AttentionMask};
pub use decoder_layer::{DecoderLayer, FeedForward, LayerMasks, Mixer};
pub use mamba::{MambaMixer, MambaMixerConfig};
pub use mlp::{Mlp, MlpConfig};
pub use moe::{Experts, SparseMoe, SparseMoeConfig, load_balancing_loss, route};
pub use rms_norm::{RmsNorm, RmsNormConfig, rms_norm};

pub(crate) use mamba::masked;
pub(crate) use moe::host_ids;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{Bool, DType, ElementConversion, Int, Tensor, backend::Backend};

use crate::cache::JambaCache;
use crate::config::{JambaConfig, MixerKind};
use crate::error::{JambaError, Result};
use crate::ops::{JambaBackend, linear};

/// What a forward pass returns besides the logits.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Return every layer's hidden state (see [`JambaOutput::hidden_states`]).
    pub output_hidden_states: bool,
    /// Return the router logits of every MoE layer and the load-balancing loss.
    pub output_router_logits: bool,
    /// Compute logits only for the last `n` positions (`None`: all), so that a
    /// vocabulary × prompt-length matrix is not built when only the last is wanted.
    pub logits_to_keep: Option<usize>,
}

/// The result of [`Jamba::forward`].
#[derive(Debug, Clone)]
pub struct JambaOutput<B: Backend> {
    /// `[batch, kept positions, vocab]`.
    pub logits: Tensor<B, 3>,
    /// With `output_hidden_states`: the embedding output, then the output of each layer but the
    /// last, then the last layer's output after the final norm (`num_layers + 1` tensors, as
    /// transformers returns them).
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// With `output_router_logits`: `(layer index, [batch · seq, num_experts])` per MoE layer.
    pub router_logits: Vec<(usize, Tensor<B, 2>)>,
    /// With `output_router_logits` and at least one MoE layer: the load-balancing loss, before
    /// `router_aux_loss_coef`, `[1]`.
    pub aux_loss: Option<Tensor<B, 1>>,
}

/// The Jamba causal language model (`JambaForCausalLM`).
///
/// ```
/// use burn::tensor::{Int, Tensor};
/// use jamba::backends::Cpu;
/// use jamba::{ForwardOptions, Jamba, JambaConfig};
/// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64,
///     "attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 4}"#).unwrap();
/// let device = Default::default();
/// let model = Jamba::<Cpu>::init(&config, &device);
/// let ids = Tensor::<Cpu, 2, Int>::from_ints([[5, 6, 7]], &device);
/// let out = model.forward(ids, None, None, &ForwardOptions::default()).unwrap();
/// assert_eq!(out.logits.dims(), [1, 3, 64]);
/// ```
#[derive(Module, Debug)]
pub struct Jamba<B: Backend> {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding<B>,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.final_layernorm`.
    pub final_layernorm: RmsNorm<B>,
    /// `lm_head`; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: JambaConfig,
}

impl<B: Backend> Jamba<B> {
    /// A model with random weights (for tests, benchmarks and training from scratch), in f32.
    pub fn init(config: &JambaConfig, device: &B::Device) -> Self {
        let h = config.hidden_size;
        Self {
            embed_tokens: EmbeddingConfig::new(config.vocab_size, h).init(device),
            layers: config
                .layer_plan()
                .into_iter()
                .map(|spec| DecoderLayer::init(config, spec, device))
                .collect(),
            final_layernorm: RmsNormConfig::new(h)
                .with_eps(config.rms_norm_eps)
                .init(device),
            lm_head: (!config.tie_word_embeddings).then(|| {
                LinearConfig::new(h, config.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            config: config.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &JambaConfig {
        &self.config
    }

    /// The dtype of the weights (and of the activations).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.weight.val().dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> B::Device {
        self.embed_tokens.weight.val().device()
    }

    /// The same model with every weight cast to `dtype` (e.g. `DType::BF16` on a GPU).
    pub fn cast(self, dtype: DType) -> Self {
        struct Cast(DType);
        impl<B: Backend> ModuleMapper<B> for Cast {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let (id, tensor, mapper) = param.consume();
                Param::from_mapped_value(id, tensor.cast(self.0), mapper)
            }
        }
        self.map(&mut Cast(dtype))
    }

    /// An empty cache for `batch` sequences, matching this model's layers and dtype.
    pub fn new_cache(&self, batch: usize) -> JambaCache<B> {
        JambaCache::new(self.config(), batch, self.dtype(), &self.device())
    }

    /// The kinds of this model's mixers, in order.
    pub fn mixer_kinds(&self) -> Vec<MixerKind> {
        self.layers.iter().map(DecoderLayer::mixer_kind).collect()
    }

    /// The head's weight in Burn's `[hidden, vocab]` layout: `lm_head`, or the embedding's
    /// transpose when they are tied.
    pub(crate) fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.weight.val(),
            None => self.embed_tokens.weight.val().transpose(),
        }
    }
}

impl<B: JambaBackend> Jamba<B> {
    /// Runs the model over `input_ids` `[batch, seq]`.
    ///
    /// `attention_mask` `[batch, seq]` marks real tokens with 1 and padding with 0 (left padding
    /// for generation); with a `cache`, it covers the new tokens only and the cache remembers
    /// the padding of earlier ones. With a `cache`, the new tokens continue the cached sequences
    /// and the cache is updated: prefill, a decoding step and a chunk of a chunked prefill are
    /// all this call. (For fast inference, build an [`Engine`](crate::engine::Engine).)
    ///
    /// Errors on an empty input, a token id outside the vocabulary, a mask of the wrong shape,
    /// or a cache built for another model or batch size.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut JambaCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        let [batch, seq] = input_ids.dims();
        check_input(self, [batch, seq], attention_mask.as_ref(), cache.as_deref())?;
        if batch > 0 && seq > 0 {
            let min = input_ids.clone().min().into_scalar().elem::<i64>();
            let max = input_ids.clone().max().into_scalar().elem::<i64>();
            check_ids(self.config(), min, max)?;
        }
        let masks = layer_masks(attention_mask, cache.as_deref_mut(), seq, self.dtype());

        let mut x = self.embed_tokens.forward(input_ids);
        let mut hidden_states = Vec::new();
        let mut router_logits = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            if options.output_hidden_states {
                hidden_states.push(x.clone());
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (y, logits) = layer.forward(x, &masks, layer_cache);
            x = y;
            if let (true, Some(logits)) = (options.output_router_logits, logits) {
                router_logits.push((i, logits));
            }
        }
        let x = self.final_layernorm.forward(x);
        if options.output_hidden_states && !self.layers.is_empty() {
            // transformers reports the last layer's output after the final norm.
            hidden_states.push(x.clone());
        }
        let keep_from = seq - options.logits_to_keep.filter(|&n| n > 0).unwrap_or(seq).min(seq);
        let x = x.slice([0..batch, keep_from..seq]);
        let logits = match &self.lm_head {
            Some(head) => linear(head, x),
            None => B::projection(x, self.head_weight(), None),
        };
        let aux_loss = if options.output_router_logits {
            let logits: Vec<_> = router_logits.iter().map(|(_, l)| l.clone()).collect();
            load_balancing_loss(&logits, self.config().num_experts_per_tok)
        } else {
            None
        };
        Ok(JambaOutput {
            logits,
            hidden_states,
            router_logits,
            aux_loss,
        })
    }
}

/// Checks an input of `[batch, seq]` ids against the model, its mask and its cache.
pub(crate) fn check_input<B: Backend>(
    model: &Jamba<B>,
    [batch, seq]: [usize; 2],
    attention_mask: Option<&Tensor<B, 2, Int>>,
    cache: Option<&JambaCache<B>>,
) -> Result<()> {
    if batch == 0 || seq == 0 {
        return Err(JambaError::Input(format!(
            "empty input of shape [{batch}, {seq}]"
        )));
    }
    if let Some(mask) = attention_mask
        && mask.dims() != [batch, seq]
    {
        return Err(JambaError::Input(format!(
            "attention mask has shape {:?} but the input ids have [{batch}, {seq}]",
            mask.dims()
        )));
    }
    if let Some(cache) = cache {
        if cache.batch_size() != batch {
            return Err(JambaError::Input(format!(
                "the cache holds {} sequences but the input has {batch}",
                cache.batch_size()
            )));
        }
        if cache.mixer_kinds() != model.mixer_kinds() {
            return Err(JambaError::Input(
                "the cache was built for a different layer plan".into(),
            ));
        }
    }
    Ok(())
}

/// Checks the smallest and largest token id against the vocabulary.
pub(crate) fn check_ids(config: &JambaConfig, min: i64, max: i64) -> Result<()> {
    let vocab = config.vocab_size as i64;
    if min < 0 || max >= vocab {
        let bad = if min < 0 { min } else { max };
        return Err(JambaError::Input(format!(
            "token id {bad} is outside the vocabulary (size {vocab})"
        )));
    }
    Ok(())
}

/// The padding of `attention_mask` (1 real, 0 pad) in the forms the layers take, recorded in
/// `cache` when there is one. Both forms are `None` when nothing, cached or new, is padding.
pub(crate) fn layer_masks<B: Backend>(
    attention_mask: Option<Tensor<B, 2, Int>>,
    cache: Option<&mut JambaCache<B>>,
    seq: usize,
    dtype: DType,
) -> LayerMasks<B> {
    let padding = attention_mask.map(|m| m.equal_elem(0));
    let padding = padding.filter(|p| p.clone().any().into_scalar().elem::<bool>());
    padding_masks(padding, cache, seq, dtype)
}

/// [`layer_masks`] from the padding itself (`true` at pads; `None`: none).
pub(crate) fn padding_masks<B: Backend>(
    padding: Option<Tensor<B, 2, Bool>>,
    cache: Option<&mut JambaCache<B>>,
    seq: usize,
    dtype: DType,
) -> LayerMasks<B> {
    let keep = padding.as_ref().map(|p| {
        let batch = p.dims()[0];
        p.clone()
            .bool_not()
            .float()
            .cast(dtype)
            .reshape([batch, seq, 1])
    });
    let key_padding = match cache {
        Some(c) => c.push_padding(seq, padding.clone()),
        None => padding.clone(),
    };
    let attention = key_padding.map(|key_padding| {
        let batch = key_padding.dims()[0];
        let device = key_padding.device();
        AttentionMask {
            key_padding,
            query_padding: padding.unwrap_or_else(|| {
                Tensor::<B, 2, Int>::zeros([batch, seq], &device).equal_elem(1)
            }),
        }
    });
    LayerMasks { attention, keep }
}
