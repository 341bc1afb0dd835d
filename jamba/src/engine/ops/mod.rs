//! The engine's operations, a trait per concept, each method with a tensor-op default that
//! the backends with faster forms override: [`NormOps`], [`LinearOps`], [`MambaOps`],
//! [`FeedForwardOps`], [`AttentionOps`], [`DeviceOps`]. [`EngineBackend`] is all of them.
//!
//! Every method returns its result: an implementation whose kernel does not take a shape or
//! dtype falls back to the default form itself, so the engine's code reads straight through.
//! CubeCL backends (cuda, wgpu) implement them with the kernels of `jamba-kernels`; flex with
//! host loops for a decoding step's products and experts; every other backend (ndarray,
//! `Autodiff<B>`, `Fusion<B>`) with the defaults. A new backend needs an empty `impl` of each
//! trait (or overrides of what it does better).

mod attention;
mod device;
mod feed_forward;
mod linear;
mod mamba;
mod norm;

pub use attention::AttentionOps;
pub use device::{DeviceOps, QueuedIds};
pub use feed_forward::{FeedForwardOps, grouped_experts};
pub use linear::LinearOps;
pub use mamba::{MambaOps, ScanParams};
pub use norm::NormOps;


/// A backend the [`Engine`](super::Engine) runs on: every concept trait of the engine.
/// Implemented for every type that implements them.
pub trait EngineBackend:
    NormOps + LinearOps + MambaOps + FeedForwardOps + AttentionOps + DeviceOps
{
}

impl<B> EngineBackend for B where
    B: NormOps + LinearOps + MambaOps + FeedForwardOps + AttentionOps + DeviceOps
{
}

/// The tensor-op defaults of the concept traits given.
#[cfg(any(feature = "flex", feature = "ndarray"))]
macro_rules! defaults {
    ($backend:ty: $($op:ident),*) => {
        $(impl $op for $backend {})*
    };
}

#[cfg(feature = "flex")]
defaults!(burn::backend::Flex: NormOps, MambaOps, AttentionOps);
#[cfg(feature = "ndarray")]
defaults!(burn::backend::NdArray<f32>: NormOps, LinearOps, MambaOps, FeedForwardOps, AttentionOps);
#[cfg(feature = "ndarray")]
defaults!(burn::backend::NdArray<f64>: NormOps, LinearOps, MambaOps, FeedForwardOps, AttentionOps);

#[cfg(feature = "autodiff")]
mod autodiff {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;

    use super::*;
    use crate::ops::JambaBackend;

    /// Inference on a differentiable model runs the tensor-op forms.
    impl<B: JambaBackend, C: CheckpointStrategy> NormOps for Autodiff<B, C> {}
    impl<B: JambaBackend, C: CheckpointStrategy> LinearOps for Autodiff<B, C> {}
    impl<B: JambaBackend, C: CheckpointStrategy> MambaOps for Autodiff<B, C> {}
    impl<B: JambaBackend, C: CheckpointStrategy> FeedForwardOps for Autodiff<B, C> {}
    impl<B: JambaBackend, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {}
    impl<B: JambaBackend + DeviceOps, C: CheckpointStrategy> DeviceOps for Autodiff<B, C> {
        fn memory_reserved(device: &Self::Device) -> Option<u64> {
            B::memory_reserved(device)
        }
    }
}

#[cfg(feature = "fusion")]
mod fusion {
    use burn_fusion::{Fusion, FusionBackend};

    use super::*;
    use crate::ops::JambaBackend;

    /// Burn's default GPU types run the tensor-op forms, fused by Fusion where it can; the
    /// engine's kernels are for the plain `CubeBackend` ([`crate::backends`]).
    impl<B: FusionBackend + JambaBackend> NormOps for Fusion<B> {}
    impl<B: FusionBackend + JambaBackend> LinearOps for Fusion<B> {}
    impl<B: FusionBackend + JambaBackend> MambaOps for Fusion<B> {}
    impl<B: FusionBackend + JambaBackend> FeedForwardOps for Fusion<B> {}
    impl<B: FusionBackend + JambaBackend> AttentionOps for Fusion<B> {}
    impl<B: FusionBackend + JambaBackend + DeviceOps> DeviceOps for Fusion<B> {
        fn memory_reserved(device: &Self::Device) -> Option<u64> {
            B::memory_reserved(device)
        }
    }
}
