//! One decoder layer in the engine: `x + mixer(norm(x))`, then `x + feed_forward(norm(x))`,
//! with each layer's last residual addition deferred to the next layer's first norm, and, for
//! a decoding step of few rows, each norm folded into the launch after it.

use burn::tensor::Tensor;

use super::attention::attend;
use super::mamba::mix;
use super::ops::{EngineBackend, ScanParams};
use crate::cache::LayerCache;
use crate::model::{DecoderLayer, FeedForward, LayerMasks, Mixer, masked};

/// A layer's output with its last residual addition still to do:
/// `output = residual + feed_forward`.
pub(crate) struct Deferred<B: EngineBackend> {
    /// The residual stream after the mixer, `[batch, seq, hidden]`.
    pub residual: Tensor<B, 3>,
    /// The feed-forward block's output, not yet added to `residual`.
    pub feed_forward: Tensor<B, 3>,
}

/// Runs `layer` on `x + pending` (`pending`: the previous layer's feed-forward output, not
/// yet added). `scan` holds a Mamba layer's scan parameters.
///
/// For up to [`NormOps::FOLD_ROWS`](super::ops::NormOps::FOLD_ROWS) rows, the addition of
/// `pending` and the input norm are folded into the mixer's input projections, and the
/// residual sums and the pre-feed-forward norm into the feed-forward block's first launch (a
/// Mamba mixer's padded input is zeroed before `in_proj`, so a padded Mamba layer does not
/// fold its input norm). Each form rounds each sum and norm as the separate operations do.
pub(crate) fn forward<B: EngineBackend>(
    layer: &DecoderLayer<B>,
    scan: Option<&ScanParams<B>>,
    x: Tensor<B, 3>,
    pending: Option<Tensor<B, 3>>,
    masks: &LayerMasks<B>,
    cache: &mut LayerCache<B>,
) -> Deferred<B> {
    let [batch, seq, hidden] = x.dims();
    let fold = batch * seq <= B::FOLD_ROWS;
    let padded_mamba = matches!(layer.mixer, Mixer::Mamba(_)) && masks.keep.is_some();
    let norm = &layer.input_layernorm;

    // The mixer. `first` is an update still to add to `x` (folded: `pending` itself).
    let (x, first, mixed) = if fold && !padded_mamba {
        let mixed = match &layer.mixer {
            Mixer::Attention(attn) => {
                let weights = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
                let qkv = if weights.iter().all(|l| l.bias.is_none()) {
                    B::project_normed_many(&x, pending.as_ref(), norm, weights.map(|l| l.weight.val()))
                } else {
                    weights.map(|l| {
                        let bias = l.bias.as_ref().map(|b| b.val());
                        B::project_normed(&x, pending.as_ref(), norm, l.weight.val(), bias)
                    })
                };
                let out = attend(attn, qkv, masks.attention.as_ref(), cache.kv());
                linear(out, &attn.o_proj)
            }
            Mixer::Mamba(mamba) => {
                let bias = mamba.in_proj.bias.as_ref().map(|b| b.val());
                let xz = B::project_normed(&x, pending.as_ref(), norm, mamba.in_proj.weight.val(), bias);
                mamba_from_xz(mamba, scan, xz, None, cache)
            }
        };
        (x, pending, mixed)
    } else {
        let (x, normed) = match pending {
            Some(p) => B::add_rms_norm(x, p, norm),
            None => (x.clone(), B::rms_norm(x, norm)),
        };
        let mixed = match &layer.mixer {
            Mixer::Attention(attn) => {
                let qkv = [&attn.q_proj, &attn.k_proj, &attn.v_proj].map(|l| linear(normed.clone(), l));
                let out = attend(attn, qkv, masks.attention.as_ref(), cache.kv());
                linear(out, &attn.o_proj)
            }
            Mixer::Mamba(mamba) => {
                let xz = linear(masked(normed, masks.keep.as_ref()), &mamba.in_proj);
                mamba_from_xz(mamba, scan, xz, masks.keep.as_ref(), cache)
            }
        };
        (x, None, mixed)
    };

    // The feed-forward block.
    let ff_norm = &layer.pre_ff_layernorm;
    if fold {
        let rows = |t: Tensor<B, 3>| t.reshape([batch * seq, hidden]);
        let (x, first, mixed) = (rows(x), first.map(rows), rows(mixed));
        let [residual, y] = match &layer.feed_forward {
            FeedForward::Moe(moe) => {
                let [residual, y, _logits] = B::moe_normed(x, first, mixed, ff_norm, moe);
                [residual, y]
            }
            FeedForward::Mlp(mlp) => B::mlp_normed(x, first, mixed, ff_norm, mlp),
        };
        let back = |t: Tensor<B, 2>| t.reshape([batch, seq, hidden]);
        return Deferred {
            residual: back(residual),
            feed_forward: back(y),
        };
    }
    let (residual, normed) = match first {
        Some(first) => B::add2_rms_norm(x, first, mixed, ff_norm),
        None => B::add_rms_norm(x, mixed, ff_norm),
    };
    let normed = normed.reshape([batch * seq, hidden]);
    let y = match &layer.feed_forward {
        FeedForward::Moe(moe) => {
            let logits = linear(normed.clone().reshape([1, batch * seq, hidden]), &moe.router);
            let logits = logits.reshape([batch * seq, moe.num_experts()]);
            B::moe_experts(normed, logits, &moe.experts, moe.top_k)
        }
        FeedForward::Mlp(mlp) => B::mlp(normed, mlp),
    };
    Deferred {
        residual,
        feed_forward: y.reshape([batch, seq, hidden]),
    }
}

/// A Mamba mixer from `in_proj`'s output through `out_proj`: the fused decoding step for one
/// token per row without padding, the separate operations otherwise.
fn mamba_from_xz<B: EngineBackend>(
    mamba: &crate::model::MambaMixer<B>,
    scan: Option<&ScanParams<B>>,
    xz: Tensor<B, 3>,
    keep: Option<&Tensor<B, 3>>,
    cache: &mut LayerCache<B>,
) -> Tensor<B, 3> {
    let params = scan.expect("a Mamba layer has scan parameters");
    let [batch, seq, width] = xz.dims();
    let state = cache.mamba();
    let y = if seq == 1 && keep.is_none() {
        B::mamba_step(mamba, params, xz.reshape([batch, width]), state)
            .reshape([batch, 1, width / 2])
    } else {
        mix(mamba, params, xz, keep, state)
    };
    linear(y, &mamba.out_proj)
}

/// `layer` applied to `x` through the engine's product.
fn linear<B: EngineBackend>(x: Tensor<B, 3>, layer: &burn::nn::Linear<B>) -> Tensor<B, 3> {
    B::project(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}
