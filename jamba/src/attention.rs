//! Grouped-query causal self-attention with no positional encoding (`JambaAttention`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, backend::Backend};

use crate::cache::KvCache;
use crate::ops::{JambaBackend, project};

/// Configuration of [`Attention`].
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; must divide `num_heads`.
    pub num_kv_heads: usize,
}

/// Padding information for one forward pass.
///
/// `key_padding` covers every key the layer attends to (cached ones included), `query_padding`
/// the new positions; `true` marks a pad.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// `[batch, keys]`, `true` where the key is padding.
    pub key_padding: Tensor<B, 2, Bool>,
    /// `[batch, queries]`, `true` where the query is padding.
    pub query_padding: Tensor<B, 2, Bool>,
}

/// Causal grouped-query attention. Jamba's attention layers carry no positional encoding: the
/// Mamba layers before them supply the order.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::Tensor;
/// use jamba::attention::AttentionConfig;
/// let device = Default::default();
/// let attn = AttentionConfig::new(16, 4, 2).init::<Cpu>(&device);
/// let y = attn.forward(Tensor::<Cpu, 3>::ones([1, 3, 16], &device), None, None);
/// assert_eq!(y.dims(), [1, 3, 16]);
/// ```
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj`, hidden → heads · head_dim.
    pub q_proj: Linear<B>,
    /// `k_proj`, hidden → kv_heads · head_dim.
    pub k_proj: Linear<B>,
    /// `v_proj`, hidden → kv_heads · head_dim.
    pub v_proj: Linear<B>,
    /// `o_proj`, heads · head_dim → hidden.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

impl AttentionConfig {
    /// Randomly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let head_dim = self.hidden_size / self.num_heads;
        let kv = self.num_kv_heads * head_dim;
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Attention {
            q_proj: linear(self.hidden_size, self.num_heads * head_dim),
            k_proj: linear(self.hidden_size, kv),
            v_proj: linear(self.hidden_size, kv),
            o_proj: linear(self.num_heads * head_dim, self.hidden_size),
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim,
        }
    }
}

impl<B: JambaBackend> Attention<B> {
    /// Attends over `x` `[batch, seq, hidden]`, after the keys and values in `cache` if one is
    /// given (the new ones are appended to it).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&AttentionMask<B>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let q = project(&self.q_proj, x.clone());
        let k = project(&self.k_proj, x.clone());
        let v = project(&self.v_proj, x);
        self.forward_projected([q, k, v], mask, cache)
    }

    /// [`forward`](Self::forward) from the `q_proj`, `k_proj` and `v_proj` outputs, each
    /// `[batch, seq, heads · head_dim]`: for a caller that ran the projections itself, as the
    /// decoder layer does when it folds its input norm into them
    /// ([`JambaBackend::normed_projection`]).
    pub fn forward_projected(
        &self,
        [q_flat, k, v]: [Tensor<B, 3>; 3],
        mask: Option<&AttentionMask<B>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = q_flat.dims();
        let heads =
            |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let k = heads(k, self.num_kv_heads);
        let v = heads(v, self.num_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        if seq == 1 {
            let keys = k.dims()[2];
            // As in the general path, a pad query keeps every key (its output is ignored).
            let hidden = mask.map(|m| {
                let real_query = m.query_padding.clone().bool_not().reshape([batch, 1]);
                m.key_padding
                    .clone()
                    .bool_and(real_query.expand([batch, keys]))
            });
            let q = q_flat.reshape([batch, self.num_heads, self.head_dim]);
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let out =
                match B::decode_attention(q.clone(), k.clone(), v.clone(), hidden.clone(), scale) {
                    Some(out) => out,
                    None => self.attend_one(q, k, v, hidden),
                };
            return project(
                &self.o_proj,
                out.reshape([batch, 1, self.num_heads * self.head_dim]),
            );
        }
        let q = heads(q_flat, self.num_heads);
        // Burn's fused attention has no GQA broadcast: repeat each key/value head.
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));
        let keys = k.dims()[2];
        // Pad keys are hidden from real queries only: a pad query keeps its causal window, so
        // no row is fully masked and its (ignored) output stays finite on every backend.
        let mask = mask.map(|m| {
            let key_pad = m.key_padding.clone().reshape([batch, 1, 1, keys]);
            let real_query = m
                .query_padding
                .clone()
                .bool_not()
                .reshape([batch, 1, seq, 1]);
            key_pad
                .expand([batch, 1, seq, keys])
                .bool_and(real_query.expand([batch, 1, seq, keys]))
                .expand([batch, self.num_heads, seq, keys])
        });
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = B::scaled_dot_product_attention(q, k, v, mask, options);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        project(&self.o_proj, out)
    }

    /// One new position per row (decoding). The query heads that share a key/value head become
    /// that head's query rows, so the cached keys and values are read as they are instead of
    /// being copied once per query head (`repeat_kv` would copy the whole cache every step).
    /// With a single new position every cached key is causally visible: only the keys marked in
    /// `hidden` `[batch, keys]` are masked. `q` is `[batch, heads, dim]`; returns `[batch,
    /// heads · dim]`, as [`JambaBackend::decode_attention`] does.
    fn attend_one(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        hidden: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 2> {
        let [batch, _, dim] = q.dims();
        let (groups, rep) = (self.num_kv_heads, self.num_heads / self.num_kv_heads);
        let keys = k.dims()[2];
        let q = q.reshape([batch, groups, rep, dim]);
        let mask = hidden.map(|h| {
            h.reshape([batch, 1, 1, keys])
                .expand([batch, groups, rep, keys])
        });
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        B::scaled_dot_product_attention(q, k, v, mask, options)
            .reshape([batch, self.num_heads * dim])
    }

    fn repeat_kv(&self, t: Tensor<B, 4>) -> Tensor<B, 4> {
        let rep = self.num_heads / self.num_kv_heads;
        if rep == 1 {
            return t;
        }
        let [b, h, s, d] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .expand([b, h, rep, s, d])
            .reshape([b, h * rep, s, d])
    }
}
