//! RMSNorm and the residual additions before it.

use burn::tensor::Tensor;

use crate::model::{RmsNorm, rms_norm};
use crate::ops::JambaBackend;

/// The engine's norms: [`RmsNorm`] of `[batch, seq, width]` activations, alone or after the
/// residual additions it follows. Each sum is rounded to the activations' dtype, as an
/// addition stores it.
pub trait NormOps: JambaBackend {
    /// Up to how many rows (tokens) a decoding step folds each norm into the launch after it:
    /// the mixer's input projections, the feed-forward block's first launch, the head
    /// ([`LinearOps::project_normed`](super::LinearOps::project_normed),
    /// [`FeedForwardOps::moe_normed`](super::FeedForwardOps::moe_normed),
    /// [`FeedForwardOps::mlp_normed`](super::FeedForwardOps::mlp_normed)). 0 (never) by
    /// default: a backend with no fused forms gains nothing from the folded data flow.
    const FOLD_ROWS: usize = 0;

    /// `norm(x)`.
    fn rms_norm(x: Tensor<Self, 3>, norm: &RmsNorm<Self>) -> Tensor<Self, 3> {
        rms_norm(x, norm.weight.val(), norm.eps)
    }

    /// `(x + update, norm(x + update))`: a residual connection and the norm after it.
    fn add_rms_norm(
        x: Tensor<Self, 3>,
        update: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        let sum = x + update;
        (sum.clone(), Self::rms_norm(sum, norm))
    }

    /// `(s, norm(s))` for `s = (x + first) + second`: a layer's input that still carries the
    /// previous layer's feed-forward output, plus the mixer's output.
    fn add2_rms_norm(
        x: Tensor<Self, 3>,
        first: Tensor<Self, 3>,
        second: Tensor<Self, 3>,
        norm: &RmsNorm<Self>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        Self::add_rms_norm(x + first, second, norm)
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::Tensor;
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::norm;

    use super::NormOps;
    use crate::cube::{Cube, prim, wrap};
    use crate::model::RmsNorm;

    /// One launch each, where the tensor-op norm takes eight and an addition one more.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> NormOps
        for Cube<R, F, I, BT>
    {
        const FOLD_ROWS: usize = jamba_kernels::gemv::NORMED_MAX_ROWS;

        fn rms_norm(x: Tensor<Self, 3>, n: &RmsNorm<Self>) -> Tensor<Self, 3> {
            let weight = n.weight.val();
            if weight.dtype() != x.dtype() {
                return crate::model::rms_norm(x, weight, n.eps);
            }
            wrap(norm::rms_norm(prim(x), prim(weight), n.eps))
        }

        fn add_rms_norm(
            x: Tensor<Self, 3>,
            update: Tensor<Self, 3>,
            n: &RmsNorm<Self>,
        ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
            let (dtype, weight) = (x.dtype(), n.weight.val());
            if weight.dtype() != dtype || update.dtype() != dtype || update.dims() != x.dims() {
                let sum = x + update;
                return (sum.clone(), Self::rms_norm(sum, n));
            }
            let (sum, normed) = norm::add_rms_norm(prim(x), prim(update), prim(weight), n.eps);
            (wrap(sum), wrap(normed))
        }

        fn add2_rms_norm(
            x: Tensor<Self, 3>,
            first: Tensor<Self, 3>,
            second: Tensor<Self, 3>,
            n: &RmsNorm<Self>,
        ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
            let (dtype, weight) = (x.dtype(), n.weight.val());
            if weight.dtype() != dtype
                || [&first, &second]
                    .iter()
                    .any(|t| t.dtype() != dtype || t.dims() != x.dims())
            {
                return Self::add_rms_norm(x + first, second, n);
            }
            let (sum, normed) =
                norm::add2_rms_norm(prim(x), prim(first), prim(second), prim(weight), n.eps);
            (wrap(sum), wrap(normed))
        }
    }
}
