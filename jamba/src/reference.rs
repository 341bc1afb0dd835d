//! The reference-fixture format and the parity checks run against it.
//!
//! A fixture is a checkpoint folder plus `expected.safetensors` (what transformers computed in
//! float64) and `fixture.json` (see `shared/fixtures/README.md`). [`parity_checks`] runs the
//! model's plain forward over the fixture's inputs and compares every output;
//! [`decode_checks`] runs the inference engine's cached prefill, decoding and generation. The
//! `jamba check` command and the test suite both print or assert their rows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use safetensors::tensor::Dtype;
use serde::Deserialize;

use crate::engine::{Engine, EngineBackend};
use crate::error::{JambaError, Result};
use crate::model::{ForwardOptions, Jamba};
use crate::ops::JambaBackend;

/// A tensor read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values (integers are widened to `f64`-exact `i64`).
    pub data: HostData,
}

/// Host values of a fixture tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// Floats.
    F32(Vec<f32>),
    /// Token ids and masks.
    I64(Vec<i64>),
}

impl HostTensor {
    /// The values as floats.
    pub fn f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The values as integers.
    pub fn i64(&self) -> Vec<i64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::I64(v) => v.clone(),
        }
    }

    /// As a Burn float tensor.
    pub fn to_float<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(self.f32(), self.shape.clone()),
            (device, DType::F32),
        )
    }

    /// As a Burn int tensor.
    pub fn to_int<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D, Int> {
        Tensor::from_data(TensorData::new(self.i64(), self.shape.clone()), device)
    }
}

/// `fixture.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct FixtureMeta {
    /// Fixture name.
    pub name: String,
    /// Greedy tokens generated after the prompt.
    pub new_tokens: usize,
    /// `float32` or `bfloat16`.
    pub weights_dtype: String,
    /// ‖f32 run − f64 run‖ / ‖f64 run‖ of the reference itself over the logits.
    pub f32_reference_rel_err: f64,
}

/// A fixture folder, read.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The folder.
    pub dir: PathBuf,
    /// `fixture.json`, when present.
    pub meta: Option<FixtureMeta>,
    /// `expected.safetensors`, by key.
    pub expected: HashMap<String, HostTensor>,
}

impl Fixture {
    /// Reads `dir/expected.safetensors` and, if present, `dir/fixture.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("expected.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| JambaError::io(&path, e))?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| JambaError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let mut expected = HashMap::new();
        for (name, view) in st.tensors() {
            let b = view.data();
            let data = match view.dtype() {
                Dtype::F32 => HostData::F32(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::I64 => HostData::I64(
                    b.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => {
                    return Err(JambaError::UnsupportedDtype {
                        path: path.clone(),
                        name,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            expected.insert(
                name,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let meta_path = dir.join("fixture.json");
        let meta = if meta_path.exists() {
            let text =
                std::fs::read_to_string(&meta_path).map_err(|e| JambaError::io(&meta_path, e))?;
            Some(JambaError::parse_json(meta_path, &text)?)
        } else {
            None
        };
        Ok(Self {
            dir,
            meta,
            expected,
        })
    }

    /// An expected tensor, or an error naming the file and key.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.expected
            .get(name)
            .ok_or_else(|| JambaError::MissingTensor {
                path: self.dir.join("expected.safetensors"),
                name: name.into(),
                expected: Vec::new(),
            })
    }

    /// The relative-error tolerance for a model computing in `dtype`.
    ///
    /// In f32 (whatever the weights' dtype on disk, since the reference used the same rounded
    /// weights) we accept 1e-5 or ten times the reference's own f32-vs-f64 error, whichever is
    /// larger: our f32 run differs from the reference's f32 run only in summation order, so
    /// both land at that distance from the f64 truth. In bf16/f16 every activation is rounded to
    /// 8 (11) significant bits, a relative error of 2⁻⁹ (2⁻¹²) per rounding that compounds over
    /// the layers; we accept 5e-2 (1e-2).
    pub fn tolerance(&self, dtype: DType) -> f64 {
        let f32_err = self.meta.as_ref().map_or(1e-6, |m| m.f32_reference_rel_err);
        match dtype {
            DType::BF16 => 5e-2,
            DType::F16 => 1e-2,
            _ => (10.0 * f32_err).max(1e-5),
        }
    }
}

/// ‖ours − reference‖₂ / ‖reference‖₂ (the absolute error when the reference is zero).
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    if ours.len() != reference.len() {
        return f64::INFINITY;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// max |ours − reference|.
pub fn max_abs_err(ours: &[f32], reference: &[f32]) -> f64 {
    ours.iter()
        .zip(reference)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .fold(0.0, f64::max)
}

/// One row of a parity report.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was compared.
    pub name: String,
    /// Relative error (for token comparisons: the fraction of mismatching tokens).
    pub rel_err: f64,
    /// Largest absolute error (for token comparisons: the number of mismatches).
    pub max_abs: f64,
    /// The bound `rel_err` must not exceed.
    pub tolerance: f64,
    /// What the row compares against, when not the fixture's tensor of that name.
    pub note: Option<String>,
}

impl Check {
    /// Whether the row passes.
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tolerance
    }

    fn values(name: impl Into<String>, ours: &[f32], reference: &[f32], tolerance: f64) -> Self {
        Self {
            name: name.into(),
            rel_err: rel_err(ours, reference),
            max_abs: max_abs_err(ours, reference),
            tolerance,
            note: None,
        }
    }

    /// Token-for-token equality: passes only with zero mismatches.
    pub fn tokens(name: impl Into<String>, ours: &[i64], reference: &[i64]) -> Self {
        let mismatches = ours.iter().zip(reference).filter(|(a, b)| a != b).count()
            + ours.len().abs_diff(reference.len());
        let n = reference.len().max(1) as f64;
        Self {
            name: name.into(),
            rel_err: mismatches as f64 / n,
            max_abs: mismatches as f64,
            tolerance: 0.0,
            note: None,
        }
    }

    fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Values of a tensor on the host as f32.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("float data")
}

/// Argmax over the last axis of `[rows, vocab]` host values.
pub fn argmax_rows(values: &[f32], vocab: usize) -> Vec<i64> {
    values
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as i64
        })
        .collect()
}

/// Keeps the rows (positions) of `[batch, seq, width]` values where `mask` is 1.
pub fn masked_rows(values: &[f32], mask: &[i64], width: usize) -> Vec<f32> {
    values
        .chunks_exact(width)
        .zip(mask)
        .filter(|(_, m)| **m != 0)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

/// Runs `model` over the fixture's prompts and compares what a single forward pass gives:
/// logits, every hidden state, every router logit, the auxiliary loss, the padded batch's logits
/// at unmasked positions, and the greedy argmax at every position.
pub fn parity_checks<B: JambaBackend>(model: &Jamba<B>, fixture: &Fixture) -> Result<Vec<Check>> {
    let device = model.device();
    let tol = fixture.tolerance(model.dtype());
    let vocab = model.config().vocab_size;
    let mut checks = Vec::new();

    let ids = fixture.get("input_ids")?;
    let options = ForwardOptions {
        output_hidden_states: true,
        output_router_logits: true,
        logits_to_keep: None,
    };
    let out = model.forward(ids.to_int::<B, 2>(&device), None, None, &options)?;
    let logits = to_vec(out.logits);
    let ref_logits = fixture.get("logits")?.f32();
    checks.push(Check::values("logits", &logits, &ref_logits, tol));
    checks.push(Check::tokens(
        "argmax(logits)",
        &argmax_rows(&logits, vocab),
        &argmax_rows(&ref_logits, vocab),
    ));
    for (i, h) in out.hidden_states.into_iter().enumerate() {
        let name = format!("hidden.{i}");
        checks.push(Check::values(
            &name,
            &to_vec(h),
            &fixture.get(&name)?.f32(),
            tol,
        ));
    }
    let hidden_expected = fixture
        .expected
        .keys()
        .filter(|k| k.starts_with("hidden."))
        .count();
    if hidden_expected != model.layers.len() + 1 {
        return Err(JambaError::Input(format!(
            "the fixture has {hidden_expected} hidden states but the model has {} layers",
            model.layers.len()
        )));
    }
    for (layer, r) in out.router_logits {
        let name = format!("router_logits.{layer}");
        checks.push(Check::values(
            &name,
            &to_vec(r),
            &fixture.get(&name)?.f32(),
            tol,
        ));
    }
    let routers_expected = fixture
        .expected
        .keys()
        .filter(|k| k.starts_with("router_logits."))
        .count();
    let routers_ours = checks
        .iter()
        .filter(|c| c.name.starts_with("router_logits."))
        .count();
    if routers_expected != routers_ours {
        return Err(JambaError::Input(format!(
            "the fixture has {routers_expected} router-logit tensors but the model has {routers_ours} MoE layers"
        )));
    }
    match (out.aux_loss, fixture.expected.get("aux_loss")) {
        (Some(ours), Some(reference)) => checks.push(Check::values(
            "aux_loss",
            &to_vec(ours),
            &reference.f32(),
            tol,
        )),
        (None, None) => {}
        (ours, _) => {
            return Err(JambaError::Input(format!(
                "aux_loss: the model {} one but the fixture {}",
                if ours.is_some() {
                    "computes"
                } else {
                    "has no MoE layer to compute"
                },
                if ours.is_some() {
                    "has none"
                } else {
                    "has one"
                }
            )));
        }
    }

    if let Some(padded) = PaddedBatch::from_fixture(fixture)? {
        checks.extend(padded_checks(model, fixture, &padded, tol)?);
    }
    Ok(checks)
}

/// The fixture's left-padded batch.
struct PaddedBatch {
    ids: HostTensor,
    mask: HostTensor,
    /// Each row's prompt without its padding.
    prompts: Vec<Vec<u32>>,
    /// Rows whose reference outputs are unusable: transformers returned NaN at unmasked
    /// positions (a fully masked padding row in its attention poisons the row), so only the
    /// "same as alone" comparison is meaningful there.
    poisoned: Vec<bool>,
}

impl PaddedBatch {
    fn from_fixture(fixture: &Fixture) -> Result<Option<Self>> {
        let (Some(ids), Some(mask)) = (
            fixture.expected.get("padded_ids"),
            fixture.expected.get("padded_mask"),
        ) else {
            return Ok(None);
        };
        let logits = fixture.get("padded_logits")?;
        let (batch, seq, vocab) = (ids.shape[0], ids.shape[1], logits.shape[2]);
        let (id_v, mask_v, logit_v) = (ids.i64(), mask.i64(), logits.f32());
        let mut prompts = Vec::new();
        let mut poisoned = Vec::new();
        for r in 0..batch {
            let row = r * seq..(r + 1) * seq;
            prompts.push(
                id_v[row.clone()]
                    .iter()
                    .zip(&mask_v[row.clone()])
                    .filter(|(_, m)| **m != 0)
                    .map(|(t, _)| *t as u32)
                    .collect(),
            );
            poisoned.push(row.clone().any(|p| {
                mask_v[p] != 0
                    && logit_v[p * vocab..(p + 1) * vocab]
                        .iter()
                        .any(|x| !x.is_finite())
            }));
        }
        Ok(Some(Self {
            ids: ids.clone(),
            mask: mask.clone(),
            prompts,
            poisoned,
        }))
    }

    fn rows(&self) -> usize {
        self.prompts.len()
    }
}

const POISONED: &str =
    "reference row is NaN (transformers' fully masked pad row); compared with the prompt run alone";

/// The padded batch's logits at unmasked positions: against the reference where it is finite,
/// and every row against the same prompt run alone without padding.
fn padded_checks<B: JambaBackend>(
    model: &Jamba<B>,
    fixture: &Fixture,
    padded: &PaddedBatch,
    tol: f64,
) -> Result<Vec<Check>> {
    let device = model.device();
    let vocab = model.config().vocab_size;
    let seq = padded.ids.shape[1];
    let out = model.forward(
        padded.ids.to_int::<B, 2>(&device),
        Some(padded.mask.to_int::<B, 2>(&device)),
        None,
        &ForwardOptions::default(),
    )?;
    let ours = to_vec(out.logits);
    let reference = fixture.get("padded_logits")?.f32();
    let mask = padded.mask.i64();
    let mut checks = Vec::new();
    let row_values = |v: &[f32], r: usize| {
        masked_rows(
            &v[r * seq * vocab..(r + 1) * seq * vocab],
            &mask[r * seq..(r + 1) * seq],
            vocab,
        )
    };
    let (mut ours_valid, mut ref_valid) = (Vec::new(), Vec::new());
    for r in (0..padded.rows()).filter(|&r| !padded.poisoned[r]) {
        ours_valid.extend(row_values(&ours, r));
        ref_valid.extend(row_values(&reference, r));
    }
    let skipped = padded.poisoned.iter().filter(|p| **p).count();
    let mut check = Check::values("padded_logits (unmasked)", &ours_valid, &ref_valid, tol);
    if skipped > 0 {
        check = check.with_note(format!(
            "{skipped} NaN reference row(s) checked below instead"
        ));
    }
    checks.push(check);
    checks.push(Check::tokens(
        "argmax(padded_logits)",
        &argmax_rows(&ours_valid, vocab),
        &argmax_rows(&ref_valid, vocab),
    ));
    // With `mamba_proj_bias`, transformers' in_proj bias at padded positions reaches the first
    // real positions through the convolution, so a padded row legitimately differs from the
    // prompt alone (the reference comparison above covers it); without it they must agree.
    if model.config().mamba_proj_bias {
        return Ok(checks);
    }
    for (r, prompt) in padded.prompts.iter().enumerate() {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, prompt.len()],
            ),
            &device,
        );
        let alone = to_vec(
            model
                .forward(ids, None, None, &ForwardOptions::default())?
                .logits,
        );
        let mut check = Check::values(
            format!("padded row {r} = alone"),
            &row_values(&ours, r),
            &alone,
            tol,
        );
        if padded.poisoned[r] {
            check = check.with_note(POISONED);
        }
        checks.push(check);
    }
    Ok(checks)
}

/// Runs the prompts through the engine's cache `chunk` tokens at a time, then feeds
/// `continuation` one token per step; returns the logits of the last prompt position and of
/// every step, `[batch · (steps + 1) · vocab]`.
fn cached_logits<B: EngineBackend>(
    engine: &Engine<B>,
    prompt: &HostTensor,
    continuation: &[Vec<i64>],
    chunk: usize,
) -> Result<Vec<f32>> {
    let (batch, seq) = (prompt.shape[0], prompt.shape[1]);
    let ids = prompt.i64();
    let mut cache = engine.new_cache(batch);
    let mut last = None;
    for begin in (0..seq).step_by(chunk.max(1)) {
        let end = (begin + chunk.max(1)).min(seq);
        let cols: Vec<i64> = ids
            .chunks_exact(seq)
            .flat_map(|r| r[begin..end].to_vec())
            .collect();
        last = Some(engine.forward(&cols, batch, None, &mut cache, Some(1))?);
    }
    let mut steps = vec![last.expect("non-empty prompt")];
    for j in 0..continuation.first().map_or(0, Vec::len) {
        let col: Vec<i64> = continuation.iter().map(|r| r[j]).collect();
        steps.push(engine.forward(&col, batch, None, &mut cache, Some(1))?);
    }
    Ok(to_vec(Tensor::cat(steps, 1)))
}

/// The model's plain forward with its cache: the prompts at once, then `continuation` one
/// token per step; the layout of [`cached_logits`].
fn model_cached_logits<B: JambaBackend>(
    model: &Jamba<B>,
    prompt: &HostTensor,
    continuation: &[Vec<i64>],
) -> Result<Vec<f32>> {
    let device = model.device();
    let batch = prompt.shape[0];
    let mut cache = model.new_cache(batch);
    let keep = ForwardOptions {
        logits_to_keep: Some(1),
        ..Default::default()
    };
    let mut steps = vec![
        model
            .forward(prompt.to_int::<B, 2>(&device), None, Some(&mut cache), &keep)?
            .logits,
    ];
    for j in 0..continuation.first().map_or(0, Vec::len) {
        let col: Vec<i64> = continuation.iter().map(|r| r[j]).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(col, [batch, 1]), &device);
        steps.push(model.forward(t, None, Some(&mut cache), &keep)?.logits);
    }
    Ok(to_vec(Tensor::cat(steps, 1)))
}

/// Inference checks: the engine's prefill-then-decode logits against `full_logits` (single
/// pass and chunked prefill with chunks of 1, 3 and 7 tokens) and against the model's plain
/// cached forward, greedy decoding against `generated`, and batched left-padded greedy decoding
/// against `padded_generated` and against each prompt alone.
pub fn decode_checks<B: EngineBackend>(engine: &Engine<B>, fixture: &Fixture) -> Result<Vec<Check>> {
    use crate::generation::{GenerationConfig, generate};
    let model = engine.model();
    let tol = fixture.tolerance(model.dtype());
    let vocab = model.config().vocab_size;
    let prompt = fixture.get("input_ids")?;
    let generated = fixture.get("generated")?;
    let full = fixture.get("full_logits")?;
    let (batch, seq, total) = (prompt.shape[0], prompt.shape[1], generated.shape[1]);
    let new = total - seq;
    let gen_ids = generated.i64();
    let continuation: Vec<Vec<i64>> = gen_ids
        .chunks_exact(total)
        .map(|r| r[seq..].to_vec())
        .collect();
    // transformers' last `new + 1` positions: the prompt's last token, then each fed token.
    let full_v = full.f32();
    let reference: Vec<f32> = (0..batch)
        .flat_map(|b| full_v[(b * total + seq - 1) * vocab..(b * total + total) * vocab].to_vec())
        .collect();
    let mut checks = Vec::new();
    let plain = model_cached_logits(model, prompt, &continuation)?;
    checks.push(Check::values(
        "model: cached decode vs full_logits",
        &plain,
        &reference,
        tol,
    ));
    for chunk in [seq, 1, 3, 7] {
        let ours = cached_logits(engine, prompt, &continuation, chunk)?;
        if chunk == seq {
            checks.push(Check::values(
                "engine: cached decode vs full_logits",
                &ours,
                &reference,
                tol,
            ));
            checks.push(
                Check::values("engine vs model (cached decode)", &ours, &plain, tol)
                    .with_note("the engine against the model's plain forward"),
            );
        } else {
            let name = format!("  prefill in chunks of {chunk}");
            checks.push(Check::values(name, &ours, &reference, tol));
        }
    }

    let greedy = GenerationConfig {
        max_new_tokens: new,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = prompt
        .i64()
        .chunks_exact(seq)
        .map(|r| r.iter().map(|&t| t as u32).collect())
        .collect();
    let out = generate(engine, &prompts, &greedy, |_, _| {})?;
    let ours: Vec<i64> = out.tokens.iter().flatten().map(|&t| t as i64).collect();
    checks.push(Check::tokens(
        "greedy decode vs generated",
        &ours,
        &continuation.concat(),
    ));

    if let Some(padded) = PaddedBatch::from_fixture(fixture)? {
        let out = generate(engine, &padded.prompts, &greedy, |_, _| {})?;
        let reference = fixture.get("padded_generated")?.i64();
        let width = reference.len() / padded.rows();
        for (r, tokens) in out.tokens.iter().enumerate() {
            let ours: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
            if !padded.poisoned[r] {
                checks.push(Check::tokens(
                    format!("padded greedy row {r} vs padded_generated"),
                    &ours,
                    &reference[(r + 1) * width - new..(r + 1) * width],
                ));
            }
            if model.config().mamba_proj_bias {
                continue; // see `padded_checks`
            }
            let alone = generate(engine, &padded.prompts[r..r + 1], &greedy, |_, _| {})?;
            let alone: Vec<i64> = alone.tokens[0].iter().map(|&t| t as i64).collect();
            let mut check = Check::tokens(format!("padded greedy row {r} = alone"), &ours, &alone);
            if padded.poisoned[r] {
                check = check.with_note(POISONED);
            }
            checks.push(check);
        }
    }
    Ok(checks)
}
