//! The engine's attention after the `q`, `k` and `v` projections: the keys and values appended
//! to the cache, then a decoding step's one-query attention or a prefill's causal attention.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Tensor, backend::Backend};

use super::ops::EngineBackend;
use crate::cache::KvCache;
use crate::model::{Attention, AttentionMask};

/// `attn`'s output before `o_proj`, `[batch, seq, heads · head_dim]`, from the projections
/// `[q, k, v]`, each `[batch, seq, heads · head_dim]`.
pub(crate) fn attend<B: EngineBackend>(
    attn: &Attention<B>,
    [q, k, v]: [Tensor<B, 3>; 3],
    mask: Option<&AttentionMask<B>>,
    cache: &mut KvCache<B>,
) -> Tensor<B, 3> {
    let [batch, seq, _] = q.dims();
    let (heads, kv_heads, dim) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    let split = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, dim]).swap_dims(1, 2);
    let (k, v) = cache.append(split(k, kv_heads), split(v, kv_heads));
    let keys = k.dims()[2];
    if seq == 1 {
        // Every cached key is causally visible to the one new position; a pad query keeps
        // every key (its output is ignored), as in the general path.
        let hidden = mask.map(|m| {
            let real_query = m.query_padding.clone().bool_not().reshape([batch, 1]);
            m.key_padding
                .clone()
                .bool_and(real_query.expand([batch, keys]))
        });
        let scale = 1.0 / (dim as f64).sqrt();
        let out = B::decode_attention(q.reshape([batch, heads, dim]), k, v, hidden, scale);
        return out.reshape([batch, 1, heads * dim]);
    }
    // Pad keys are hidden from real queries only: a pad query keeps its causal window, so no
    // row is fully masked and its (ignored) output stays finite on every backend.
    let mask = mask.map(|m| {
        let pad_key = m.key_padding.clone().reshape([batch, 1, 1, keys]);
        let real_query = m
            .query_padding
            .clone()
            .bool_not()
            .reshape([batch, 1, seq, 1]);
        pad_key
            .expand([batch, 1, seq, keys])
            .bool_and(real_query.expand([batch, 1, seq, keys]))
            .expand([batch, heads, seq, keys])
    });
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let (k, v) = (repeat_kv(k, heads / kv_heads), repeat_kv(v, heads / kv_heads));
    B::scaled_dot_product_attention(split(q, heads), k, v, mask, options)
        .swap_dims(1, 2)
        .reshape([batch, seq, heads * dim])
}

/// Each key/value head repeated `rep` times (Burn's attention has no grouped-query broadcast).
fn repeat_kv<B: Backend>(t: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    if rep == 1 {
        return t;
    }
    let [b, h, s, d] = t.dims();
    t.unsqueeze_dim::<5>(2)
        .expand([b, h, rep, s, d])
        .reshape([b, h * rep, s, d])
}
