//! The Jamba causal language model (`JambaForCausalLM`): embedding, decoder layers, final norm
//! and language-model head.

use crate::ops::{JambaBackend, project};
use burn::module::{Module, ModuleMapper, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData, backend::Backend};

use crate::attention::AttentionMask;
use crate::cache::{JambaCache, LayerCache};
use crate::config::{JambaConfig, MixerKind};
use crate::error::{JambaError, Result};
use crate::layer::{DecoderLayer, LayerMasks, Mixer};
use crate::moe::load_balancing_loss;
use crate::norm::{RmsNorm, RmsNormConfig};

/// What a forward pass returns besides the logits.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Return every layer's hidden state (see [`JambaOutput::hidden_states`]).
    pub output_hidden_states: bool,
    /// Return the router logits of every MoE layer and the load-balancing loss.
    pub output_router_logits: bool,
    /// Compute logits only for the last `n` positions (`None`: all). Generation keeps 1, so a
    /// vocabulary × prompt-length matrix is never built.
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

/// The Jamba language model.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::{Int, Tensor};
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
    /// A model with random weights (for tests, benchmarks and the embedded demo), in f32.
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
}

impl<B: JambaBackend> Jamba<B> {
    /// Runs the model over `input_ids` `[batch, seq]`.
    ///
    /// `attention_mask` `[batch, seq]` marks real tokens with 1 and padding with 0 (left padding
    /// for generation); with a `cache`, it covers the new tokens only and the cache remembers the
    /// padding of earlier ones. With a `cache`, the new tokens continue the cached sequences and
    /// the cache is updated: prefill, decode steps and chunked prefill are all this call.
    ///
    /// Errors on an empty input, a token id outside the vocabulary, a mask of the wrong shape,
    /// or a cache built for another model or batch size.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        cache: Option<&mut JambaCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        let device = input_ids.device();
        debug_sync::<B>(&device, "the input upload")?;
        let id_range = || {
            (
                input_ids.clone().min().into_scalar().elem::<i64>(),
                input_ids.clone().max().into_scalar().elem::<i64>(),
            )
        };
        self.check_inputs(
            &input_ids,
            id_range,
            attention_mask.as_ref(),
            cache.as_deref(),
        )?;
        debug_sync::<B>(&device, "the input checks")?;
        self.forward_checked(input_ids, attention_mask, cache, options)
    }

    /// [`forward`](Self::forward) for token ids held on the host, `[batch, ids.len() / batch]`
    /// row-major, with an optional mask of the same layout. The ids are checked on the host,
    /// so a decoding step reads nothing back from the device before its logits
    /// (`forward` reads the ids' minimum and maximum to check them).
    ///
    /// ```
    /// use jamba::backends::Cpu;
    /// use jamba::{ForwardOptions, Jamba, JambaConfig};
    /// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64,
    ///     "attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 4}"#).unwrap();
    /// let model = Jamba::<Cpu>::init(&config, &Default::default());
    /// let mut cache = model.new_cache(2);
    /// let out = model.forward_ids(&[5, 6, 7, 8], 2, None, Some(&mut cache), &Default::default());
    /// assert_eq!(out.unwrap().logits.dims(), [2, 2, 64]);
    /// assert!(model.forward_ids(&[5, 64], 1, None, None, &Default::default()).is_err());
    /// ```
    pub fn forward_ids(
        &self,
        ids: &[i64],
        batch: usize,
        attention_mask: Option<&[i64]>,
        cache: Option<&mut JambaCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        if batch == 0 || ids.is_empty() || ids.len() % batch != 0 {
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
        let device = self.device();
        let tensor = |v: &[i64]| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v.to_vec(), [batch, seq]), &device)
        };
        let input_ids = tensor(ids);
        let attention_mask = attention_mask.map(tensor);
        let id_range = || {
            let (min, max) = (ids.iter().min(), ids.iter().max());
            (*min.expect("non-empty"), *max.expect("non-empty"))
        };
        self.check_inputs(
            &input_ids,
            id_range,
            attention_mask.as_ref(),
            cache.as_deref(),
        )?;
        self.forward_checked(input_ids, attention_mask, cache, options)
    }

    /// [`forward`](Self::forward) of ids this model chose on the device (its own argmax, so
    /// inside the vocabulary by construction): the shapes and the cache are checked, the ids'
    /// range is not, so nothing is read back from the device before the step is queued.
    pub(crate) fn forward_chosen(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<&mut JambaCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        self.check_inputs(&input_ids, || (0, 0), None, cache.as_deref())?;
        self.forward_checked(input_ids, None, cache, options)
    }

    fn forward_checked(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        mut cache: Option<&mut JambaCache<B>>,
        options: &ForwardOptions,
    ) -> Result<JambaOutput<B>> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let dtype = self.dtype();

        let padding = attention_mask.map(|m| m.equal_elem(0));
        let any_padding = padding
            .as_ref()
            .is_some_and(|p| p.clone().any().into_scalar().elem::<bool>());
        let padding = padding.filter(|_| any_padding);
        let keep = padding.as_ref().map(|p| {
            p.clone()
                .bool_not()
                .float()
                .cast(dtype)
                .reshape([batch, seq, 1])
        });
        let key_padding = match cache.as_deref_mut() {
            Some(c) => c.push_padding(seq, padding.clone(), &device),
            None => padding.clone(),
        };
        let attention = key_padding.map(|key_padding| AttentionMask {
            key_padding,
            query_padding: padding
                .clone()
                .unwrap_or_else(|| Tensor::<B, 2, Int>::zeros([batch, seq], &device).equal_elem(1)),
        });
        let masks = LayerMasks { attention, keep };

        let mut x = self.embed_tokens.forward(input_ids);
        debug_sync::<B>(&device, "the embedding")?;
        let mut hidden_states = Vec::new();
        let mut router_logits = Vec::new();
        let layers = self.layers.len();
        // Each layer's last residual addition is fused with the next norm, unless every
        // layer's output is wanted.
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let logits = if options.output_hidden_states {
                hidden_states.push(x.clone());
                let (y, logits) = layer.forward(x, &masks, layer_cache);
                x = y;
                logits
            } else {
                let out = layer.forward_deferred(x, pending.take(), &masks, layer_cache);
                x = out.residual;
                pending = Some(out.feed_forward);
                out.router_logits
            };
            debug_sync::<B>(&device, &format!("layer {i}"))?;
            if let (true, Some(logits)) = (options.output_router_logits, logits) {
                router_logits.push((i, logits));
            }
        }
        let keep_from = match options.logits_to_keep {
            Some(n) if n > 0 && n < seq => seq - n,
            _ => 0,
        };
        // Only the kept positions' logits: the final norm folded into the head where the
        // backend can ([`JambaBackend::normed_projection`]; not when the last hidden state,
        // the norm's output, is wanted).
        let folded = if options.output_hidden_states {
            None
        } else {
            let tail = |t: Tensor<B, 3>| t.slice([0..batch, keep_from..seq]);
            let (x, pending) = (tail(x.clone()), pending.clone().map(tail));
            let norm = &self.final_layernorm;
            match &self.lm_head {
                Some(head) => norm.project_normed(&x, pending.as_ref(), head),
                None => B::normed_projection(crate::ops::NormedProjection {
                    x,
                    pending,
                    norm: norm.weight.val(),
                    eps: norm.eps,
                    weight: self.embed_tokens.weight.val().transpose(),
                    bias: None,
                }),
            }
        };
        let logits = match folded {
            Some(logits) => logits,
            None => {
                let x = match pending {
                    Some(p) => self.final_layernorm.add_forward(x, p).1,
                    None => self.final_layernorm.forward(x),
                };
                self.head(x, &mut hidden_states, options, keep_from, layers)
            }
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

    /// The head on the final norm's output `x` (recorded as the last hidden state when asked
    /// for), for the positions from `keep_from`.
    fn head(
        &self,
        x: Tensor<B, 3>,
        hidden_states: &mut Vec<Tensor<B, 3>>,
        options: &ForwardOptions,
        keep_from: usize,
        layers: usize,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        if options.output_hidden_states {
            // transformers reports the last layer's output after the final norm.
            if layers > 0 {
                hidden_states.push(x.clone());
            }
        }
        let x = x.slice([0..batch, keep_from..seq]);
        match &self.lm_head {
            Some(head) => project(head, x),
            None => B::projection(x, self.embed_tokens.weight.val().transpose(), None),
        }
    }

    fn check_inputs(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        id_range: impl FnOnce() -> (i64, i64),
        attention_mask: Option<&Tensor<B, 2, Int>>,
        cache: Option<&JambaCache<B>>,
    ) -> Result<()> {
        let [batch, seq] = input_ids.dims();
        if batch == 0 || seq == 0 {
            return Err(JambaError::Input(format!(
                "empty input of shape [{batch}, {seq}]"
            )));
        }
        let vocab = self.config().vocab_size as i64;
        // The smallest and largest id: read back from the device for `forward`, taken from the
        // host copy for `forward_ids`. Called only once the input is known to be non-empty.
        let (min, max) = id_range();
        if min < 0 || max >= vocab {
            let bad = if min < 0 { min } else { max };
            return Err(JambaError::Input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
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
            let matches = cache.layers.len() == self.layers.len()
                && cache.layers.iter().zip(&self.layers).all(|(c, l)| {
                    matches!(
                        (c, &l.mixer),
                        (LayerCache::Attention(_), Mixer::Attention(_))
                            | (LayerCache::Mamba(_), Mixer::Mamba(_))
                    )
                });
            if !matches {
                return Err(JambaError::Input(
                    "the cache was built for a different layer plan".into(),
                ));
            }
        }
        Ok(())
    }

    /// The kinds of this model's mixers, in order.
    pub fn mixer_kinds(&self) -> Vec<MixerKind> {
        self.layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Attention(_) => MixerKind::Attention,
                Mixer::Mamba(_) => MixerKind::Mamba,
            })
            .collect()
    }
}

/// With `JAMBA_DEBUG_SYNC=1`, waits for the device after each stage of the forward and turns an
/// asynchronous device error into an error that names the stage (GPU backends report errors
/// at the next synchronisation, far from their cause).
pub fn debug_sync<B: Backend>(device: &B::Device, stage: &str) -> Result<()> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("JAMBA_DEBUG_SYNC").is_some_and(|v| v != "0")) {
        return Ok(());
    }
    B::sync(device).map_err(|e| JambaError::Input(format!("device error after {stage}: {e:?}")))
}
