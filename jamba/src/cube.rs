//! The bridge between Burn tensors of a `CubeBackend` and the kernels of `jamba-kernels`, which
//! take and return `CubeTensor`s.

use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use jamba_kernels::{conv, scan};

use crate::ops::{ConvInput, ScanInput};

/// A CubeCL backend.
pub(crate) type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// The kernel's view of a float tensor.
pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// A kernel's output as a float tensor.
pub(crate) fn wrap<B: Backend, const D: usize>(t: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The kernel's view of a [`ScanInput`]: `u`'s dtype for the per-step inputs, f32 for the rest,
/// zeros for what is absent.
pub(crate) fn scan_tensors<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    input: ScanInput<Cube<R, F, I, BT>>,
) -> scan::ScanTensors<R> {
    let [batch, _, channels] = input.u.dims();
    let state_size = input.a.dims()[1];
    let device = input.u.device();
    let dtype = input.u.dtype();
    let same = |t: Tensor<Cube<R, F, I, BT>, 3>| prim(t.cast(dtype));
    let f32_1 = |t: Option<Tensor<Cube<R, F, I, BT>, 1>>| {
        prim(
            t.map(|t| t.cast(DType::F32))
                .unwrap_or_else(|| Tensor::zeros([channels], (&device, DType::F32))),
        )
    };
    let state = input
        .initial_state
        .map(|s| s.cast(DType::F32))
        .unwrap_or_else(|| Tensor::zeros([batch, channels, state_size], (&device, DType::F32)));
    scan::ScanTensors {
        u: prim(input.u),
        delta: same(input.delta),
        a: prim(input.a.cast(DType::F32)),
        b: same(input.b),
        c: same(input.c),
        d: f32_1(input.d),
        z: input.z.map(same),
        delta_bias: f32_1(input.delta_bias),
        state: prim(state),
        delta_softplus: input.delta_softplus,
    }
}

/// The kernel's view of a [`ConvInput`]: `x`'s dtype for the signal, the weight as it is (the
/// kernel reads the parameters in their own dtype and layout: no casts per forward), zeros for
/// what is absent.
pub(crate) fn conv_tensors<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    input: ConvInput<Cube<R, F, I, BT>>,
) -> conv::ConvTensors<R> {
    let [batch, _, channels] = input.x.dims();
    let k = input.weight.dims()[1];
    let device = input.x.device();
    let dtype = input.x.dtype();
    let prefix = input
        .prefix
        .map(|p| p.cast(dtype))
        .unwrap_or_else(|| Tensor::zeros([batch, k.max(2) - 1, channels], (&device, dtype)));
    let wdtype = input.weight.dtype();
    let bias = input
        .bias
        .map(|b| b.cast(wdtype))
        .unwrap_or_else(|| Tensor::zeros([channels], (&device, wdtype)));
    conv::ConvTensors {
        x: prim(input.x),
        prefix: prim(prefix),
        weight: prim(input.weight),
        bias: prim(bias),
        silu: input.silu,
    }
}

/// The device's compute client with a `'static` lifetime, made once per runtime and device and
/// kept for the program's life: a read's future borrows the client it was started from
/// (CubeCL 0.10's `read_one_tensor_async` takes `&self`), and a queued read must outlive the
/// call that started it.
pub(crate) fn static_client<R: CubeRuntime>(
    device: &R::Device,
) -> &'static burn_cubecl::cubecl::client::ComputeClient<R> {
    use std::any::{Any, TypeId};
    type Entry = (TypeId, String, &'static (dyn Any + Send + Sync));
    static CLIENTS: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    let (runtime, name) = (TypeId::of::<R>(), format!("{device:?}"));
    let mut clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(client) = clients
        .iter()
        .find(|(r, d, _)| *r == runtime && *d == name)
        .and_then(|(_, _, c)| c.downcast_ref())
    {
        return client;
    }
    let client: &'static burn_cubecl::cubecl::client::ComputeClient<R> =
        Box::leak(Box::new(R::client(device)));
    clients.push((runtime, name, client));
    client
}
