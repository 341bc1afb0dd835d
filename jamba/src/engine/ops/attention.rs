//! Attention of a decoding step: one new query per row over the cached keys and values.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

use crate::ops::JambaBackend;

/// The engine's attention of one new position per row.
pub trait AttentionOps: JambaBackend {
    /// `softmax(q·kᵀ · scale) · v` for `q` `[batch, heads, dim]` over `k` and `v`
    /// `[batch, kv_heads, keys, dim]` (query head `h` reads key/value head
    /// `h / (heads / kv_heads)`), `hidden` `[batch, keys]` `true` where a key is masked.
    /// Returns `[batch, heads · dim]`.
    ///
    /// By default the query heads that share a key/value head become that head's query rows,
    /// so the cached keys and values are read as they are instead of being copied once per
    /// query head, through [`JambaBackend::scaled_dot_product_attention`].
    fn decode_attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        hidden: Option<Tensor<Self, 2, Bool>>,
        scale: f64,
    ) -> Tensor<Self, 2> {
        attend_grouped(q, k, v, hidden, scale)
    }
}

/// [`AttentionOps::decode_attention`] through [`JambaBackend::scaled_dot_product_attention`].
fn attend_grouped<B: JambaBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    hidden: Option<Tensor<B, 2, Bool>>,
    scale: f64,
) -> Tensor<B, 2> {
    let [batch, heads, dim] = q.dims();
    let [_, groups, keys, _] = k.dims();
    let rep = heads / groups;
    let q = q.reshape([batch, groups, rep, dim]);
    let mask = hidden.map(|h| {
        h.reshape([batch, 1, 1, keys])
            .expand([batch, groups, rep, keys])
    });
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: false,
    };
    B::scaled_dot_product_attention(q, k, v, mask, options).reshape([batch, heads * dim])
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{Bool, DType, Tensor};
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::attention;

    use super::AttentionOps;
    use crate::cube::{Cube, prim, wrap};

    /// One launch (`attention::decode_attention`) for contexts up to its `MAX_KEYS`.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AttentionOps
        for Cube<R, F, I, BT>
    {
        fn decode_attention(
            q: Tensor<Self, 3>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            hidden: Option<Tensor<Self, 2, Bool>>,
            scale: f64,
        ) -> Tensor<Self, 2> {
            let [_, heads, dim] = q.dims();
            let [_, kv_heads, keys, _] = k.dims();
            let dtype = q.dtype();
            let fits = keys <= attention::MAX_KEYS
                && dim <= attention::UNITS
                && kv_heads > 0
                && heads.is_multiple_of(kv_heads)
                && k.dtype() == dtype
                && v.dtype() == dtype;
            if !fits {
                return super::attend_grouped(q, k, v, hidden, scale);
            }
            let pad = hidden.map(|h| prim(h.float().cast(DType::F32)));
            wrap(attention::decode_attention(
                prim(q),
                prim(k),
                prim(v),
                pad,
                scale,
            ))
        }
    }
}
