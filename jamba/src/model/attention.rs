//! Grouped-query causal self-attention with no positional encoding (`JambaAttention`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, backend::Backend};

use crate::cache::KvCache;
use crate::ops::{JambaBackend, linear};

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

/// The padding of one forward pass, `true` where a position is a pad.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// `[batch, keys]`: every key the layer attends to, cached ones included.
    pub key_padding: Tensor<B, 2, Bool>,
    /// `[batch, queries]`: the new positions.
    pub query_padding: Tensor<B, 2, Bool>,
}

/// Causal grouped-query attention. Jamba's attention layers carry no positional encoding: the
/// Mamba layers before them supply the order.
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::model::AttentionConfig;
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
    /// Randomly initialised weights, without biases.
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
    /// Attends over `x` `[batch, seq, hidden]`, after the keys and values in `cache` when one is
    /// given (the new ones are appended to it).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&AttentionMask<B>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<B, 3>, n: usize| {
            t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2)
        };
        let q = heads(linear(&self.q_proj, x.clone()), self.num_heads);
        let k = heads(linear(&self.k_proj, x.clone()), self.num_kv_heads);
        let v = heads(linear(&self.v_proj, x), self.num_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let keys = k.dims()[2];
        let hidden = hidden_keys(mask, seq, keys, &q.device()).expand([
            batch,
            self.num_heads,
            seq,
            keys,
        ]);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let out = B::scaled_dot_product_attention(q, self.repeat_kv(k), self.repeat_kv(v), Some(hidden), options);
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        linear(&self.o_proj, out)
    }

    /// Each key/value head repeated for the query heads that share it (Burn's attention has no
    /// grouped-query broadcast).
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

/// The keys hidden from each query, `[batch, 1, queries, keys]`, `true` where hidden: the
/// future (the last query sees the last key, so cached keys are all visible) and, for real
/// queries, the padded keys. A pad query keeps its causal window, so that no row is hidden
/// entirely and its (ignored) output stays finite on every backend.
fn hidden_keys<B: Backend>(
    mask: Option<&AttentionMask<B>>,
    queries: usize,
    keys: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let rows = Tensor::<B, 1, Int>::arange(0..queries as i64, device)
        .add_scalar(keys as i64 - queries as i64)
        .reshape([queries, 1]);
    let cols = Tensor::<B, 1, Int>::arange(0..keys as i64, device).reshape([1, keys]);
    let future = rows.lower(cols).reshape([1, 1, queries, keys]);
    let Some(mask) = mask else {
        return future;
    };
    let batch = mask.key_padding.dims()[0];
    let pad_key = mask.key_padding.clone().reshape([batch, 1, 1, keys]);
    let real_query = mask
        .query_padding
        .clone()
        .bool_not()
        .reshape([batch, 1, queries, 1]);
    pad_key
        .expand([batch, 1, queries, keys])
        .bool_and(real_query.expand([batch, 1, queries, keys]))
        .bool_or(future.expand([batch, 1, queries, keys]))
}
