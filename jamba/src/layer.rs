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
    /// `feed_forward`, added to `x` here.
    ///
    /// Where the backend can, the input norm is folded into the mixer's first projections
    /// (`mix_folded`) and the sum `x + pending` is left to the norm after the mixer,
    /// which adds both updates ([`RmsNorm::add2_forward`]); the feed-forward block may take
    /// that norm into its own first launch ([`SparseMoe::forward_normed`] with its router,
    /// [`Mlp::forward_normed`]). Each form rounds
    /// each sum and norm as the separate operations do.
    pub fn forward_deferred(
        &self,
        x: Tensor<B, 3>,
        pending: Option<Tensor<B, 3>>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> DeferredOutput<B> {
        let mut cache = cache;
        let (x, first, mixed) =
            match self.mix_folded(&x, pending.as_ref(), masks, cache.as_deref_mut()) {
                Some(mixed) => (x, pending, mixed),
                None => {
                    let (x, normed) = match pending {
                        Some(p) => self.input_layernorm.add_forward(x, p),
                        None => (x.clone(), self.input_layernorm.forward(x)),
                    };
                    (x, None, self.mix(normed, masks, cache))
                }
            };
        let norm = &self.pre_ff_layernorm;
        let fused = match &self.feed_forward {
            FeedForward::Moe(moe) => moe
                .forward_normed(x.clone(), first.clone(), mixed.clone(), norm)
                .map(|(residual, y, logits)| (residual, y, Some(logits))),
            FeedForward::Mlp(mlp) => mlp
                .forward_normed(x.clone(), first.clone(), mixed.clone(), norm)
                .map(|(residual, y)| (residual, y, None)),
        };
        if let Some((residual, feed_forward, router_logits)) = fused {
            return DeferredOutput {
                residual,
                feed_forward,
                router_logits,
            };
        }
        let (residual, normed) = match first {
            Some(first) => self.pre_ff_layernorm.add2_forward(x, first, mixed),
            None => self.pre_ff_layernorm.add_forward(x, mixed),
        };
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

    /// The mixer on its normalised input.
    fn mix(
        &self,
        normed: Tensor<B, 3>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        match (&self.mixer, cache) {
            (Mixer::Attention(attn), Some(LayerCache::Attention(kv))) => {
                attn.forward(normed, masks.attention.as_ref(), Some(kv))
            }
            (Mixer::Attention(attn), None) => attn.forward(normed, masks.attention.as_ref(), None),
            (Mixer::Mamba(mamba), Some(LayerCache::Mamba(state))) => {
                mamba.forward(normed, masks.keep.as_ref(), Some(state))
            }
            (Mixer::Mamba(mamba), None) => mamba.forward(normed, masks.keep.as_ref(), None),
            _ => unreachable!("the cache is built from the same layer plan as the model"),
        }
    }

    /// The mixer with the input norm of `x + pending` folded into its first projections
    /// ([`RmsNorm::project_normed`]: `in_proj`, or `q_proj`, `k_proj` and `v_proj`, in one
    /// launch where the backend can: [`RmsNorm::project_normed_many`]), or `None`
    /// where the backend has no such form or a Mamba mixer's input is masked (padding is
    /// zeroed before `in_proj`).
    fn mix_folded(
        &self,
        x: &Tensor<B, 3>,
        pending: Option<&Tensor<B, 3>>,
        masks: &LayerMasks<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Option<Tensor<B, 3>> {
        let norm = &self.input_layernorm;
        match (&self.mixer, cache) {
            (Mixer::Mamba(mamba), cache) if masks.keep.is_none() => {
                let state = match cache {
                    Some(LayerCache::Mamba(state)) => Some(state),
                    None => None,
                    Some(_) => unreachable!("the cache is built from the same layer plan"),
                };
                let xz = norm.project_normed(x, pending, &mamba.in_proj)?;
                Some(mamba.forward_projected(xz, None, state))
            }
            (Mixer::Attention(attn), cache) => {
                let kv = match cache {
                    Some(LayerCache::Attention(kv)) => Some(kv),
                    None => None,
                    Some(_) => unreachable!("the cache is built from the same layer plan"),
                };
                let linears = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
                let qkv = match norm.project_normed_many(x, pending, linears) {
                    Some(qkv) => qkv,
                    None => [
                        norm.project_normed(x, pending, linears[0])?,
                        norm.project_normed(x, pending, linears[1])?,
                        norm.project_normed(x, pending, linears[2])?,
                    ],
                };
                Some(attn.forward_projected(qkv, masks.attention.as_ref(), kv))
            }
            _ => None,
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
