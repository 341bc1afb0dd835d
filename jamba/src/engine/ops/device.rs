//! What the engine asks of the device besides arithmetic: the greedy choice, reading token ids
//! back to the host, memory, and where the host issues work from.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::{JambaError, Result};

/// The engine's device operations.
pub trait DeviceOps: Backend {
    /// The index of each row's largest value, `[rows, width]` to `[rows]` (the first on ties,
    /// as PyTorch's `argmax` on the CPU). By default in two stages over blocks of about
    /// `√width` when the width is large: a one-stage reduction gives each row one unit, which
    /// walks a 65,536-word vocabulary one logit after another on a GPU.
    fn argmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 1, Int> {
        argmax_rows_tensor_ops(x)
    }

    /// Starts copying `ids` (token ids on the device, e.g. a decoding step's argmax) to the host
    /// and returns the read to wait on later ([`QueuedIds::wait`]), so that the host can queue
    /// more work meanwhile (greedy decoding one step ahead,
    /// [`GreedyPipeline`](crate::engine::GreedyPipeline)). By default it reads at once.
    fn queue_read_ids(ids: Tensor<Self, 1, Int>) -> QueuedIds {
        QueuedIds::ready(read_ids(ids.into_data()))
    }

    /// Bytes the backend's allocator holds on `device` now, where it reports them (CubeCL
    /// backends: the memory pools' reservation, which only grows between
    /// [`Backend::memory_cleanup`] calls, so it is the peak since the last cleanup).
    fn memory_reserved(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// Runs `f`, a forward pass, where this backend issues its work best. The CPU backends run
    /// it on a thread of rayon's pool, whose `join`s inside the host loops are then a
    /// lock-free push instead of a hand-off from outside the pool (~25 µs a call).
    fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }
}

/// [`DeviceOps::argmax_rows`] in tensor ops.
pub(crate) fn argmax_rows_tensor_ops<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1, Int> {
    let [rows, width] = x.dims();
    let block = (width >= 4096)
        .then(|| {
            let root = (width as f64).sqrt() as usize;
            (root / 2..=root * 2).find(|&c| c >= 32 && width.is_multiple_of(c))
        })
        .flatten();
    let Some(block) = block else {
        return x.argmax(1).reshape([rows]);
    };
    let blocks = width / block;
    let x = x.reshape([rows, blocks, block]);
    let within = x.clone().argmax(2); // [rows, blocks, 1]
    let maxima = x.gather(2, within.clone()).reshape([rows, blocks]);
    let best_block = maxima.argmax(1); // [rows, 1]: the first block holding the maximum
    let offset = within.reshape([rows, blocks]).gather(1, best_block.clone());
    (best_block * block as i64 + offset).reshape([rows])
}

/// A read of token ids from the device to the host, started by
/// [`DeviceOps::queue_read_ids`] and finished by [`wait`](Self::wait).
pub struct QueuedIds(Box<dyn FnOnce() -> Result<Vec<i64>> + Send>);

impl QueuedIds {
    /// A read that has already finished.
    pub fn ready(ids: Result<Vec<i64>>) -> Self {
        Self(Box::new(move || ids))
    }

    /// A read that finishes when `wait` runs (it blocks until the ids are on the host).
    pub fn pending(wait: impl FnOnce() -> Result<Vec<i64>> + Send + 'static) -> Self {
        Self(Box::new(wait))
    }

    /// Waits for the ids.
    pub fn wait(self) -> Result<Vec<i64>> {
        (self.0)()
    }
}

impl std::fmt::Debug for QueuedIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueuedIds")
    }
}

/// Token ids read from the device, as `i64`.
fn read_ids(data: TensorData) -> Result<Vec<i64>> {
    data.convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| JambaError::Input(format!("token ids read from the device: {e:?}")))
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::argmax;

    use super::{DeviceOps, QueuedIds, read_ids};
    use crate::cube::{Cube, prim, static_client};
    use crate::error::JambaError;

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> DeviceOps
        for Cube<R, F, I, BT>
    {
        /// Two launches (`argmax::argmax_rows`), where the composed form takes six.
        fn argmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 1, Int> {
            let [rows, width] = x.dims();
            if !argmax::supports(rows, width) {
                return super::argmax_rows_tensor_ops(x);
            }
            let int = <I as burn::tensor::Element>::dtype();
            Tensor::from_primitive(argmax::argmax_rows(prim(x), int))
        }

        /// The copy is enqueued behind the work already issued (on CUDA a pinned, asynchronous
        /// copy and a fence) and waited on in [`QueuedIds::wait`].
        fn queue_read_ids(ids: Tensor<Self, 1, Int>) -> QueuedIds {
            use burn_cubecl::cubecl::server::CopyDescriptor;
            let t = burn_cubecl::kernel::into_contiguous(ids.into_primitive());
            let (shape, dtype) = (t.meta.shape().clone(), t.dtype);
            let (strides, elem_size) = (t.meta.strides().clone(), t.elem_size());
            let client = static_client::<R>(&t.device);
            let descriptor =
                CopyDescriptor::new(t.handle.binding(), shape.clone(), strides, elem_size);
            let read = client.read_one_tensor_async(descriptor);
            QueuedIds::pending(move || {
                let bytes = burn_cubecl::cubecl::future::block_on(read).map_err(|e| {
                    JambaError::Input(format!("reading token ids from the device: {e}"))
                })?;
                read_ids(TensorData::from_bytes(bytes, shape, dtype))
            })
        }

        fn memory_reserved(device: &Self::Device) -> Option<u64> {
            R::client(device)
                .memory_usage()
                .ok()
                .map(|m| m.bytes_reserved)
        }
    }
}

/// The CPU backends: a forward pass on a thread of rayon's pool.
#[cfg(any(feature = "flex", feature = "ndarray"))]
macro_rules! in_rayon_pool {
    ($backend:ty) => {
        impl DeviceOps for $backend {
            fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
                rayon::scope(|_| f())
            }
        }
    };
}

#[cfg(feature = "flex")]
in_rayon_pool!(burn::backend::Flex);
#[cfg(feature = "ndarray")]
in_rayon_pool!(burn::backend::NdArray<f32>);
#[cfg(feature = "ndarray")]
in_rayon_pool!(burn::backend::NdArray<f64>);
