//! The hybrid inference cache: keys and values for the attention layers only, a fixed-size
//! convolution + SSM state for the Mamba layers. This asymmetry is the point of Jamba: with one
//! attention layer in eight, the cache that grows with the context is eight times smaller.

use burn::tensor::{Bool, DType, Int, Tensor, backend::Backend};

use crate::config::{JambaConfig, MixerKind};

/// Keys and values of one attention layer, preallocated in blocks so that appending a token
/// writes one slot instead of copying the history.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `[batch, kv_heads, capacity, head_dim]`.
    keys: Option<Tensor<B, 4>>,
    values: Option<Tensor<B, 4>>,
    len: usize,
    block: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache that grows `block` positions at a time.
    pub fn new(block: usize) -> Self {
        Self {
            keys: None,
            values: None,
            len: 0,
            block: block.max(1),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions allocated.
    pub fn capacity(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.dims()[2])
    }

    /// Appends `[batch, kv_heads, new, head_dim]` keys and values; returns everything held.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, heads, new, dim] = k.dims();
        let needed = self.len + new;
        if needed > self.capacity() {
            let capacity = needed.max(2 * self.capacity()).next_multiple_of(self.block);
            let grow = |old: Option<Tensor<B, 4>>, like: &Tensor<B, 4>| {
                let fresh = Tensor::zeros(
                    [batch, heads, capacity, dim],
                    (&like.device(), like.dtype()),
                );
                match old {
                    Some(old) if self.len > 0 => {
                        let kept = old.slice([0..batch, 0..heads, 0..self.len]);
                        fresh.slice_assign([0..batch, 0..heads, 0..self.len], kept)
                    }
                    _ => fresh,
                }
            };
            self.keys = Some(grow(self.keys.take(), &k));
            self.values = Some(grow(self.values.take(), &v));
        }
        let range = [0..batch, 0..heads, self.len..needed];
        let keys = self
            .keys
            .take()
            .expect("allocated")
            .slice_assign(range.clone(), k);
        let values = self
            .values
            .take()
            .expect("allocated")
            .slice_assign(range, v);
        self.len = needed;
        let held = [0..batch, 0..heads, 0..needed];
        let out = (keys.clone().slice(held.clone()), values.clone().slice(held));
        self.keys = Some(keys);
        self.values = Some(values);
        out
    }

    fn map(&mut self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) {
        self.keys = self.keys.take().map(&f);
        self.values = self.values.take().map(&f);
    }

    fn bytes(&self) -> u64 {
        self.keys.iter().chain(&self.values).map(tensor_bytes).sum()
    }
}

/// The recurrent state of one Mamba layer: constant size whatever the context.
#[derive(Debug, Clone)]
pub struct MambaState<B: Backend> {
    /// The last `d_conv − 1` convolution inputs, `[batch, d_conv − 1, inner]`, model dtype.
    pub conv: Tensor<B, 3>,
    /// The SSM state, `[batch, inner, d_state]`, f32.
    pub ssm: Tensor<B, 3>,
}

/// One layer's cache.
#[derive(Debug, Clone)]
pub enum LayerCache<B: Backend> {
    /// An attention layer's keys and values.
    Attention(KvCache<B>),
    /// A Mamba layer's state.
    Mamba(MambaState<B>),
}

impl<B: Backend> LayerCache<B> {
    /// The kind of layer this cache belongs to.
    pub fn mixer_kind(&self) -> MixerKind {
        match self {
            Self::Attention(_) => MixerKind::Attention,
            Self::Mamba(_) => MixerKind::Mamba,
        }
    }

    /// An attention layer's keys and values.
    ///
    /// # Panics
    /// If this is a Mamba layer's cache: forward passes check a cache's layer plan against the
    /// model's before any layer reads it.
    pub(crate) fn kv(&mut self) -> &mut KvCache<B> {
        match self {
            Self::Attention(kv) => kv,
            Self::Mamba(_) => unreachable!("a cache checked against the model's layer plan"),
        }
    }

    /// A Mamba layer's state.
    ///
    /// # Panics
    /// If this is an attention layer's cache (see [`kv`](Self::kv)).
    pub(crate) fn mamba(&mut self) -> &mut MambaState<B> {
        match self {
            Self::Mamba(state) => state,
            Self::Attention(_) => unreachable!("a cache checked against the model's layer plan"),
        }
    }
}

/// The inference cache of a whole model, for a batch of sequences that advance together.
///
/// ```
/// use jamba::backends::Cpu;
/// use jamba::{JambaCache, JambaConfig};
/// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 8,
///     "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64}"#).unwrap();
/// let cache = JambaCache::<Cpu>::new(&config, 2, burn::tensor::DType::F32, &Default::default());
/// assert_eq!(cache.seq_len(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct JambaCache<B: Backend> {
    /// Per layer, in order.
    pub layers: Vec<LayerCache<B>>,
    /// `[batch, seq_len]`, `true` where a cached position is padding.
    padding: Option<Tensor<B, 2, Bool>>,
    seq_len: usize,
    batch: usize,
}

/// Default growth of the key/value caches, in positions.
pub const KV_BLOCK: usize = 256;

impl<B: Backend> JambaCache<B> {
    /// An empty cache for `batch` sequences; the conv state takes `dtype`, the SSM state f32.
    pub fn new(config: &JambaConfig, batch: usize, dtype: DType, device: &B::Device) -> Self {
        let inner = config.mamba_inner();
        let layers = config
            .layer_plan()
            .iter()
            .map(|spec| match spec.mixer {
                MixerKind::Attention => LayerCache::Attention(KvCache::new(KV_BLOCK)),
                MixerKind::Mamba => LayerCache::Mamba(MambaState {
                    conv: Tensor::zeros([batch, config.mamba_d_conv - 1, inner], (device, dtype)),
                    ssm: Tensor::zeros([batch, inner, config.mamba_d_state], (device, DType::F32)),
                }),
            })
            .collect();
        Self {
            layers,
            padding: None,
            seq_len: 0,
            batch,
        }
    }

    /// A cache as if `context` tokens had already been processed, holding random values.
    ///
    /// A decode step costs what the cached length makes it cost, whatever the tokens were, so
    /// benchmarks use this to time decoding after 64K tokens without prefilling them first. Each
    /// key/value cache has room for [`KV_BLOCK`] more positions before it grows.
    ///
    /// ```
    /// use jamba::backends::Cpu;
    /// use jamba::{JambaCache, JambaConfig};
    /// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 8,
    ///     "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64}"#).unwrap();
    /// let cache = JambaCache::<Cpu>::synthetic(&config, 2, 1000, burn::tensor::DType::F32,
    ///     &Default::default());
    /// assert_eq!(cache.seq_len(), 1000);
    /// ```
    pub fn synthetic(
        config: &JambaConfig,
        batch: usize,
        context: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        use burn::tensor::Distribution;
        let mut cache = Self::new(config, batch, dtype, device);
        let random = |shape: [usize; 3], dtype: DType| {
            Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
        };
        let capacity = context.next_multiple_of(KV_BLOCK) + KV_BLOCK;
        let kv_shape = [
            batch,
            config.num_key_value_heads(),
            capacity,
            config.head_dim(),
        ];
        for layer in &mut cache.layers {
            match layer {
                LayerCache::Attention(kv) if context > 0 => {
                    let random4 = || {
                        Tensor::<B, 4>::random(kv_shape, Distribution::Normal(0.0, 1.0), device)
                            .cast(dtype)
                    };
                    kv.keys = Some(random4());
                    kv.values = Some(random4());
                    kv.len = context;
                }
                LayerCache::Attention(_) => {}
                LayerCache::Mamba(s) => {
                    s.conv = random(s.conv.dims(), dtype);
                    s.ssm = random(s.ssm.dims(), DType::F32);
                }
            }
        }
        cache.seq_len = context;
        cache
    }

    /// Bytes of what the cache holds now: the key/value positions in use (not the allocated
    /// capacity that [`size_bytes`](Self::size_bytes) counts) plus the Mamba states.
    pub fn used_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::Attention(kv) => {
                    let per_position = kv.keys.as_ref().map_or(0, |k| {
                        let [b, h, _, d] = k.dims();
                        (b * h * d * k.dtype().size()) as u64
                    });
                    2 * per_position * kv.len as u64
                }
                LayerCache::Mamba(s) => tensor_bytes(&s.conv) + tensor_bytes(&s.ssm),
            })
            .sum()
    }

    /// Positions processed so far (padding included).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Sequences in the batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// The kinds of the layers this cache was built for, in order.
    pub fn mixer_kinds(&self) -> Vec<MixerKind> {
        self.layers.iter().map(LayerCache::mixer_kind).collect()
    }

    /// Bytes held on the device now: allocated key/value capacity plus the Mamba states.
    pub fn size_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| match l {
                LayerCache::Attention(kv) => kv.bytes(),
                LayerCache::Mamba(s) => tensor_bytes(&s.conv) + tensor_bytes(&s.ssm),
            })
            .sum();
        layers
            + self
                .padding
                .as_ref()
                .map_or(0, |p| p.shape().num_elements() as u64)
    }

    /// Forgets every sequence: keys, values and states back to empty.
    pub fn reset(&mut self) {
        for layer in &mut self.layers {
            match layer {
                LayerCache::Attention(kv) => *kv = KvCache::new(kv.block),
                LayerCache::Mamba(s) => {
                    s.conv = s.conv.zeros_like();
                    s.ssm = s.ssm.zeros_like();
                }
            }
        }
        self.padding = None;
        self.seq_len = 0;
    }

    /// Keeps the batch rows `rows` in that order (beam reordering, dropping finished rows,
    /// duplicating a prompt's cache for several samples).
    pub fn select_rows(&mut self, rows: &[usize]) {
        let Some(device) = self.device() else { return };
        let index = Tensor::<B, 1, Int>::from_data(
            burn::tensor::TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        );
        for layer in &mut self.layers {
            match layer {
                LayerCache::Attention(kv) => kv.map(|t| t.select(0, index.clone())),
                LayerCache::Mamba(s) => {
                    s.conv = s.conv.clone().select(0, index.clone());
                    s.ssm = s.ssm.clone().select(0, index.clone());
                }
            }
        }
        self.padding = self.padding.take().map(|p| p.select(0, index.clone()));
        self.batch = rows.len();
    }

    fn device(&self) -> Option<B::Device> {
        self.layers.iter().find_map(|l| match l {
            LayerCache::Mamba(s) => Some(s.ssm.device()),
            LayerCache::Attention(kv) => kv.keys.as_ref().map(|k| k.device()),
        })
    }

    /// Records `new` positions with their padding (`None`: all real) and returns the padding of
    /// every cached position including them, or `None` if there is none.
    pub(crate) fn push_padding(
        &mut self,
        new: usize,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> Option<Tensor<B, 2, Bool>> {
        let (batch, old) = (self.batch, self.seq_len);
        self.seq_len += new;
        let device = padding
            .as_ref()
            .or(self.padding.as_ref())
            .map(|p| p.device())?;
        // Never materialise a zero-width tensor: CUDA's pitched layout gives `[batch, 0]` a zero
        // row stride, which cubecl rejects at upload (`UnsupportedStrides`, reported later).
        let fill = |n: usize| Tensor::<B, 2, Int>::zeros([batch, n], &device).equal_elem(1);
        let current = padding.unwrap_or_else(|| fill(new));
        let previous = self.padding.take().or_else(|| (old > 0).then(|| fill(old)));
        let all = match previous {
            Some(previous) => Tensor::cat(vec![previous, current], 1),
            None => current,
        };
        self.padding = Some(all.clone());
        Some(all)
    }
}

fn tensor_bytes<B: Backend, const D: usize>(t: &Tensor<B, D>) -> u64 {
    (t.shape().num_elements() * t.dtype().size()) as u64
}
