//! One decoder layer (`JambaAttentionDecoderLayer` / `JambaMambaDecoderLayer`): a pre-norm
//! mixer and a pre-norm feed-forward block, each with a residual connection.

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use super::rms_norm::RmsNormConfig;
use super::{
    Attention, AttentionConfig, AttentionMask, MambaMixer, MambaMixerConfig, Mlp, MlpConfig,
    RmsNorm, SparseMoe, SparseMoeConfig,
};
use crate::cache::LayerCache;
use crate::config::{FeedForwardKind, JambaConfig, LayerSpec, MixerKind};
use crate::ops::JambaBackend;

/// The token mixer of a layer.
#[derive(Module, Debug)]
pub enum Mixer<B: Backend> {
    /// `self_attn`.
    Attention(Attention<B>),
    /// `mamba`.
    Mamba(MambaMixer<B>),
}

/// The feed-forward block of a layer (`feed_forward`).
#[derive(Module, Debug)]
pub enum FeedForward<B: Backend> {
    /// A dense SwiGLU MLP.
    Mlp(Mlp<B>),
    /// A sparse mixture of experts.
    Moe(SparseMoe<B>),
}

/// The padding of one forward pass, in the forms each mixer wants; `None` fields when nothing
/// is padded.
#[derive(Debug, Clone)]
pub struct LayerMasks<B: Backend> {
    /// For attention layers.
    pub attention: Option<AttentionMask<B>>,
    /// For Mamba layers: `[batch, seq, 1]`, 1 for real tokens, 0 for padding.
    pub keep: Option<Tensor<B, 3>>,
}

/// `x + mixer(norm(x))`, then `x + feed_forward(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm<B>,
    /// `self_attn` or `mamba`.
    pub mixer: Mixer<B>,
    /// `pre_ff_layernorm`.
    pub pre_ff_layernorm: RmsNorm<B>,
    /// `feed_forward`.
    pub feed_forward: FeedForward<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// A randomly initialised layer of the kind `spec` names.
    pub fn init(config: &JambaConfig, spec: LayerSpec, device: &B::Device) -> Self {
        let h = config.hidden_size;
        let norm = RmsNormConfig::new(h).with_eps(config.rms_norm_eps);
        let mixer = match spec.mixer {
            MixerKind::Attention => Mixer::Attention(
                AttentionConfig::new(h, config.num_attention_heads, config.num_key_value_heads())
                    .init(device),
            ),
            MixerKind::Mamba => Mixer::Mamba(
                MambaMixerConfig::new(
                    h,
                    config.mamba_inner(),
                    config.mamba_d_state,
                    config.mamba_d_conv,
                    config.dt_rank(),
                )
                .with_conv_bias(config.mamba_conv_bias)
                .with_proj_bias(config.mamba_proj_bias)
                .with_eps(config.rms_norm_eps)
                .init(device),
            ),
        };
        let feed_forward = match spec.feed_forward {
            FeedForwardKind::Mlp => {
                FeedForward::Mlp(MlpConfig::new(h, config.intermediate_size).init(device))
            }
            FeedForwardKind::Moe { num_experts, top_k } => FeedForward::Moe(
                SparseMoeConfig::new(h, config.intermediate_size, num_experts, top_k).init(device),
            ),
        };
        Self {
            input_layernorm: norm.init(device),
            mixer,
            pre_ff_layernorm: norm.init(device),
            feed_forward,
        }
    }

    /// The kind of this layer's mixer.
    pub fn mixer_kind(&self) -> MixerKind {
        match self.mixer {
            Mixer::Attention(_) => MixerKind::Attention,
            Mixer::Mamba(_) => MixerKind::Mamba,
        }
    }
}

impl<B: JambaBackend> DecoderLayer<B> {
    /// Runs the layer on `x` `[batch, seq, hidden]`; returns its output and, for a MoE layer,
    /// the router logits `[batch · seq, num_experts]`. `cache` must be this layer's (a key/value
    /// cache for attention, a state for Mamba).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 2>>) {
        let x = x.clone() + self.mix(self.input_layernorm.forward(x), masks, cache);
        let normed = self.pre_ff_layernorm.forward(x.clone());
        let (y, router_logits) = match &self.feed_forward {
            FeedForward::Mlp(mlp) => (mlp.forward(normed), None),
            FeedForward::Moe(moe) => {
                let (y, logits) = moe.forward(normed);
                (y, Some(logits))
            }
        };
        (x + y, router_logits)
    }

    fn mix(
        &self,
        x: Tensor<B, 3>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        match (&self.mixer, cache) {
            (Mixer::Attention(attn), cache) => {
                attn.forward(x, masks.attention.as_ref(), cache.map(LayerCache::kv))
            }
            (Mixer::Mamba(mamba), cache) => {
                mamba.forward(x, masks.keep.as_ref(), cache.map(LayerCache::mamba))
            }
        }
    }
}
