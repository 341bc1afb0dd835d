//! Hugging Face checkpoints: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, in the hub's key layout (`model.layers.{i}.mamba.in_proj.weight`,
//! per-expert `feed_forward.experts.{e}.gate_proj.weight`, …). Loading checks every tensor's
//! presence, shape and dtype against the configuration and reports what is wrong by file and key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorView};

use crate::config::{FeedForwardKind, JambaConfig, MixerKind};
use crate::error::{JambaError, Result};
use crate::model::{
    Attention, DecoderLayer, Experts, FeedForward, Jamba, MambaMixer, Mixer, Mlp, RmsNorm,
    SparseMoe,
};

/// A progress report: `loaded` of `total` tensors are on the device.
pub type ProgressFn = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// How to load a checkpoint.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// The dtype of the model's weights and activations (`None`: f32, whatever is on disk).
    pub dtype: Option<DType>,
    /// Called after each tensor is loaded (a command-line front end draws a progress bar).
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct WeightFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl WeightFile {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| JambaError::io(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped by this process.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| JambaError::io(path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| JambaError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata,
        })
    }

    fn bytes(&self, name: &str) -> Option<(&[u8], Dtype, &[usize])> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        Some((&self.map[start..end], info.dtype, &info.shape))
    }
}

/// The tensors of a checkpoint folder, across its shards, taken one by one as the model is built.
pub(crate) struct WeightStore {
    dir: PathBuf,
    files: Vec<WeightFile>,
    /// Key → index of the file holding it.
    location: BTreeMap<String, usize>,
    taken: usize,
    options: LoadOptions,
}

impl WeightStore {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut location = BTreeMap::new();
        if index_path.exists() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| JambaError::io(&index_path, e))?;
            let index: Index = JambaError::parse_json(&index_path, &text)?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            for (key, shard) in &index.weight_map {
                let id = match shard_ids.get(shard) {
                    Some(&id) => id,
                    None => {
                        let path = dir.join(shard);
                        if !path.exists() {
                            return Err(JambaError::io(
                                &path,
                                std::io::Error::new(
                                    std::io::ErrorKind::NotFound,
                                    format!(
                                        "shard named by {} for `{key}` is absent",
                                        index_path.display()
                                    ),
                                ),
                            ));
                        }
                        files.push(WeightFile::open(&path)?);
                        shard_ids.insert(shard.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[id].metadata.info(key).is_none() {
                    return Err(JambaError::MissingTensor {
                        path: files[id].path.clone(),
                        name: key.clone(),
                        expected: Vec::new(),
                    });
                }
                location.insert(key.clone(), id);
            }
            // Tensors a shard holds beyond the index are still the checkpoint's: report them as
            // unexpected rather than ignore them.
            for (id, file) in files.iter().enumerate() {
                for name in file.metadata.tensors().keys() {
                    location.entry(name.clone()).or_insert(id);
                }
            }
        } else if single.exists() {
            let file = WeightFile::open(&single)?;
            for name in file.metadata.tensors().keys() {
                location.insert(name.clone(), 0);
            }
            files.push(file);
        } else {
            return Err(JambaError::NoWeights { path: dir });
        }
        Ok(Self {
            dir,
            files,
            location,
            taken: 0,
            options,
        })
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.location.len() + self.taken
    }

    fn dtype(&self) -> DType {
        self.options.dtype.unwrap_or(DType::F32)
    }

    /// Takes `name` as f32 values, checking its shape on disk.
    fn take_values(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let Some(id) = self.location.remove(name) else {
            return Err(JambaError::MissingTensor {
                path: self.dir.clone(),
                name: name.into(),
                expected: expected.to_vec(),
            });
        };
        let file = &self.files[id];
        let (bytes, dtype, shape) = file.bytes(name).expect("located tensors exist");
        if shape != expected {
            return Err(JambaError::ShapeMismatch {
                path: file.path.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                found: shape.to_vec(),
            });
        }
        let values = decode(bytes, dtype).ok_or_else(|| JambaError::UnsupportedDtype {
            path: file.path.clone(),
            name: name.into(),
            dtype: format!("{dtype:?}"),
        })?;
        self.taken += 1;
        if let Some(progress) = &self.options.progress {
            progress(self.taken, self.len());
        }
        Ok(values)
    }

    fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.take_values(name, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            (device, self.dtype()),
        ))
    }

    fn param<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>> {
        self.tensor(name, shape, device).map(Param::from_tensor)
    }

    /// A `nn.Linear` stored `[out, in]`, into Burn's `[in, out]` layout.
    fn linear<B: Backend>(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Linear<B>> {
        let transposed = self.transposed(prefix, d_in, d_out)?;
        let weight = Tensor::from_data(
            TensorData::new(transposed, [d_in, d_out]),
            (device, self.dtype()),
        );
        let bias = if bias {
            Some(self.param(&format!("{prefix}.bias"), [d_out], device)?)
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// The values of `{prefix}.weight`, a `nn.Linear` stored `[out, in]`, in `[in, out]` order.
    fn transposed(&mut self, prefix: &str, d_in: usize, d_out: usize) -> Result<Vec<f32>> {
        let values = self.take_values(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let mut transposed = vec![0f32; values.len()];
        for (o, row) in values.chunks_exact(d_in.max(1)).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                transposed[i * d_out + o] = v;
            }
        }
        Ok(transposed)
    }

    /// `{prefix}.{e}.gate_proj` … for every expert, stacked (each in `[in, out]` layout).
    fn experts<B: Backend>(
        &mut self,
        prefix: &str,
        num_experts: usize,
        h: usize,
        f: usize,
        device: &B::Device,
    ) -> Result<Experts<B>> {
        let mut stacked = |name: &str, d_in: usize, d_out: usize| -> Result<_> {
            let mut values = Vec::with_capacity(num_experts * d_in * d_out);
            for e in 0..num_experts {
                values.extend(self.transposed(&format!("{prefix}.{e}.{name}"), d_in, d_out)?);
            }
            Ok(Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [num_experts, d_in, d_out]),
                (device, self.dtype()),
            )))
        };
        Ok(Experts {
            gate_proj: stacked("gate_proj", h, f)?,
            up_proj: stacked("up_proj", h, f)?,
            down_proj: stacked("down_proj", f, h)?,
        })
    }

    fn norm<B: Backend>(
        &mut self,
        prefix: &str,
        size: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<RmsNorm<B>> {
        Ok(RmsNorm::from_weight(
            self.tensor(&format!("{prefix}.weight"), [size], device)?,
            eps,
        ))
    }

    fn mlp<B: Backend>(
        &mut self,
        prefix: &str,
        h: usize,
        f: usize,
        device: &B::Device,
    ) -> Result<Mlp<B>> {
        Ok(Mlp {
            gate_proj: self.linear(&format!("{prefix}.gate_proj"), h, f, false, device)?,
            up_proj: self.linear(&format!("{prefix}.up_proj"), h, f, false, device)?,
            down_proj: self.linear(&format!("{prefix}.down_proj"), f, h, false, device)?,
        })
    }

    /// Errors if any tensor of the checkpoint was not taken by the model.
    fn finish(self) -> Result<()> {
        match self.location.into_iter().next() {
            None => Ok(()),
            Some((name, id)) => {
                let file = &self.files[id];
                let shape = file
                    .bytes(&name)
                    .map(|(_, _, s)| s.to_vec())
                    .unwrap_or_default();
                Err(JambaError::UnexpectedTensor {
                    path: file.path.clone(),
                    name,
                    shape,
                })
            }
        }
    }
}

/// Little-endian bytes of a float dtype, as f32.
fn decode(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

impl<B: Backend> Jamba<B> {
    /// Loads a Hugging Face checkpoint folder (`config.json` and safetensors weights).
    ///
    /// ```no_run
    /// use jamba::backends::Cpu;
    /// let model = jamba::Jamba::<Cpu>::from_pretrained("tiny-jamba", &Default::default(), &Default::default())?;
    /// # Ok::<(), jamba::JambaError>(())
    /// ```
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        if let Some(dtype) = options.dtype
            && !B::supports_dtype(device, dtype)
        {
            return Err(JambaError::Input(format!(
                "this backend does not support {dtype:?} tensors"
            )));
        }
        let config = JambaConfig::from_file(dir.join("config.json"))?;
        let store = WeightStore::open(dir, options.clone())?;
        Self::from_weights(&config, store, device)
    }

    /// Builds the model for `config` from an opened [`WeightStore`].
    pub(crate) fn from_weights(
        config: &JambaConfig,
        mut w: WeightStore,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, v, eps) = (config.hidden_size, config.vocab_size, config.rms_norm_eps);
        let embed = w.param("model.embed_tokens.weight", [v, h], device)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (i, spec) in config.layer_plan().into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mixer = match spec.mixer {
                MixerKind::Attention => {
                    let (heads, kv_heads, hd) = (
                        config.num_attention_heads,
                        config.num_key_value_heads(),
                        config.head_dim(),
                    );
                    Mixer::Attention(Attention {
                        q_proj: w.linear(
                            &format!("{p}.self_attn.q_proj"),
                            h,
                            heads * hd,
                            false,
                            device,
                        )?,
                        k_proj: w.linear(
                            &format!("{p}.self_attn.k_proj"),
                            h,
                            kv_heads * hd,
                            false,
                            device,
                        )?,
                        v_proj: w.linear(
                            &format!("{p}.self_attn.v_proj"),
                            h,
                            kv_heads * hd,
                            false,
                            device,
                        )?,
                        o_proj: w.linear(
                            &format!("{p}.self_attn.o_proj"),
                            heads * hd,
                            h,
                            false,
                            device,
                        )?,
                        num_heads: heads,
                        num_kv_heads: kv_heads,
                        head_dim: hd,
                    })
                }
                MixerKind::Mamba => {
                    let (inner, n, r, k) = (
                        config.mamba_inner(),
                        config.mamba_d_state,
                        config.dt_rank(),
                        config.mamba_d_conv,
                    );
                    let m = format!("{p}.mamba");
                    // Checked against the checkpoint's [inner, 1, k], uploaded as [inner, k]:
                    // CUDA's copy engine rejects the strides Burn gives a middle unit dimension
                    // (IoError::UnsupportedStrides, which poisoned the stream in `jamba check`).
                    let conv_weight = Tensor::<B, 2>::from_data(
                        TensorData::new(
                            w.take_values(&format!("{m}.conv1d.weight"), &[inner, 1, k])?,
                            [inner, k],
                        ),
                        (device, w.dtype()),
                    );
                    Mixer::Mamba(MambaMixer {
                        in_proj: w.linear(
                            &format!("{m}.in_proj"),
                            h,
                            2 * inner,
                            config.mamba_proj_bias,
                            device,
                        )?,
                        conv_weight: Param::from_tensor(conv_weight),
                        conv_bias: if config.mamba_conv_bias {
                            Some(w.param(&format!("{m}.conv1d.bias"), [inner], device)?)
                        } else {
                            None
                        },
                        x_proj: w.linear(
                            &format!("{m}.x_proj"),
                            inner,
                            r + 2 * n,
                            false,
                            device,
                        )?,
                        dt_proj: w.linear(&format!("{m}.dt_proj"), r, inner, true, device)?,
                        a_log: w.param(&format!("{m}.A_log"), [inner, n], device)?,
                        d: w.param(&format!("{m}.D"), [inner], device)?,
                        out_proj: w.linear(
                            &format!("{m}.out_proj"),
                            inner,
                            h,
                            config.mamba_proj_bias,
                            device,
                        )?,
                        dt_layernorm: w.norm(&format!("{m}.dt_layernorm"), r, eps, device)?,
                        b_layernorm: w.norm(&format!("{m}.b_layernorm"), n, eps, device)?,
                        c_layernorm: w.norm(&format!("{m}.c_layernorm"), n, eps, device)?,
                        d_state: n,
                        dt_rank: r,
                    })
                }
            };
            let f = config.intermediate_size;
            let ff = format!("{p}.feed_forward");
            let feed_forward = match spec.feed_forward {
                FeedForwardKind::Mlp => FeedForward::Mlp(w.mlp(&ff, h, f, device)?),
                FeedForwardKind::Moe { num_experts, top_k } => FeedForward::Moe(SparseMoe {
                    router: w.linear(&format!("{ff}.router"), h, num_experts, false, device)?,
                    experts: w.experts(&format!("{ff}.experts"), num_experts, h, f, device)?,
                    top_k,
                }),
            };
            layers.push(DecoderLayer {
                input_layernorm: w.norm(&format!("{p}.input_layernorm"), h, eps, device)?,
                mixer,
                pre_ff_layernorm: w.norm(&format!("{p}.pre_ff_layernorm"), h, eps, device)?,
                feed_forward,
            });
        }
        let final_layernorm = w.norm("model.final_layernorm", h, eps, device)?;
        let lm_head = if config.tie_word_embeddings {
            // Some exports write the tied head anyway; it is the embedding, so drop it.
            w.location.remove("lm_head.weight");
            None
        } else {
            Some(w.linear("lm_head", h, v, false, device)?)
        };
        w.finish()?;
        Ok(Self {
            embed_tokens: Embedding { weight: embed },
            layers,
            final_layernorm,
            lm_head,
            config: config.clone(),
        })
    }

    /// Writes the model as a Hugging Face checkpoint: `config.json` and one `model.safetensors`
    /// in the model's dtype (f32, bf16 or f16), with the hub's keys, so that
    /// [`from_pretrained`](Self::from_pretrained) and transformers can read it back.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| JambaError::io(dir, e))?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, self.config().to_json_string())
            .map_err(|e| JambaError::io(&config_path, e))?;

        let dtype = match self.dtype() {
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        };
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut put = |name: String, t: TensorData| {
            let shape = t.shape.to_vec();
            let values: Vec<f32> = t.convert::<f32>().into_vec().expect("float tensor");
            let bytes = encode(&values, dtype);
            tensors.push((name, shape, bytes));
        };
        let lin = |l: &Linear<B>| l.weight.val().transpose().into_data();
        let put_linear = |put: &mut dyn FnMut(String, TensorData), name: &str, l: &Linear<B>| {
            put(format!("{name}.weight"), lin(l));
            if let Some(b) = &l.bias {
                put(format!("{name}.bias"), b.val().into_data());
            }
        };
        put(
            "model.embed_tokens.weight".into(),
            self.embed_tokens.weight.val().into_data(),
        );
        put(
            "model.final_layernorm.weight".into(),
            self.final_layernorm.weight.val().into_data(),
        );
        if let Some(head) = &self.lm_head {
            put_linear(&mut put, "lm_head", head);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            put(
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.val().into_data(),
            );
            put(
                format!("{p}.pre_ff_layernorm.weight"),
                layer.pre_ff_layernorm.weight.val().into_data(),
            );
            match &layer.mixer {
                Mixer::Attention(a) => {
                    for (n, l) in [
                        ("q_proj", &a.q_proj),
                        ("k_proj", &a.k_proj),
                        ("v_proj", &a.v_proj),
                        ("o_proj", &a.o_proj),
                    ] {
                        put_linear(&mut put, &format!("{p}.self_attn.{n}"), l);
                    }
                }
                Mixer::Mamba(m) => {
                    let mp = format!("{p}.mamba");
                    for (n, l) in [
                        ("in_proj", &m.in_proj),
                        ("x_proj", &m.x_proj),
                        ("dt_proj", &m.dt_proj),
                        ("out_proj", &m.out_proj),
                    ] {
                        put_linear(&mut put, &format!("{mp}.{n}"), l);
                    }
                    let [inner, k] = m.conv_weight.dims();
                    put(
                        format!("{mp}.conv1d.weight"),
                        m.conv_weight.val().reshape([inner, 1, k]).into_data(),
                    );
                    if let Some(b) = &m.conv_bias {
                        put(format!("{mp}.conv1d.bias"), b.val().into_data());
                    }
                    put(format!("{mp}.A_log"), m.a_log.val().into_data());
                    put(format!("{mp}.D"), m.d.val().into_data());
                    for (n, norm) in [
                        ("dt_layernorm", &m.dt_layernorm),
                        ("b_layernorm", &m.b_layernorm),
                        ("c_layernorm", &m.c_layernorm),
                    ] {
                        put(format!("{mp}.{n}.weight"), norm.weight.val().into_data());
                    }
                }
            }
            let ff = format!("{p}.feed_forward");
            let put_mlp = |put: &mut dyn FnMut(String, TensorData), prefix: &str, mlp: &Mlp<B>| {
                put_linear(put, &format!("{prefix}.gate_proj"), &mlp.gate_proj);
                put_linear(put, &format!("{prefix}.up_proj"), &mlp.up_proj);
                put_linear(put, &format!("{prefix}.down_proj"), &mlp.down_proj);
            };
            match &layer.feed_forward {
                FeedForward::Mlp(mlp) => put_mlp(&mut put, &ff, mlp),
                FeedForward::Moe(moe) => {
                    put_linear(&mut put, &format!("{ff}.router"), &moe.router);
                    for e in 0..moe.num_experts() {
                        let [gate, up, down] = moe.experts.weights(e);
                        for (name, weight) in
                            [("gate_proj", gate), ("up_proj", up), ("down_proj", down)]
                        {
                            put(
                                format!("{ff}.experts.{e}.{name}.weight"),
                                weight.transpose().into_data(),
                            );
                        }
                    }
                }
            }
        }
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| JambaError::Safetensors {
                        path: dir.join("model.safetensors"),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join("model.safetensors");
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
            JambaError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })
    }
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}
