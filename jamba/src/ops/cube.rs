//! CubeCL backends (cuda, wgpu): the scan and the convolution as the fused kernels of
//! `jamba-kernels`, and f32 products and attention kept off TF32 tensor cores.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor};
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use jamba_kernels::{conv, matmul, scan, scan_bwd};

use super::{ConvInput, ConvOutput, JambaBackend, ScanGrads, ScanInput, ScanOutput};
use crate::cube::{Cube, conv_tensors, prim, scan_tensors, wrap};

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> JambaBackend
    for Cube<R, F, I, BT>
{
    fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
        if !scan::supports_state(input.a.dims()[1]) {
            return super::selective_scan_tensor_ops(input);
        }
        let (y, state) = scan::selective_scan_fwd(scan_tensors(input));
        ScanOutput {
            y: wrap(y),
            state: wrap(state),
        }
    }

    fn fused_scan_backward(state: usize) -> bool {
        scan::supports_state(state)
    }

    fn selective_scan_backward(
        input: ScanInput<Self>,
        grad_y: Tensor<Self, 3>,
    ) -> Option<ScanGrads<Self>> {
        if !Self::fused_scan_backward(input.a.dims()[1]) {
            return None;
        }
        let [batch, seq, channels] = input.u.dims();
        let state = input.a.dims()[1];
        let dtype_of = |t: &Tensor<Self, 3>| t.dtype();
        let (du_t, dd_t, db_t, dc_t) = (
            dtype_of(&input.u),
            dtype_of(&input.delta),
            dtype_of(&input.b),
            dtype_of(&input.c),
        );
        let dz_t = input.z.as_ref().map(dtype_of);
        let da_t = input.a.dtype();
        let dskip_t = input.d.as_ref().map_or(DType::F32, |d| d.dtype());
        let dbias_t = input.delta_bias.as_ref().map_or(DType::F32, |d| d.dtype());
        let dh_t = input
            .initial_state
            .as_ref()
            .map_or(DType::F32, |d| d.dtype());
        let grad_y = prim(grad_y.cast(du_t));
        let g = scan_bwd::selective_scan_bwd(scan_tensors(input), grad_y, None);
        Some(ScanGrads {
            u: wrap::<Self, 3>(g.du).cast(du_t),
            delta: wrap::<Self, 3>(g.d_delta).cast(dd_t),
            a: wrap::<Self, 3>(g.da_part)
                .sum_dim(0)
                .reshape([channels, state])
                .cast(da_t),
            b: wrap::<Self, 4>(g.db_part)
                .sum_dim(1)
                .reshape([batch, seq, state])
                .cast(db_t),
            c: wrap::<Self, 4>(g.dc_part)
                .sum_dim(1)
                .reshape([batch, seq, state])
                .cast(dc_t),
            d: wrap::<Self, 2>(g.dd_part)
                .sum_dim(0)
                .reshape([channels])
                .cast(dskip_t),
            z: g.dz.zip(dz_t).map(|(dz, t)| wrap::<Self, 3>(dz).cast(t)),
            delta_bias: wrap::<Self, 2>(g.dbias_part)
                .sum_dim(0)
                .reshape([channels])
                .cast(dbias_t),
            initial_state: wrap::<Self, 3>(g.d_state).cast(dh_t),
        })
    }

    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        if input.weight.dims()[1] < 2 {
            return super::causal_conv1d_tensor_ops(input);
        }
        let (y, state) = conv::causal_conv1d(conv_tensors(input));
        ConvOutput {
            y: wrap(y),
            state: wrap(state),
        }
    }

    fn projection(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            return burn::tensor::module::linear(x, weight, bias);
        }
        let [batch, seq, inputs] = x.dims();
        let outputs = weight.dims()[1];
        let y: Tensor<Self, 2> = wrap(matmul::matmul_f32(
            prim(x.reshape([batch * seq, inputs])),
            prim(weight),
        ));
        let y = match bias {
            Some(b) => y + b.cast(DType::F32).unsqueeze(),
            None => y,
        };
        y.reshape([batch, seq, outputs])
    }

    fn scaled_dot_product_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        options: AttentionModuleOptions,
    ) -> Tensor<Self, 4> {
        if q.dtype() != DType::F32 {
            return burn::tensor::module::attention(q, k, v, mask, None, options);
        }
        // The unfused form with f32 products (cubek's f32 flash kernel on plain units failed
        // the fixtures on wgpu; its tensor-core ones round to TF32).
        attention_with(q, k, v, mask, options, |a, b| {
            wrap(matmul::matmul_f32(prim(a), prim(b)))
        })
    }
}

/// Scaled dot-product attention composed of two matrix products given by `matmul` (Burn's
/// unfused form, with the product chosen by the caller): `mask` is `true` where a key is
/// hidden; a causal mask aligns the last query with the last key; a row with every key hidden
/// gives zeros instead of NaN.
pub(crate) fn attention_with<B: burn::tensor::backend::Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    options: AttentionModuleOptions,
    matmul: impl Fn(Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [batch, heads, queries, dim] = q.dims();
    let keys = k.dims()[2];
    let device = q.device();
    let scale = options.scale.unwrap_or(1.0 / (dim as f64).sqrt());
    let mut scores = matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    if options.is_causal {
        let rows = Tensor::<B, 1, Int>::arange(0..queries as i64, &device)
            .add_scalar(keys as i64 - queries as i64)
            .reshape([queries, 1]);
        let cols = Tensor::<B, 1, Int>::arange(0..keys as i64, &device).reshape([1, keys]);
        let future = rows
            .lower(cols)
            .reshape([1, 1, queries, keys])
            .expand([batch, heads, queries, keys]);
        scores = scores.mask_fill(future, f32::NEG_INFINITY);
    }
    let max = scores.clone().max_dim(3).clamp_min(f32::MIN);
    let numerator = (scores - max).exp();
    let sum = numerator.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    matmul(numerator / sum, v)
}
