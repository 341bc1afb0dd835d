//! The model configuration: Hugging Face's `config.json` for Jamba, validated, with the layer plan
//! and the analytic figures (parameter counts, inference cache size) derived from it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{JambaError, Result};

/// `mamba_dt_rank`: `"auto"` (= ⌈hidden_size / 16⌉) or an explicit rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DtRank {
    /// An explicit rank.
    Value(usize),
    /// The string `"auto"`.
    Auto(AutoTag),
}

/// The literal string `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoTag {
    /// `"auto"`.
    #[serde(rename = "auto")]
    Auto,
}

/// `eos_token_id`: one id or a list of ids (Jamba 1.5 ships a list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which ends a sequence.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a slice-like vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// A Hugging Face Jamba `config.json`.
///
/// Unknown fields are ignored; missing fields take transformers' defaults (those of Jamba-v0.1),
/// except `num_key_value_heads`, which defaults to `num_attention_heads`.
///
/// ```
/// let config = jamba::JambaConfig::from_json_str(r#"{"hidden_size": 64, "num_hidden_layers": 4,
///     "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 128}"#).unwrap();
/// assert_eq!(config.num_key_value_heads(), 4);
/// assert_eq!(config.dt_rank(), 4); // "auto" = ceil(64 / 16)
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JambaConfig {
    /// Vocabulary size.
    #[serde(default = "d::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "d::hidden_size")]
    pub hidden_size: usize,
    /// Width of each MLP / expert.
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of decoder layers.
    #[serde(default = "d::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Query heads of the attention layers.
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); absent means one per query head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Activation of the MLPs and the Mamba mixer; only `silu` exists in Jamba.
    #[serde(default = "d::hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every RMSNorm.
    #[serde(default = "d::rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Layer `i` is attention iff `i % attn_layer_period == attn_layer_offset`.
    #[serde(default = "d::attn_layer_period")]
    pub attn_layer_period: usize,
    /// See `attn_layer_period`.
    #[serde(default = "d::attn_layer_offset")]
    pub attn_layer_offset: usize,
    /// Layer `i` is a mixture of experts iff `i % expert_layer_period == expert_layer_offset`
    /// (and `num_experts > 1`).
    #[serde(default = "d::expert_layer_period")]
    pub expert_layer_period: usize,
    /// See `expert_layer_period`.
    #[serde(default = "d::expert_layer_offset")]
    pub expert_layer_offset: usize,
    /// Experts per MoE layer (`num_local_experts` is accepted too).
    #[serde(default = "d::num_experts", alias = "num_local_experts")]
    pub num_experts: usize,
    /// Experts each token is routed to.
    #[serde(default = "d::num_experts_per_tok")]
    pub num_experts_per_tok: usize,
    /// SSM state size N.
    #[serde(default = "d::mamba_d_state")]
    pub mamba_d_state: usize,
    /// Depthwise convolution width.
    #[serde(default = "d::mamba_d_conv")]
    pub mamba_d_conv: usize,
    /// Mamba inner width = `mamba_expand * hidden_size`.
    #[serde(default = "d::mamba_expand")]
    pub mamba_expand: usize,
    /// Rank of the Δ projection.
    #[serde(default = "d::mamba_dt_rank")]
    pub mamba_dt_rank: DtRank,
    /// Whether the depthwise convolution has a bias.
    #[serde(default = "d::yes")]
    pub mamba_conv_bias: bool,
    /// Whether `in_proj` and `out_proj` have biases.
    #[serde(default)]
    pub mamba_proj_bias: bool,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Padding token id.
    #[serde(default = "d::pad")]
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    #[serde(default = "d::bos")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default = "d::eos")]
    pub eos_token_id: Option<TokenIds>,
    /// Longest context the model was trained for.
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Weight of the load-balancing loss in training.
    #[serde(default = "d::router_aux_loss_coef")]
    pub router_aux_loss_coef: f64,
    /// Standard deviation of the random initialisation.
    #[serde(default = "d::initializer_range")]
    pub initializer_range: f64,
}

/// transformers' defaults (`JambaConfig` in `configuration_jamba.py`).
mod d {
    use super::{AutoTag, DtRank, TokenIds};
    pub fn vocab_size() -> usize {
        65536
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        14336
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn attn_layer_period() -> usize {
        8
    }
    pub fn attn_layer_offset() -> usize {
        4
    }
    pub fn expert_layer_period() -> usize {
        2
    }
    pub fn expert_layer_offset() -> usize {
        1
    }
    pub fn num_experts() -> usize {
        16
    }
    pub fn num_experts_per_tok() -> usize {
        2
    }
    pub fn mamba_d_state() -> usize {
        16
    }
    pub fn mamba_d_conv() -> usize {
        4
    }
    pub fn mamba_expand() -> usize {
        2
    }
    pub fn mamba_dt_rank() -> DtRank {
        DtRank::Auto(AutoTag::Auto)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn pad() -> Option<u32> {
        Some(0)
    }
    pub fn bos() -> Option<u32> {
        Some(1)
    }
    pub fn eos() -> Option<TokenIds> {
        Some(TokenIds::One(2))
    }
    pub fn max_position_embeddings() -> usize {
        262144
    }
    pub fn router_aux_loss_coef() -> f64 {
        0.001
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
}

/// The token mixer of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixerKind {
    /// Grouped-query causal self-attention (no positional encoding).
    Attention,
    /// A Mamba-1 selective state-space mixer.
    Mamba,
}

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardKind {
    /// One SwiGLU MLP.
    Mlp,
    /// A mixture of `num_experts` SwiGLU experts, `top_k` per token.
    Moe {
        /// Experts in the layer.
        num_experts: usize,
        /// Experts per token.
        top_k: usize,
    },
}

/// What one decoder layer is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// Attention or Mamba.
    pub mixer: MixerKind,
    /// MLP or mixture of experts.
    pub feed_forward: FeedForwardKind,
}

/// Parameter counts of a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// Every parameter (tied embeddings counted once).
    pub total: u64,
    /// Parameters used for one token: only `top_k` experts of each MoE layer.
    pub active: u64,
}

/// Bytes of inference state for a batch and a context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSize {
    /// Keys and values of the attention layers; grows with the context.
    pub kv_bytes: u64,
    /// Convolution state of the Mamba layers (last `d_conv - 1` inputs); fixed size.
    pub conv_bytes: u64,
    /// SSM state of the Mamba layers (kept in f32); fixed size.
    pub ssm_bytes: u64,
}

impl CacheSize {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.kv_bytes + self.conv_bytes + self.ssm_bytes
    }
    /// The Mamba layers' fixed-size state.
    pub fn mamba_bytes(&self) -> u64 {
        self.conv_bytes + self.ssm_bytes
    }
}

impl JambaConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let config: Self = JambaError::parse_json("<config string>", json)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| JambaError::io(path, e))?;
        let config: Self = JambaError::parse_json(path, &text)?;
        config.validate().map_err(|e| match e {
            JambaError::Config(msg) => JambaError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })?;
        Ok(config)
    }

    /// The configuration as pretty JSON, in the Hugging Face field names.
    pub fn to_json_string(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let map = value.as_object_mut().expect("config is an object");
        map.insert("model_type".into(), "jamba".into());
        map.insert(
            "architectures".into(),
            serde_json::json!(["JambaForCausalLM"]),
        );
        map.insert(
            "num_key_value_heads".into(),
            self.num_key_value_heads().into(),
        );
        map.insert("mamba_dt_rank".into(), self.dt_rank().into());
        serde_json::to_string_pretty(&value).expect("config serialises")
    }

    /// Checks the invariants the model relies on, so that no later step can panic on them.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(JambaError::Config(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads()),
            ("attn_layer_period", self.attn_layer_period),
            ("expert_layer_period", self.expert_layer_period),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("mamba_d_state", self.mamba_d_state),
            ("mamba_d_conv", self.mamba_d_conv),
            ("mamba_expand", self.mamba_expand),
            ("mamba_dt_rank", self.dt_rank()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
        }
        if self.attn_layer_offset >= self.attn_layer_period {
            return err(format!(
                "attn_layer_offset ({}) must be smaller than attn_layer_period ({})",
                self.attn_layer_offset, self.attn_layer_period
            ));
        }
        if self.expert_layer_offset >= self.expert_layer_period {
            return err(format!(
                "expert_layer_offset ({}) must be smaller than expert_layer_period ({})",
                self.expert_layer_offset, self.expert_layer_period
            ));
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return err(format!(
                "num_attention_heads ({}) must divide hidden_size ({})",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads() != 0 {
            return err(format!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_key_value_heads(),
                self.num_attention_heads
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return err(format!(
                "num_experts_per_tok ({}) exceeds num_experts ({})",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        if self.hidden_act != "silu" {
            return err(format!(
                "hidden_act `{}` is not supported (Jamba uses `silu`)",
                self.hidden_act
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return err(format!(
                "rms_norm_eps must be positive and finite, got {}",
                self.rms_norm_eps
            ));
        }
        if let Some(TokenIds::Many(ids)) = &self.eos_token_id
            && ids.is_empty()
        {
            return err("eos_token_id is an empty list".into());
        }
        Ok(())
    }

    /// Key/value heads (defaults to the query heads).
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rank of the Δ projection, with `"auto"` resolved to ⌈hidden_size / 16⌉.
    pub fn dt_rank(&self) -> usize {
        match self.mamba_dt_rank {
            DtRank::Value(r) => r,
            DtRank::Auto(_) => self.hidden_size.div_ceil(16),
        }
    }

    /// Inner width of the Mamba mixer.
    pub fn mamba_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    /// End-of-sequence ids (empty when the config has none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The kind of layer `i`.
    pub fn layer(&self, i: usize) -> LayerSpec {
        let mixer = if i % self.attn_layer_period == self.attn_layer_offset {
            MixerKind::Attention
        } else {
            MixerKind::Mamba
        };
        // As in transformers: a layer with a single "expert" is a plain MLP.
        let feed_forward =
            if i % self.expert_layer_period == self.expert_layer_offset && self.num_experts > 1 {
                FeedForwardKind::Moe {
                    num_experts: self.num_experts,
                    top_k: self.num_experts_per_tok,
                }
            } else {
                FeedForwardKind::Mlp
            };
        LayerSpec {
            mixer,
            feed_forward,
        }
    }

    /// The layer plan: one [`LayerSpec`] per decoder layer.
    pub fn layer_plan(&self) -> Vec<LayerSpec> {
        (0..self.num_hidden_layers).map(|i| self.layer(i)).collect()
    }

    /// Number of attention layers.
    pub fn num_attention_layers(&self) -> usize {
        self.layer_plan()
            .iter()
            .filter(|l| l.mixer == MixerKind::Attention)
            .count()
    }

    /// Number of Mamba layers.
    pub fn num_mamba_layers(&self) -> usize {
        self.num_hidden_layers - self.num_attention_layers()
    }

    /// Parameters of one Mamba mixer.
    fn mamba_params(&self) -> u64 {
        let (h, i, n, r, k) = (
            self.hidden_size as u64,
            self.mamba_inner() as u64,
            self.mamba_d_state as u64,
            self.dt_rank() as u64,
            self.mamba_d_conv as u64,
        );
        let proj_bias = u64::from(self.mamba_proj_bias);
        let in_proj = h * 2 * i + proj_bias * 2 * i;
        let conv = i * k + u64::from(self.mamba_conv_bias) * i;
        let x_proj = i * (r + 2 * n);
        let dt_proj = r * i + i;
        let a_d = i * n + i;
        let out_proj = i * h + proj_bias * h;
        let norms = r + 2 * n;
        in_proj + conv + x_proj + dt_proj + a_d + out_proj + norms
    }

    /// Parameters of one attention mixer.
    fn attention_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let kv = (self.num_key_value_heads() * self.head_dim()) as u64;
        2 * h * h + 2 * h * kv
    }

    /// Total and active parameter counts.
    ///
    /// ```
    /// let v01 = jamba::JambaConfig::from_json_str(r#"{"mamba_dt_rank": 256, "num_key_value_heads": 8}"#).unwrap();
    /// let p = v01.param_count();
    /// assert_eq!((p.total as f64 / 1e9 * 10.0).round() / 10.0, 51.6);
    /// assert_eq!((p.active as f64 / 1e9 * 10.0).round() / 10.0, 12.1);
    /// ```
    pub fn param_count(&self) -> ParamCount {
        let h = self.hidden_size as u64;
        let mlp = 3 * h * self.intermediate_size as u64;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let mut total = embed + head + h;
        let mut active = total;
        for spec in self.layer_plan() {
            let mixer = match spec.mixer {
                MixerKind::Attention => self.attention_params(),
                MixerKind::Mamba => self.mamba_params(),
            };
            let norms = 2 * h;
            let (ff_total, ff_active) = match spec.feed_forward {
                FeedForwardKind::Mlp => (mlp, mlp),
                FeedForwardKind::Moe { num_experts, top_k } => {
                    let router = num_experts as u64 * h;
                    (
                        num_experts as u64 * mlp + router,
                        top_k as u64 * mlp + router,
                    )
                }
            };
            total += mixer + norms + ff_total;
            active += mixer + norms + ff_active;
        }
        ParamCount { total, active }
    }

    /// Inference cache size for `batch` sequences of `context` tokens, with keys, values and the
    /// convolution state stored in `dtype_bytes` bytes per element and the SSM state in f32.
    ///
    /// ```
    /// let v01 = jamba::JambaConfig::from_json_str(r#"{"mamba_dt_rank": 256, "num_key_value_heads": 8}"#).unwrap();
    /// let c = v01.cache_size(1, 256 * 1024, 2);
    /// assert_eq!(c.kv_bytes, 4 * 1024 * 1024 * 1024); // Table 1: 4 GB
    /// ```
    pub fn cache_size(&self, batch: usize, context: usize, dtype_bytes: usize) -> CacheSize {
        let (b, t, s) = (batch as u64, context as u64, dtype_bytes as u64);
        let kv_per_layer = 2 * b * t * (self.num_key_value_heads() * self.head_dim()) as u64 * s;
        let inner = self.mamba_inner() as u64;
        let conv_per_layer = b * inner * (self.mamba_d_conv as u64 - 1) * s;
        let ssm_per_layer = b * inner * self.mamba_d_state as u64 * 4;
        let (attn, mamba) = (
            self.num_attention_layers() as u64,
            self.num_mamba_layers() as u64,
        );
        CacheSize {
            kv_bytes: attn * kv_per_layer,
            conv_bytes: mamba * conv_per_layer,
            ssm_bytes: mamba * ssm_per_layer,
        }
    }
}
