//! Products by a weight: the projections, the head, and the experts' batched products.

use burn::tensor::Tensor;

use super::NormOps;
use crate::model::RmsNorm;
use crate::ops::JambaBackend;

/// The engine's products. Weights are in Burn's `[in, out]` layout.
pub trait LinearOps: NormOps {
    /// `x [batch, seq, in] · weight (+ bias)`: the model's product
    /// ([`JambaBackend::projection`]) by default.
    fn project(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        <Self as JambaBackend>::projection(x, weight, bias)
    }

    /// `norm(x + pending) · weight (+ bias)` (`norm(x)` without `pending`): a projection of a
    /// norm's output, for up to [`NormOps::FOLD_ROWS`] rows where the backend folds the norm
    /// into the product.
    fn project_normed(
        x: &Tensor<Self, 3>,
        pending: Option<&Tensor<Self, 3>>,
        norm: &RmsNorm<Self>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        Self::project(normed(x, pending, norm), weight, bias)
    }

    /// [`project_normed`](Self::project_normed) of several bias-free weights of one input (an
    /// attention layer's `q_proj`, `k_proj` and `v_proj`).
    fn project_normed_many<const N: usize>(
        x: &Tensor<Self, 3>,
        pending: Option<&Tensor<Self, 3>>,
        norm: &RmsNorm<Self>,
        weights: [Tensor<Self, 2>; N],
    ) -> [Tensor<Self, 3>; N] {
        let x = normed(x, pending, norm);
        weights.map(|w| Self::project(x.clone(), w, None))
    }

    /// `x [batch, m, k] · w [batch, k, n]`: the experts' products of a prefill, every expert's
    /// tokens gathered into one block ([`FeedForwardOps`](super::FeedForwardOps)).
    fn project_experts(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
        x.matmul(w)
    }
}

/// `norm(x + pending)` through the backend's norms.
fn normed<B: NormOps>(
    x: &Tensor<B, 3>,
    pending: Option<&Tensor<B, 3>>,
    norm: &RmsNorm<B>,
) -> Tensor<B, 3> {
    match pending {
        Some(p) => B::add_rms_norm(x.clone(), p.clone(), norm).1,
        None => B::rms_norm(x.clone(), norm),
    }
}

/// The number of blocks of `inputs` for a split-k product of `rows × inputs → outputs`
/// (CubeCL products in half precision), or `None` where the output alone gives the GPU enough
/// tiles: at least 512 rows, at most 512 outputs, `inputs` at least 8 × `outputs` and a
/// multiple of 256 (the block size). (`x_proj` of a 2048-token prefill, 4096 inputs into 96
/// outputs, ran on 4 cubes at 4 TFLOP/s unsplit.)
#[cfg_attr(not(feature = "kernels"), allow(dead_code))]
fn split_k(rows: usize, inputs: usize, outputs: usize) -> Option<usize> {
    const BLOCK: usize = 256;
    (rows >= 512
        && outputs <= 512
        && inputs >= 8 * outputs
        && inputs.is_multiple_of(BLOCK)
        && inputs > BLOCK)
        .then_some(inputs / BLOCK)
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{DType, Tensor};
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::{gemv, matmul};

    use super::{LinearOps, normed, split_k};
    use crate::cube::{Cube, prim, wrap};
    use crate::model::RmsNorm;

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LinearOps
        for Cube<R, F, I, BT>
    {
        fn project(
            x: Tensor<Self, 3>,
            weight: Tensor<Self, 2>,
            bias: Option<Tensor<Self, 1>>,
        ) -> Tensor<Self, 3> {
            let [batch, seq, inputs] = x.dims();
            let outputs = weight.dims()[1];
            let rows = batch * seq;
            // A decoding step's few rows: the GEMV kernel streams the weight at bandwidth,
            // where Burn's matmul kernels (tiled for large products) ran at ~80 GB/s.
            if rows <= gemv::MAX_ROWS
                && weight.dtype() == x.dtype()
                && bias.as_ref().is_none_or(|b| b.dtype() == x.dtype())
            {
                let y: Tensor<Self, 2> = wrap(gemv::gemv(
                    prim(x.reshape([rows, inputs])),
                    prim(weight),
                    bias.map(prim),
                ));
                return y.reshape([batch, seq, outputs]);
            }
            let half = x.dtype() != DType::F32 && weight.dtype() == x.dtype();
            // A long inner dimension into few outputs: k cut into blocks run as one batched
            // product, the block sums added in f32 and rounded once more.
            if let (true, None, Some(splits)) = (half, &bias, split_k(rows, inputs, outputs)) {
                let dtype = x.dtype();
                let xk = x.reshape([rows, splits, inputs / splits]).swap_dims(0, 1);
                let wk = weight.reshape([splits, inputs / splits, outputs]);
                let y = xk.matmul(wk).cast(DType::F32).sum_dim(0).cast(dtype);
                return y.reshape([batch, seq, outputs]);
            }
            // Many rows in half precision: cubek's TMA kernel, a fixed choice as fast as Burn's
            // autotuned one on the H200's prefill products, without minutes of tuning.
            if half
                && let Some(y) =
                    matmul::matmul_tma(prim(x.clone().reshape([rows, inputs])), prim(weight.clone()))
            {
                let y: Tensor<Self, 2> = wrap(y);
                let y = match bias {
                    Some(b) => {
                        let dtype = y.dtype();
                        y + b.cast(dtype).unsqueeze()
                    }
                    None => y,
                };
                return y.reshape([batch, seq, outputs]);
            }
            <Self as crate::ops::JambaBackend>::projection(x, weight, bias)
        }

        fn project_normed(
            x: &Tensor<Self, 3>,
            pending: Option<&Tensor<Self, 3>>,
            norm: &RmsNorm<Self>,
            weight: Tensor<Self, 2>,
            bias: Option<Tensor<Self, 1>>,
        ) -> Tensor<Self, 3> {
            let [batch, seq, inputs] = x.dims();
            let (rows, dtype) = (batch * seq, x.dtype());
            let [k, outputs] = weight.dims();
            let norm_weight = norm.weight.val();
            let fits = rows <= gemv::NORMED_MAX_ROWS
                && k == inputs
                && weight.dtype() == dtype
                && norm_weight.dtype() == dtype
                && bias
                    .as_ref()
                    .is_none_or(|b| b.dtype() == dtype && b.dims() == [outputs])
                && pending.is_none_or(|p| p.dtype() == dtype && p.dims() == x.dims());
            if !fits {
                return Self::project(normed(x, pending, norm), weight, bias);
            }
            let flat = |t: &Tensor<Self, 3>| prim(t.clone().reshape([rows, inputs]));
            let y: Tensor<Self, 2> = wrap(gemv::gemv_normed(
                flat(x),
                gemv::PreNorm {
                    update: pending.map(flat),
                    weight: prim(norm_weight),
                    eps: norm.eps,
                },
                prim(weight),
                bias.map(prim),
            ));
            y.reshape([batch, seq, outputs])
        }

        fn project_normed_many<const N: usize>(
            x: &Tensor<Self, 3>,
            pending: Option<&Tensor<Self, 3>>,
            norm: &RmsNorm<Self>,
            weights: [Tensor<Self, 2>; N],
        ) -> [Tensor<Self, 3>; N] {
            let [batch, seq, inputs] = x.dims();
            let (rows, dtype) = (batch * seq, x.dtype());
            let norm_weight = norm.weight.val();
            let fits = rows <= gemv::NORMED_MAX_ROWS
                && (1..=3).contains(&N)
                && weights
                    .iter()
                    .all(|w| w.dims()[0] == inputs && w.dtype() == dtype)
                && norm_weight.dtype() == dtype
                && pending.is_none_or(|p| p.dtype() == dtype && p.dims() == x.dims());
            let flat = |t: &Tensor<Self, 3>| prim(t.clone().reshape([rows, inputs]));
            let ys = fits
                .then(|| {
                    gemv::gemv_normed_many(
                        flat(x),
                        gemv::PreNorm {
                            update: pending.map(flat),
                            weight: prim(norm_weight),
                            eps: norm.eps,
                        },
                        weights.iter().cloned().map(prim).collect(),
                    )
                })
                .flatten();
            match ys {
                Some(ys) => {
                    let mut ys = ys.into_iter().map(|y| {
                        let y: Tensor<Self, 2> = wrap(y);
                        let outputs = y.dims()[1];
                        y.reshape([batch, seq, outputs])
                    });
                    std::array::from_fn(|_| ys.next().expect("one output per weight"))
                }
                None => weights.map(|w| Self::project_normed(x, pending, norm, w, None)),
            }
        }

        fn project_experts(x: Tensor<Self, 3>, w: Tensor<Self, 3>) -> Tensor<Self, 3> {
            if let Some(y) = matmul::matmul_tma(prim(x.clone()), prim(w.clone())) {
                return wrap(y);
            }
            if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
                return x.matmul(w);
            }
            wrap(matmul::matmul_f32(prim(x), prim(w)))
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::tensor::Tensor;

    use super::LinearOps;

    /// A decoding step's few rows through the host GEMV ([`crate::host::gemv`]).
    impl LinearOps for Flex {
        fn project(
            x: Tensor<Self, 3>,
            weight: Tensor<Self, 2>,
            bias: Option<Tensor<Self, 1>>,
        ) -> Tensor<Self, 3> {
            crate::host::gemv::linear(&x, &weight, bias.as_ref())
                .unwrap_or_else(|| burn::tensor::module::linear(x, weight, bias))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_k_cuts_long_inner_dimensions_only() {
        // x_proj of a 2048-token prefill, 4096 inputs → 96 outputs: 16 blocks of 256.
        assert_eq!(super::split_k(2048, 4096, 96), Some(16));
        // in_proj (1024 → 8192) tiles its output well: not split.
        assert_eq!(super::split_k(2048, 1024, 8192), None);
        // A decoding step's rows are the GEMV's.
        assert_eq!(super::split_k(16, 4096, 96), None);
    }
}
