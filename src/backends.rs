//! The backends compiled into this binary, chosen at run time.

use burn::tensor::DType;
use clap::ValueEnum;

/// A compiled-in backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU backend (ndarray, or flex when built with `--features flex` only).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12; Mesa's software Vulkan on a headless Linux machine).
    Wgpu,
    /// CUDA.
    Cuda,
}

/// A floating-point dtype for weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

#[cfg(feature = "ndarray")]
pub type Cpu = burn::backend::NdArray<f32>;
#[cfg(all(feature = "flex", not(feature = "ndarray")))]
pub type Cpu = burn::backend::Flex;

/// Calls `$body` with `B` bound to the backend `$kind` names and `device` to its default device,
/// or returns an error if that backend was not compiled in.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, |$b:ident, $device:ident| $body:expr) => {{
        use $crate::backends::BackendKind;
        match $kind {
            #[cfg(any(feature = "ndarray", feature = "flex"))]
            BackendKind::Cpu => {
                type $b = $crate::backends::Cpu;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                type $b = burn::backend::Wgpu;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $b = burn::backend::Cuda;
                let $device = Default::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err(jamba::JambaError::Input(format!(
                "backend {other:?} is not compiled into this binary (rebuild with --features {})",
                format!("{other:?}").to_lowercase()
            ))),
        }
    }};
}
