//! Text generation over the hybrid cache: batched left-padded prefill (optionally in chunks),
//! then one decoding step per token, with greedy, temperature, top-k and top-p sampling, through
//! the inference [`Engine`].

use std::time::Instant;

use burn::tensor::{DType, Tensor, backend::Backend};

use crate::engine::{Engine, EngineBackend, GreedyPipeline};
use crate::error::{JambaError, Result};
use crate::model::Jamba;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (nucleus sampling).
    pub top_p: Option<f64>,
    /// Seed of the sampler: the same seed, prompt and model give the same tokens.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Whether this is plain argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == Some(1)
    }
}

/// What to generate.
///
/// ```
/// let config = jamba::generation::GenerationConfig { max_new_tokens: 32, ..Default::default() };
/// assert!(config.sampling.is_greedy());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Stop after this many new tokens per sequence.
    pub max_new_tokens: usize,
    /// Stop when a sequence (prompt + new tokens) reaches this length; prompts longer than it
    /// are an error. `None`: the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// A sequence ends when it produces any of these (the config's `eos_token_id`, say).
    pub eos_token_ids: Vec<u32>,
    /// The sampler.
    pub sampling: SamplingConfig,
    /// Feed the prompt through the cache this many tokens at a time (`None`: all at once), so
    /// that a very long prompt needs memory for one chunk only.
    pub prefill_chunk: Option<usize>,
    /// The id used for left padding in a batch of prompts of different lengths.
    pub pad_token_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            max_context: None,
            eos_token_ids: Vec::new(),
            sampling: SamplingConfig::default(),
            prefill_chunk: None,
            pad_token_id: 0,
        }
    }
}

impl GenerationConfig {
    /// Defaults for `model`: its end-of-sequence and padding ids.
    pub fn for_model<B: Backend>(model: &Jamba<B>) -> Self {
        let c = model.config();
        Self {
            eos_token_ids: c.eos_token_ids(),
            pad_token_id: c.pad_token_id.unwrap_or(0),
            ..Self::default()
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence id (kept as its last token).
    Eos,
    /// It reached `max_new_tokens`.
    MaxNewTokens,
    /// It reached `max_context`.
    MaxContext,
}

/// Timings and sizes of a generation run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt positions processed (batch × padded prompt length).
    pub prefill_tokens: usize,
    /// Seconds spent on the prompt, including the first token's logits.
    pub prefill_secs: f64,
    /// Tokens produced by decode steps, over all rows that were still running.
    pub decode_tokens: usize,
    /// Seconds spent in decode steps.
    pub decode_secs: f64,
    /// Largest cache size seen, in bytes.
    pub peak_cache_bytes: u64,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_secs.max(1e-12)
    }
    /// Generated tokens per second (all rows together).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_secs.max(1e-12)
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// New tokens per prompt (an end-of-sequence token is kept).
    pub tokens: Vec<Vec<u32>>,
    /// Why each prompt stopped.
    pub finish: Vec<FinishReason>,
    /// Throughput and memory.
    pub stats: GenerationStats,
}

/// A small deterministic generator (SplitMix64): sampling needs only uniform floats, and a
/// dependency-free generator keeps results identical across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draws a token from one row of logits with temperature, top-k and top-p.
pub fn sample(logits: &[f32], config: &SamplingConfig, rng: &mut SplitMix64) -> u32 {
    if config.is_greedy() {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = config.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / config.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = config.top_p {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                cumulative += q;
                cumulative >= p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut u = rng.next_f64();
    for (&i, &q) in order.iter().zip(&probs) {
        if u < q {
            return i as u32;
        }
        u -= q;
    }
    order[order.len() - 1] as u32
}

/// Index of the largest value (the first one on ties, as PyTorch's `argmax` on the CPU).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Left-pads prompts of different lengths into `[batch, longest]` ids and a 1/0 mask.
pub fn left_pad(prompts: &[Vec<u32>], pad: u32) -> (Vec<i64>, Vec<i64>, usize) {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for p in prompts {
        let pad_len = longest - p.len();
        ids.extend(std::iter::repeat_n(pad as i64, pad_len).chain(p.iter().map(|&t| t as i64)));
        mask.extend(std::iter::repeat_n(0i64, pad_len).chain(std::iter::repeat_n(1, p.len())));
    }
    (ids, mask, longest)
}

/// Generates continuations of `prompts` (token ids) as one batch; `on_token(row, token)` is
/// called as each token is chosen, for streaming.
///
/// Errors on an empty batch or prompt, an id outside the vocabulary, or a prompt longer than
/// the maximum context.
///
/// ```
/// use jamba::backends::Cpu;
/// use jamba::generation::{GenerationConfig, generate};
/// use jamba::{Engine, Jamba, JambaConfig};
/// let config = JambaConfig::from_json_str(r#"{"hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "intermediate_size": 48, "vocab_size": 64,
///     "attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 4}"#).unwrap();
/// let engine = Engine::new(Jamba::<Cpu>::init(&config, &Default::default()), Default::default());
/// let config = GenerationConfig { max_new_tokens: 4, ..Default::default() };
/// let out = generate(&engine, &[vec![5, 6, 7], vec![8]], &config, |_, _| {}).unwrap();
/// assert_eq!(out.tokens[1].len(), 4);
/// ```
pub fn generate<B: EngineBackend>(
    engine: &Engine<B>,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<GenerationOutput> {
    let model = engine.model();
    let vocab = model.config().vocab_size;
    let max_context = config
        .max_context
        .unwrap_or(model.config().max_position_embeddings);
    if prompts.is_empty() {
        return Err(JambaError::Input("no prompt given".into()));
    }
    for (row, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(JambaError::Input(format!("prompt {row} is empty")));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(JambaError::Input(format!(
                "prompt {row}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        if p.len() > max_context {
            return Err(JambaError::Input(format!(
                "prompt {row} has {} tokens, more than the maximum context of {max_context}",
                p.len()
            )));
        }
    }
    let batch = prompts.len();
    let (ids, mask, longest) = left_pad(prompts, config.pad_token_id);
    let padded = mask.iter().any(|&m| m == 0);
    let mut cache = engine.new_cache(batch);
    let mut stats = GenerationStats::default();

    let start = Instant::now();
    let chunk = config.prefill_chunk.unwrap_or(longest).max(1);
    let mut logits = None;
    for begin in (0..longest).step_by(chunk) {
        let end = (begin + chunk).min(longest);
        let cols = |v: &[i64]| -> Vec<i64> {
            v.chunks_exact(longest)
                .flat_map(|row| row[begin..end].iter().copied())
                .collect()
        };
        let mask = padded.then(|| cols(&mask));
        logits = Some(engine.forward(&cols(&ids), batch, mask.as_deref(), &mut cache, Some(1))?);
        stats.peak_cache_bytes = stats.peak_cache_bytes.max(cache.size_bytes());
    }
    let mut rng = SplitMix64::new(config.sampling.seed);
    let logits = logits.expect("prompts are non-empty");
    // Greedy decoding queues each step before reading the previous one's tokens; the
    // prefill's token is read at once, so that `prefill_secs` covers the prefill.
    let mut pipe = (config.sampling.is_greedy() && engine.options().greedy_pipeline)
        .then(|| GreedyPipeline::new(engine, logits.clone()))
        .transpose()?;
    let mut next = match pipe.as_mut() {
        Some(pipe) => pipe.next_tokens()?,
        None => pick(logits, &config.sampling, &mut rng)?,
    };
    stats.prefill_tokens = batch * longest;
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let mut tokens = vec![Vec::new(); batch];
    let mut finish: Vec<Option<FinishReason>> = vec![None; batch];
    let decode_start = Instant::now();
    loop {
        if let Some(pipe) = pipe.as_mut() {
            // The next step is queued now, from `next` still on the device, if any row can
            // go on after taking it (a row that stops on an end-of-sequence id wastes it).
            let ahead = (0..batch).any(|r| {
                finish[r].is_none()
                    && tokens[r].len() + 1 < config.max_new_tokens
                    && prompts[r].len() + tokens[r].len() + 1 < max_context
            });
            if ahead {
                pipe.queue_step(&mut cache)?;
                stats.peak_cache_bytes = stats.peak_cache_bytes.max(cache.size_bytes());
            }
        }
        for row in 0..batch {
            if finish[row].is_some() {
                continue;
            }
            let t = next[row];
            tokens[row].push(t);
            on_token(row, t);
            finish[row] = if config.eos_token_ids.contains(&t) {
                Some(FinishReason::Eos)
            } else if tokens[row].len() >= config.max_new_tokens {
                Some(FinishReason::MaxNewTokens)
            } else if prompts[row].len() + tokens[row].len() >= max_context {
                Some(FinishReason::MaxContext)
            } else {
                None
            };
        }
        if finish.iter().all(Option::is_some) || config.max_new_tokens == 0 {
            break;
        }
        let running = finish.iter().filter(|f| f.is_none()).count();
        if let Some(pipe) = pipe.as_mut() {
            // Finished rows went on with their own argmax; their tokens are dropped above.
            next = pipe.next_tokens()?;
            stats.decode_tokens += running;
            continue;
        }
        // Finished rows keep stepping with a pad token (their outputs are ignored) so the batch
        // stays rectangular.
        let step: Vec<i64> = (0..batch)
            .map(|r| {
                if finish[r].is_some() {
                    config.pad_token_id as i64
                } else {
                    next[r] as i64
                }
            })
            .collect();
        let logits = engine.forward(&step, batch, None, &mut cache, Some(1))?;
        next = pick(logits, &config.sampling, &mut rng)?;
        stats.decode_tokens += running;
        stats.peak_cache_bytes = stats.peak_cache_bytes.max(cache.size_bytes());
    }
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    if config.max_new_tokens == 0 {
        tokens.iter_mut().for_each(Vec::clear);
    }
    Ok(GenerationOutput {
        tokens,
        finish: finish
            .into_iter()
            .map(|f| f.unwrap_or(FinishReason::MaxNewTokens))
            .collect(),
        stats,
    })
}

/// The next token of every row from `[batch, 1, vocab]` logits: argmax on the device for greedy
/// decoding (one integer per row crosses to the host), the full row on the host otherwise.
fn pick<B: EngineBackend>(
    logits: Tensor<B, 3>,
    sampling: &SamplingConfig,
    rng: &mut SplitMix64,
) -> Result<Vec<u32>> {
    let [batch, _, vocab] = logits.dims();
    let logits = logits.reshape([batch, vocab]);
    if sampling.is_greedy() {
        let ids = B::queue_read_ids(B::argmax_rows(logits)).wait()?;
        return Ok(ids.into_iter().map(|t| t as u32).collect());
    }
    let values: Vec<f32> = logits
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("float data");
    Ok(values
        .chunks_exact(vocab)
        .map(|row| sample(row, sampling, rng))
        .collect())
}
