//! What the host pays to launch one kernel, by how the kernel takes its buffers: the probes
//! behind `jamba-bench launch`.
//!
//! A CubeCL `Tensor` argument carries its shape and strides in the launch's *dynamic*
//! metadata. On CUDA that part cannot travel as a kernel parameter: CubeCL 0.10 reserves a
//! pinned staging buffer and a device buffer from its memory pools and copies it over for every
//! launch (`cubecl-cuda`'s `launch_checked` → `create_with_data`). An `Array` argument carries
//! only its length, which travels with the scalars as a kernel parameter. The probes launch the
//! same trivial kernel (one cube of 32 units; eight buffers, seven read and one written) with
//! `Tensor` arguments and with `Array` arguments, with and without a fresh output buffer per
//! launch, so that the bench can time each way.

use jamba::burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;

/// Units of the probe's one cube (and elements of each buffer it touches).
pub const UNITS: usize = 32;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn probe_tensors_kernel<F: Float>(
    a: &CubeArg<F>,
    b: &CubeArg<F>,
    c: &CubeArg<F>,
    d: &CubeArg<F>,
    e: &CubeArg<F>,
    f: &CubeArg<F>,
    g: &CubeArg<F>,
    out: &mut CubeArg<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = UNIT_POS as usize;
    // Strides are read so that the kernel needs the metadata it is sent.
    let s = out.stride(0);
    out[i * s] = a[i * a.stride(0)]
        + b[i * b.stride(0)]
        + c[i * c.stride(0)]
        + d[i * d.stride(0)]
        + e[i * e.stride(0)]
        + f[i * f.stride(0)]
        + g[i * g.stride(0)];
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn probe_arrays_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    c: &Array<F>,
    d: &Array<F>,
    e: &Array<F>,
    f: &Array<F>,
    g: &Array<F>,
    out: &mut Array<F>,
    stride: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = UNIT_POS as usize * stride as usize;
    out[i] = a[i] + b[i] + c[i] + d[i] + e[i] + f[i] + g[i];
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn probe_strided_kernel<F: Float>(
    a: &jamba::kernels::Strided<F>,
    b: &jamba::kernels::Strided<F>,
    c: &jamba::kernels::Strided<F>,
    d: &jamba::kernels::Strided<F>,
    e: &jamba::kernels::Strided<F>,
    f: &jamba::kernels::Strided<F>,
    g: &jamba::kernels::Strided<F>,
    out: &mut jamba::kernels::Strided<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = UNIT_POS as usize;
    out.buf[i * out.stride(0usize)] = a.buf[i * a.stride(0usize)]
        + b.buf[i * b.stride(0usize)]
        + c.buf[i * c.stride(0usize)]
        + d.buf[i * d.stride(0usize)]
        + e.buf[i * e.stride(0usize)]
        + f.buf[i * f.stride(0usize)]
        + g.buf[i * g.stride(0usize)];
}

/// How a probe takes its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeArgs {
    /// `Tensor` arguments: shape and strides in the dynamic metadata.
    Tensors,
    /// `Array` arguments and the stride as a scalar.
    Arrays,
    /// [`jamba::kernels::Strided`] arguments: an `Array` and four scalar strides each.
    Strided,
}

/// Launches the probe once: `inputs` (seven contiguous `[UNITS]` tensors of one float dtype)
/// summed into `out`, or into a fresh buffer allocated for this launch with `fresh`. Returns
/// the buffer written.
///
/// # Panics
/// With fewer than `UNITS` elements in a buffer.
pub fn probe_launch<R: CubeRuntime>(
    inputs: &[CubeTensor<R>; 7],
    out: &CubeTensor<R>,
    args: ProbeArgs,
    fresh: bool,
) -> CubeTensor<R> {
    assert!(
        inputs
            .iter()
            .chain([out])
            .all(|t| t.meta.num_elements() >= UNITS),
        "probe buffers hold {UNITS} elements"
    );
    let out = if fresh {
        jamba::burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
            out.client.clone(),
            out.device.clone(),
            out.meta.shape().clone(),
            out.dtype,
        )
    } else {
        out.clone()
    };
    let client = out.client.clone();
    let dtype = out.dtype;
    let [a, b, c, d, e, f, g] = inputs.clone();
    // SAFETY: one cube of UNITS units; unit i reads element i of each input and writes element
    // i of `out`, all of which hold at least UNITS elements (asserted).
    unsafe {
        match args {
            ProbeArgs::Tensors => probe_tensors_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(UNITS as u32),
                a.into_tensor_arg(),
                b.into_tensor_arg(),
                c.into_tensor_arg(),
                d.into_tensor_arg(),
                e.into_tensor_arg(),
                f.into_tensor_arg(),
                g.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                dtype.into(),
            ),
            ProbeArgs::Arrays => probe_arrays_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(UNITS as u32),
                a.into_array_arg(),
                b.into_array_arg(),
                c.into_array_arg(),
                d.into_array_arg(),
                e.into_array_arg(),
                f.into_array_arg(),
                g.into_array_arg(),
                out.clone().into_array_arg(),
                1,
                dtype.into(),
            ),
            ProbeArgs::Strided => probe_strided_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(UNITS as u32),
                jamba::kernels::strided(a),
                jamba::kernels::strided(b),
                jamba::kernels::strided(c),
                jamba::kernels::strided(d),
                jamba::kernels::strided(e),
                jamba::kernels::strided(f),
                jamba::kernels::strided(g),
                jamba::kernels::strided(out.clone()),
                dtype.into(),
            ),
        }
    }
    out
}
