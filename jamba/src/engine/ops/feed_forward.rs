//! The feed-forward blocks: the mixture of experts (routing and experts) and the dense MLP,
//! which runs on the same expert kernels.

use burn::tensor::{DType, Int, Tensor, activation::silu, activation::softmax};

use super::LinearOps;
use crate::model::{Experts, Mlp, RmsNorm, SparseMoe};

/// The engine's feed-forward operations. Tokens are rows, `[tokens, hidden]`.
pub trait FeedForwardOps: LinearOps {
    /// Whether the experts of many tokens run as three batched products (every expert's
    /// tokens gathered into one `[experts, capacity, ·]` block, padded to the busiest expert's
    /// count) rather than three products per active expert on exactly its tokens. A GPU wants
    /// the batch: one product per expert gives it a few dozen tiles at a time.
    const BATCHED_EXPERTS: bool = false;

    /// The router's softmax (f32) and top-k: each token's `top_k` routing weights
    /// (probabilities rounded to the logits' dtype, not renormalised) and their experts, both
    /// `[tokens · top_k]` in slot order (largest first).
    fn route(router_logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 1>, Tensor<Self, 1, Int>) {
        route_tensor_ops(router_logits, top_k)
    }

    /// The mixture of `experts` of the tokens `x` given their router logits: the grouped form
    /// by default ([`grouped_experts`]).
    fn moe_experts(
        x: Tensor<Self, 2>,
        router_logits: Tensor<Self, 2>,
        experts: &Experts<Self>,
        top_k: usize,
    ) -> Tensor<Self, 2> {
        grouped_experts(x, router_logits, experts, top_k)
    }

    /// A MoE block with the residual connection and norm before it, for up to
    /// [`NormOps::FOLD_ROWS`](super::NormOps::FOLD_ROWS) tokens: `s = (x + first) + second`,
    /// then the block on `norm(s)`. Returns `s`, the block's output and the router logits.
    fn moe_normed(
        x: Tensor<Self, 2>,
        first: Option<Tensor<Self, 2>>,
        second: Tensor<Self, 2>,
        norm: &RmsNorm<Self>,
        moe: &SparseMoe<Self>,
    ) -> [Tensor<Self, 2>; 3] {
        let (residual, normed) = add_norm::<Self>(x, first, second, norm);
        let logits = project2::<Self>(normed.clone(), &moe.router);
        let y = Self::moe_experts(normed, logits.clone(), &moe.experts, moe.top_k);
        [residual, y, logits]
    }

    /// `silu(gate) · up` of two tensors of one shape.
    fn silu_mul<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        silu(gate) * up
    }

    /// A dense SwiGLU MLP of the rows of `x`.
    fn mlp(x: Tensor<Self, 2>, mlp: &Mlp<Self>) -> Tensor<Self, 2> {
        mlp_tensor_ops(x, mlp)
    }

    /// [`mlp`](Self::mlp) with the residual connection and norm before it, as
    /// [`moe_normed`](Self::moe_normed). Returns `s` and the MLP's output.
    fn mlp_normed(
        x: Tensor<Self, 2>,
        first: Option<Tensor<Self, 2>>,
        second: Tensor<Self, 2>,
        norm: &RmsNorm<Self>,
        mlp: &Mlp<Self>,
    ) -> [Tensor<Self, 2>; 2] {
        let (residual, normed) = add_norm::<Self>(x, first, second, norm);
        [residual, Self::mlp(normed, mlp)]
    }
}

/// `linear(x)` of rows through the engine's product.
fn project2<B: LinearOps>(x: Tensor<B, 2>, layer: &burn::nn::Linear<B>) -> Tensor<B, 2> {
    let [rows, inputs] = x.dims();
    let outputs = layer.weight.dims()[1];
    let bias = layer.bias.as_ref().map(|b| b.val());
    B::project(x.reshape([1, rows, inputs]), layer.weight.val(), bias).reshape([rows, outputs])
}

/// `(s, norm(s))` of rows, `s = (x + first) + second`.
fn add_norm<B: LinearOps>(
    x: Tensor<B, 2>,
    first: Option<Tensor<B, 2>>,
    second: Tensor<B, 2>,
    norm: &RmsNorm<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [rows, hidden] = x.dims();
    let r3 = |t: Tensor<B, 2>| t.reshape([1, rows, hidden]);
    let (s, normed) = match first {
        Some(first) => B::add2_rms_norm(r3(x), r3(first), r3(second), norm),
        None => B::add_rms_norm(r3(x), r3(second), norm),
    };
    (s.reshape([rows, hidden]), normed.reshape([rows, hidden]))
}

/// The mixture of experts of many tokens: the routing read back to the host once, the
/// (token, slot) pairs gathered in expert order, each expert run on its block (or, where
/// [`FeedForwardOps::BATCHED_EXPERTS`], every expert at once on blocks padded to one size),
/// the results gathered back and weighted. Launches do not grow with the active experts beyond
/// the experts' own products.
pub fn grouped_experts<B: FeedForwardOps>(
    x: Tensor<B, 2>,
    router_logits: Tensor<B, 2>,
    experts: &Experts<B>,
    top_k: usize,
) -> Tensor<B, 2> {
    let [tokens, hidden] = x.dims();
    let slots = tokens * top_k;
    let (weights, selected) = B::route(router_logits, top_k);
    let selected = crate::model::host_ids(selected);
    let mut order: Vec<usize> = (0..slots).collect();
    order.sort_by_key(|&slot| selected[slot]);
    let mut counts = vec![0usize; experts.len()];
    for &e in &selected {
        counts[e as usize] += 1;
    }
    let device = x.device();
    let upload = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<B, 1, Int>::from_data(burn::tensor::TensorData::new(v, [n]), &device)
    };
    let per_slot = if B::BATCHED_EXPERTS {
        // Expert e's rows are block e of a [experts, capacity, hidden] gather (its tokens in
        // slot order, then copies of token 0 whose outputs nobody reads).
        let capacity = counts.iter().copied().max().unwrap_or(0).next_multiple_of(16);
        let n = experts.len();
        let mut rows = vec![0i64; n * capacity];
        let mut back = vec![0i64; slots];
        let mut sorted = order.iter();
        for (e, &count) in counts.iter().enumerate() {
            for j in 0..count {
                let slot = *sorted.next().expect("the counts sum to the slots");
                rows[e * capacity + j] = (slot / top_k) as i64;
                back[slot] = (e * capacity + j) as i64;
            }
        }
        let xs = x.select(0, upload(rows)).reshape([n, capacity, hidden]);
        let gate = B::project_experts(xs.clone(), experts.gate_proj.val());
        let up = B::project_experts(xs, experts.up_proj.val());
        let out = B::project_experts(B::silu_mul(gate, up), experts.down_proj.val());
        out.reshape([n * capacity, hidden]).select(0, upload(back))
    } else {
        let mut back = vec![0i64; slots];
        for (position, &slot) in order.iter().enumerate() {
            back[slot] = position as i64;
        }
        let sorted = x.select(0, upload(order.iter().map(|&s| (s / top_k) as i64).collect()));
        let mut outputs = Vec::new();
        let mut start = 0;
        for (e, &count) in counts.iter().enumerate() {
            if count > 0 {
                let block = sorted.clone().slice([start..start + count]);
                let [gate, up, down] = experts.weights(e);
                let block = block.reshape([1, count, hidden]);
                let act = B::silu_mul(
                    B::project(block.clone(), gate, None),
                    B::project(block, up, None),
                );
                outputs.push(B::project(act, down, None).reshape([count, hidden]));
            }
            start += count;
        }
        Tensor::cat(outputs, 0).select(0, upload(back))
    };
    (per_slot.reshape([tokens, top_k, hidden]) * weights.reshape([tokens, top_k, 1])).sum_dim(1)
        .reshape([tokens, hidden])
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{Int, Tensor};
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::{activation, mlp, moe};

    use super::{FeedForwardOps, add_norm, grouped_experts};
    use crate::cube::{Cube, prim, wrap};
    use crate::model::{Experts, Mlp, RmsNorm, SparseMoe};

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FeedForwardOps
        for Cube<R, F, I, BT>
    {
        const BATCHED_EXPERTS: bool = true;

        /// One launch (`moe::route`): Burn's CubeCL `topk` reads the probabilities back to
        /// the host and sorts them there.
        fn route(router_logits: Tensor<Self, 2>, top_k: usize) -> (Tensor<Self, 1>, Tensor<Self, 1, Int>) {
            let experts = router_logits.dims()[1];
            if !(1..=experts).contains(&top_k) {
                return super::route_tensor_ops(router_logits, top_k);
            }
            let (weights, experts) = moe::route(prim(router_logits), top_k);
            (wrap(weights), Tensor::from_primitive(experts))
        }

        /// Up to `moe::MAX_SLOTS` (token, slot) pairs on the device with no read back to the
        /// host: five launches (three in the vector form), where the grouped form takes ~40
        /// and a synchronisation.
        fn moe_experts(
            x: Tensor<Self, 2>,
            router_logits: Tensor<Self, 2>,
            experts: &Experts<Self>,
            top_k: usize,
        ) -> Tensor<Self, 2> {
            let [tokens, _] = x.dims();
            let n = router_logits.dims()[1];
            let dtype = x.dtype();
            let [gate, up, down] = [
                experts.gate_proj.val(),
                experts.up_proj.val(),
                experts.down_proj.val(),
            ];
            let same = [&gate, &up, &down].iter().all(|t| t.dtype() == dtype)
                && router_logits.dtype() == dtype;
            if !same
                || tokens * top_k > moe::MAX_SLOTS
                || top_k > moe::MAX_TOP_K.min(n)
                || top_k == 0
            {
                return grouped_experts(x, router_logits, experts, top_k);
            }
            wrap(moe::routed_experts(
                prim(x),
                prim(router_logits),
                moe::ExpertWeights {
                    gate: prim(gate),
                    up: prim(up),
                    down: prim(down),
                },
                top_k,
            ))
        }

        /// The sums, the norm, the router's product and the routing in one launch ahead of
        /// the experts' (`moe::routed_experts_normed`), where the separate form takes seven.
        fn moe_normed(
            x: Tensor<Self, 2>,
            first: Option<Tensor<Self, 2>>,
            second: Tensor<Self, 2>,
            norm: &RmsNorm<Self>,
            block: &SparseMoe<Self>,
        ) -> [Tensor<Self, 2>; 3] {
            let [tokens, hidden] = x.dims();
            let router = block.router.weight.val();
            let [_, n] = router.dims();
            let e = &block.experts;
            let [gate, up, down] = [e.gate_proj.val(), e.up_proj.val(), e.down_proj.val()];
            let inner = gate.dims()[2];
            let dtype = x.dtype();
            let norm_weight = norm.weight.val();
            let fits = block.router.bias.is_none()
                && [&gate, &up, &down].iter().all(|t| t.dtype() == dtype)
                && router.dtype() == dtype
                && norm_weight.dtype() == dtype
                && first
                    .iter()
                    .chain([&second])
                    .all(|t| t.dtype() == dtype && t.dims() == [tokens, hidden])
                && tokens > 0
                && moe::supports_normed_routing(tokens, hidden, n, block.top_k)
                && router.dims() == [hidden, n]
                && norm_weight.dims() == [hidden]
                && gate.dims() == [n, hidden, inner]
                && up.dims() == [n, hidden, inner]
                && down.dims() == [n, inner, hidden];
            if !fits {
                let (residual, normed) = add_norm::<Self>(x, first, second, norm);
                let logits = super::project2::<Self>(normed.clone(), &block.router);
                let y = Self::moe_experts(normed, logits.clone(), e, block.top_k);
                return [residual, y, logits];
            }
            let out = moe::routed_experts_normed(
                moe::NormedRouting {
                    sum: moe::ResidualNorm {
                        x: prim(x),
                        first: first.map(prim),
                        second: prim(second),
                        norm: prim(norm_weight),
                        eps: norm.eps,
                    },
                    router: prim(router),
                },
                moe::ExpertWeights {
                    gate: prim(gate),
                    up: prim(up),
                    down: prim(down),
                },
                block.top_k,
            );
            [wrap(out.residual), wrap(out.y), wrap(out.logits)]
        }

        /// One launch (`activation::silu_mul`), where Burn's `silu` of a half-precision tensor
        /// and the product are nine.
        fn silu_mul<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
            match activation::silu_mul(prim(gate.clone()), prim(up.clone())) {
                Some(out) => wrap(out),
                None => burn::tensor::activation::silu(gate) * up,
            }
        }

        /// Up to `moe::MAX_SLOTS` rows on the expert kernels: four launches (two in the vector
        /// form) where the separate operations take thirteen.
        fn mlp(x: Tensor<Self, 2>, block: &Mlp<Self>) -> Tensor<Self, 2> {
            let [rows, hidden] = x.dims();
            let [gate, up, down] = weights(block);
            let inner = gate.dims()[1];
            let dtype = x.dtype();
            let fits = biases_free(block)
                && rows <= moe::MAX_SLOTS
                && [&gate, &up, &down].iter().all(|t| t.dtype() == dtype)
                && gate.dims() == [hidden, inner]
                && up.dims() == [hidden, inner]
                && down.dims() == [inner, hidden];
            if !fits {
                return super::mlp_tensor_ops(x, block);
            }
            wrap(mlp::swiglu(prim(x), prim(gate), prim(up), prim(down)))
        }

        /// The sums and the norm folded into the MLP's gate/up launch (`mlp::swiglu_normed`):
        /// two launches where the separate form takes three.
        fn mlp_normed(
            x: Tensor<Self, 2>,
            first: Option<Tensor<Self, 2>>,
            second: Tensor<Self, 2>,
            norm: &RmsNorm<Self>,
            block: &Mlp<Self>,
        ) -> [Tensor<Self, 2>; 2] {
            let [rows, hidden] = x.dims();
            let [gate, up, down] = weights(block);
            let inner = gate.dims()[1];
            let dtype = x.dtype();
            let norm_weight = norm.weight.val();
            let fits = biases_free(block)
                && rows > 0
                && rows <= jamba_kernels::gemv::NORMED_MAX_ROWS
                && norm_weight.dims() == [hidden]
                && gate.dims() == [hidden, inner]
                && up.dims() == [hidden, inner]
                && down.dims() == [inner, hidden]
                && [&gate, &up, &down].iter().all(|t| t.dtype() == dtype)
                && norm_weight.dtype() == dtype
                && first
                    .iter()
                    .chain([&second])
                    .all(|t| t.dtype() == dtype && t.dims() == [rows, hidden]);
            let fused = fits
                .then(|| {
                    mlp::swiglu_normed(
                        moe::ResidualNorm {
                            x: prim(x.clone()),
                            first: first.clone().map(prim),
                            second: prim(second.clone()),
                            norm: prim(norm_weight),
                            eps: norm.eps,
                        },
                        prim(gate),
                        prim(up),
                        prim(down),
                    )
                })
                .flatten();
            match fused {
                Some((residual, y)) => [wrap(residual), wrap(y)],
                None => {
                    let (residual, normed) = add_norm::<Self>(x, first, second, norm);
                    [residual, Self::mlp(normed, block)]
                }
            }
        }
    }

    fn weights<B: burn::tensor::backend::Backend>(m: &Mlp<B>) -> [Tensor<B, 2>; 3] {
        [
            m.gate_proj.weight.val(),
            m.up_proj.weight.val(),
            m.down_proj.weight.val(),
        ]
    }

    fn biases_free<B: burn::tensor::backend::Backend>(m: &Mlp<B>) -> bool {
        [&m.gate_proj, &m.up_proj, &m.down_proj]
            .iter()
            .all(|l| l.bias.is_none())
    }
}

/// [`FeedForwardOps::route`] in tensor ops.
fn route_tensor_ops<B: FeedForwardOps>(router_logits: Tensor<B, 2>, top_k: usize) -> (Tensor<B, 1>, Tensor<B, 1, Int>) {
    let [tokens, _] = router_logits.dims();
    let dtype = router_logits.dtype();
    let probs = softmax(router_logits.cast(DType::F32), 1);
    let (weights, experts) = probs.topk_with_indices(top_k, 1);
    let slots = tokens * top_k;
    (weights.cast(dtype).reshape([slots]), experts.reshape([slots]))
}

/// [`FeedForwardOps::mlp`] as separate operations.
fn mlp_tensor_ops<B: FeedForwardOps>(x: Tensor<B, 2>, mlp: &Mlp<B>) -> Tensor<B, 2> {
    let gate = project2::<B>(x.clone(), &mlp.gate_proj);
    let act = B::silu_mul(gate, project2::<B>(x, &mlp.up_proj));
    project2::<B>(act, &mlp.down_proj)
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::tensor::Tensor;

    use super::{FeedForwardOps, grouped_experts};
    use crate::model::Experts;

    /// A decoding step's few tokens as host loops ([`crate::host::moe`]): no per-operation
    /// overhead between the experts' products.
    impl FeedForwardOps for Flex {
        fn moe_experts(
            x: Tensor<Self, 2>,
            router_logits: Tensor<Self, 2>,
            experts: &Experts<Self>,
            top_k: usize,
        ) -> Tensor<Self, 2> {
            let weights = [
                experts.gate_proj.val(),
                experts.up_proj.val(),
                experts.down_proj.val(),
            ];
            let [g, u, d] = &weights;
            crate::host::moe::routed_experts(&x, &router_logits, [g, u, d], top_k)
                .unwrap_or_else(|| grouped_experts(x, router_logits, experts, top_k))
        }
    }
}
