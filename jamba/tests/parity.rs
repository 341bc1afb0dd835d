//! The acceptance test: every fixture's reference outputs, on every backend compiled in.
//!
//! For each fixture, the model's plain forward: logits, every hidden state, every router logit,
//! the auxiliary loss, the padded batch's logits at unmasked positions, greedy argmax everywhere
//! (`parity_checks`); then the inference engine: cached prefill + decode against `full_logits`
//! and against the model's own cached forward (single pass and chunked prefill of 1, 3 and 7
//! tokens), greedy decoding against `generated`, and batched left-padded greedy decoding against
//! `padded_generated` and each prompt alone (`decode_checks`).

mod common;

use jamba::reference::{Check, Fixture, decode_checks, parity_checks};
use jamba::{Engine, EngineOptions, Jamba, LoadOptions};

fn report(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{:<45} rel {:.3e} max {:.3e} tol {:.1e} {}{}",
                c.name,
                c.rel_err,
                c.max_abs,
                c.tolerance,
                if c.passed() { "pass" } else { "FAIL" },
                c.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads fixture `name` on backend `B`, runs every check, and fails listing every row if any row
/// fails. `scale` widens the f32 tolerance for backends whose transcendental functions are less
/// accurate than the CPU's (see the wgpu module).
pub fn run_fixture<B: jamba::EngineBackend>(name: &str, device: &B::Device, scale: f64) {
    let dir = common::fixture(name);
    let model = Jamba::<B>::from_pretrained(&dir, device, &LoadOptions::default()).unwrap();
    let fixture = Fixture::open(&dir).unwrap();
    let mut checks = parity_checks(&model, &fixture).unwrap();
    let engine = Engine::new(model, EngineOptions::default());
    checks.extend(decode_checks(&engine, &fixture).unwrap());
    let model = engine.model();
    for c in &mut checks {
        c.tolerance *= scale;
    }
    let n_hidden = checks
        .iter()
        .filter(|c| c.name.starts_with("hidden."))
        .count();
    assert_eq!(
        n_hidden,
        model.layers.len() + 1,
        "every hidden state is compared"
    );
    println!("{name}:\n{}", report(&checks));
    assert!(
        checks.iter().all(Check::passed),
        "{name} failed:\n{}",
        report(&checks)
    );
}

macro_rules! fixture_tests {
    ($backend:ty, $device:expr, $scale:expr) => {
        #[test]
        fn tiny_jamba() {
            super::run_fixture::<$backend>("tiny-jamba", &$device, $scale);
        }
        #[test]
        fn tiny_jamba_v01_pattern() {
            super::run_fixture::<$backend>("tiny-jamba-v01-pattern", &$device, $scale);
        }
        #[test]
        fn tiny_mamba_dense_tied() {
            super::run_fixture::<$backend>("tiny-mamba-dense-tied", &$device, $scale);
        }
        #[test]
        fn tiny_jamba_bf16() {
            super::run_fixture::<$backend>("tiny-jamba-bf16", &$device, $scale);
        }
        #[test]
        fn tiny_jamba_long() {
            super::run_fixture::<$backend>("tiny-jamba-long", &$device, $scale);
        }
        /// Fixtures added later run too, without a code change.
        #[test]
        fn every_other_fixture_folder() {
            for dir in common_dirs() {
                let name = dir.file_name().unwrap().to_str().unwrap().to_string();
                if !crate::common::FIXTURES.contains(&name.as_str()) {
                    super::run_fixture::<$backend>(&name, &$device, $scale);
                }
            }
        }
        fn common_dirs() -> Vec<std::path::PathBuf> {
            crate::common::all_fixtures()
        }
    };
}

#[cfg(feature = "ndarray")]
mod ndarray {
    fixture_tests!(
        burn::backend::NdArray<f32>,
        burn::backend::ndarray::NdArrayDevice::Cpu,
        1.0
    );
}

#[cfg(feature = "flex")]
mod flex {
    fixture_tests!(burn::backend::Flex, Default::default(), 1.0);
}

/// The model as training runs it, on `Autodiff<Flex>` (the scan's tensor-op form, recorded for
/// the backward): the plain forward's checks on the fixtures of every layer kind and of the
/// longest prompts. (The engine's checks would only repeat the flex rows above more slowly.)
#[cfg(all(feature = "flex", feature = "autodiff"))]
mod autodiff_flex {
    fn run(name: &str) {
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        let dir = crate::common::fixture(name);
        let device = Default::default();
        let model = super::Jamba::<B>::from_pretrained(&dir, &device, &Default::default()).unwrap();
        let fixture = super::Fixture::open(&dir).unwrap();
        let checks = super::parity_checks(&model, &fixture).unwrap();
        println!("{name}:\n{}", super::report(&checks));
        assert!(checks.iter().all(super::Check::passed), "{name} failed:\n{}", super::report(&checks));
    }

    #[test]
    fn tiny_jamba() {
        run("tiny-jamba");
    }

    #[test]
    fn tiny_jamba_long() {
        run("tiny-jamba-long");
    }
}

/// wgpu on the WGSL path (`CubeBackend`, the engine's kernels), at the CPU's f32 tolerance.
/// WGSL allows `exp`/`log` an error of 3 + 2·|x| ULP where the CPU's libm is within 1 ULP, but
/// on Mesa's lavapipe the measured errors (≤ 1.1e-6 on every fixture) sit as far below the
/// bound as the CPU's, so no wider bound is needed.
#[cfg(feature = "wgpu")]
mod wgpu {
    fixture_tests!(jamba::backends::Wgpu, Default::default(), 1.0);
}

/// CUDA (run on a GPU machine; CI has none), at the CPU's tolerance: an f32 model's products
/// run in f32 (`JambaBackend::projection`, not TF32 tensor cores, which flip MoE routing at
/// near-ties).
#[cfg(feature = "cuda")]
mod cuda {
    fixture_tests!(jamba::backends::Cuda, Default::default(), 1.0);
}

/// Burn's default GPU types with Burn's `fusion` feature, `Fusion<CubeBackend<…>>`: the model's
/// scan and convolution handed to the inner backend's kernels, the engine on tensor ops fused
/// by Fusion. Two fixtures: one of every layer kind, and Jamba-v0.1's pattern.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
macro_rules! fusion_tests {
    ($backend:ty) => {
        #[test]
        fn tiny_jamba() {
            super::run_fixture::<$backend>("tiny-jamba", &Default::default(), 1.0);
        }
        #[test]
        fn tiny_jamba_v01_pattern() {
            super::run_fixture::<$backend>("tiny-jamba-v01-pattern", &Default::default(), 1.0);
        }
    };
}

#[cfg(feature = "wgpu")]
mod wgpu_fusion {
    fusion_tests!(burn::backend::Wgpu);
}

#[cfg(feature = "cuda")]
mod cuda_fusion {
    fusion_tests!(burn::backend::Cuda);
}

/// bf16 compute on the CPU backends that support it, against the bf16 fixture (see
/// `Fixture::tolerance` for the bound).
#[cfg(feature = "flex")]
#[test]
fn bf16_compute_on_flex() {
    use burn::tensor::DType;
    let dir = common::fixture("tiny-jamba-bf16");
    let device = Default::default();
    let options = LoadOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    let model = Jamba::<burn::backend::Flex>::from_pretrained(&dir, &device, &options).unwrap();
    let fixture = Fixture::open(&dir).unwrap();
    let checks = parity_checks(&model, &fixture).unwrap();
    let logits = checks.iter().find(|c| c.name == "logits").unwrap();
    println!("{}", report(&checks));
    assert!(logits.passed(), "{}", report(&checks));
}
