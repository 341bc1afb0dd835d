//! The CPU backends: the scan and the convolution as host loops over f32 ([`crate::host`]),
//! one pass over time with the state in registers, where the tensor-op forms materialise
//! `[seq, channels, state]` tensors. `NdArray<f64>` keeps the tensor-op forms, which compute
//! in its own precision.

#[cfg(any(feature = "flex", feature = "ndarray"))]
use super::{ConvInput, ConvOutput, JambaBackend, ScanInput, ScanOutput};

#[cfg(any(feature = "flex", feature = "ndarray"))]
macro_rules! host_loops {
    ($backend:ty) => {
        impl JambaBackend for $backend {
            fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
                crate::host::scan::selective_scan(input)
            }

            fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
                crate::host::conv::causal_conv1d(input)
            }
        }
    };
}

#[cfg(feature = "flex")]
host_loops!(burn::backend::Flex);

#[cfg(feature = "ndarray")]
host_loops!(burn::backend::NdArray<f32>);

#[cfg(feature = "ndarray")]
impl JambaBackend for burn::backend::NdArray<f64> {}
