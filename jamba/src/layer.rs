//! One decoder layer: pre-norm mixer (attention or Mamba) and pre-norm feed-forward (MLP or
//! mixture of experts), each with a residual connection.

use crate::ops::JambaBackend;
use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::attention::{Attention, AttentionConfig, AttentionMask};
use crate::cache::LayerCache;
use crate::config::{FeedForwardKind, JambaConfig, LayerSpec, MixerKind};
use crate::mamba::{MambaMixer, MambaMixerConfig};
use crate::mlp::{Mlp, MlpConfig};
use crate::moe::{SparseMoe, SparseMoeConfig};
use crate::norm::{RmsNorm, RmsNormConfig};

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

/// Padding of the current forward pass, in the forms each mixer wants.
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
    /// The mixer.
    pub mixer: Mixer<B>,
    /// `pre_ff_layernorm`.
    pub pre_ff_layernorm: RmsNorm<B>,
    /// The feed-forward block.
    pub feed_forward: FeedForward<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// A randomly initialised layer of the given kind.
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
}

impl<B: JambaBackend> DecoderLayer<B> {
    /// Runs the layer; returns its output and, for a MoE layer, the router logits
    /// `[batch · seq, num_experts]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 2>>) {
        let out = self.forward_deferred(x, None, masks, cache);
        (out.residual + out.feed_forward, out.router_logits)
    }

    /// The layer with its last residual addition left to the caller, who fuses it with the
    /// next norm ([`RmsNorm::add_forward`]: one launch instead of two on CubeCL backends). The
    /// layer's output is `residual + feed_forward`; `pending` is the previous layer's
    /// `feed_forward`, added to `x` here together with the input norm.
    pub fn forward_deferred(
        &self,
        x: Tensor<B, 3>,
        pending: Option<Tensor<B, 3>>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> DeferredOutput<B> {
        let (x, normed) = match pending {
            Some(p) => self.input_layernorm.add_forward(x, p),
            None => (x.clone(), self.input_layernorm.forward(x)),
        };
        let mixed = match (&self.mixer, cache) {
            (Mixer::Attention(attn), Some(LayerCache::Attention(kv))) => {
                attn.forward(normed, masks.attention.as_ref(), Some(kv))
            }
            (Mixer::Attention(attn), None) => attn.forward(normed, masks.attention.as_ref(), None),
            (Mixer::Mamba(mamba), Some(LayerCache::Mamba(state))) => {
                mamba.forward(normed, masks.keep.as_ref(), Some(state))
            }
            (Mixer::Mamba(mamba), None) => mamba.forward(normed, masks.keep.as_ref(), None),
            _ => unreachable!("the cache is built from the same layer plan as the model"),
        };
        let (residual, normed) = self.pre_ff_layernorm.add_forward(x, mixed);
        let (feed_forward, router_logits) = match &self.feed_forward {
            FeedForward::Mlp(mlp) => (mlp.forward(normed), None),
            FeedForward::Moe(moe) => {
                let (y, logits) = moe.forward(normed);
                (y, Some(logits))
            }
        };
        DeferredOutput {
            residual,
            feed_forward,
            router_logits,
        }
    }
}

/// What [`DecoderLayer::forward_deferred`] returns.
#[derive(Debug, Clone)]
pub struct DeferredOutput<B: Backend> {
    /// The residual stream after the mixer, `[batch, seq, hidden]`.
    pub residual: Tensor<B, 3>,
    /// The feed-forward block's output, not yet added to `residual`.
    pub feed_forward: Tensor<B, 3>,
    /// For a MoE layer, the router logits `[batch · seq, num_experts]`.
    pub router_logits: Option<Tensor<B, 2>>,
}
