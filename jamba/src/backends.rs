//! Backend aliases, and the backends this build was compiled with for programs that pick one
//! at run time.
//!
//! Library code stays generic over `B: Backend`; front ends (the `jamba` command, the
//! benchmarks) name a [`BackendKind`] and call [`with_backend!`](crate::with_backend) to
//! instantiate their generic function for it. [`Wgpu`] and [`Cuda`] are Burn's `CubeBackend`
//! itself, on which the inference engine runs its kernels; Burn's own `burn::backend::Wgpu` and
//! `Cuda` (with Burn's `fusion` feature, `Fusion<CubeBackend<…>>`) run the model too.

use std::str::FromStr;

use burn::tensor::DType;

/// A backend family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU backend: flex (or ndarray when built without `flex`).
    Cpu,
    /// wgpu (Vulkan, Metal, DX12; Mesa's software Vulkan on a headless Linux machine).
    Wgpu,
    /// CUDA.
    Cuda,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "ndarray" | "flex" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!("unknown backend `{other}` (cpu, wgpu, cuda)")),
        }
    }
}

impl BackendKind {
    /// The backends compiled into this build.
    pub fn compiled() -> Vec<Self> {
        let mut v = Vec::new();
        if cfg!(any(feature = "ndarray", feature = "flex")) {
            v.push(Self::Cpu);
        }
        if cfg!(feature = "wgpu") {
            v.push(Self::Wgpu);
        }
        if cfg!(feature = "cuda") {
            v.push(Self::Cuda);
        }
        v
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(format!("unknown dtype `{other}` (f32, bf16, f16)")),
    }
}

/// The CPU backend of this build: flex (the default; measured faster, see the README), or
/// ndarray when built without flex.
#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
/// The CPU backend of this build: flex (the default; measured faster, see the README), or
/// ndarray when built without flex.
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub type Cpu = burn::backend::NdArray<f32>;

/// wgpu (WGSL) as Burn's `CubeBackend`, with f32 floats.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_cubecl::CubeBackend<burn_cubecl::cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// CUDA as Burn's `CubeBackend`, with f32 floats.
#[cfg(feature = "cuda")]
pub type Cuda = burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Runs `$body` with the type `$b` bound to the backend `$kind` names and `$device` to its
/// default device; evaluates to a `jamba::Result` error if that backend was not compiled in.
///
/// ```
/// use jamba::backends::BackendKind;
/// fn name<B: burn::tensor::backend::Backend>(_: &B::Device) -> jamba::Result<String> {
///     Ok(B::name(&Default::default()))
/// }
/// let n = jamba::with_backend!(BackendKind::Cpu, |B, device| name::<B>(&device)).unwrap();
/// assert!(!n.is_empty());
/// ```
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
                type $b = $crate::backends::Wgpu;
                let $device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $b = $crate::backends::Cuda;
                let $device = Default::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err($crate::JambaError::Input(format!(
                "backend {other:?} is not compiled into this binary (rebuild with its cargo feature)"
            ))),
        }
    }};
}
