//! The sparse mixture-of-experts block (`JambaSparseMoeBlock`) and its load-balancing loss.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{
    DType, Distribution, Int, Tensor, TensorData, activation::softmax, backend::Backend,
};

use crate::mlp::swiglu;
use crate::ops::{JambaBackend, NormedMoe, RoutedExperts, project};

/// Configuration of [`SparseMoe`].
#[derive(Config, Debug)]
pub struct SparseMoeConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Width of each expert.
    pub intermediate_size: usize,
    /// Number of experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
}

/// A bias-free softmax router over SwiGLU experts, top-k per token, with the selected weights
/// **not** renormalised (they are the softmax probabilities themselves).
///
/// Each expert runs only on the tokens routed to it. For a few tokens (a decoding step) the
/// backend may do it all on the device ([`JambaBackend::routed_experts`]: CubeCL backends do);
/// otherwise the routing is read back to the host once per call, the (token, slot) pairs are
/// gathered in expert order, each expert runs on its block (or, where the backend prefers it,
/// [`JambaBackend::batched_experts`], every expert at once on blocks padded to one size), and
/// the results are gathered back and weighted.
///
/// ```
/// use jamba::backends::Cpu;
/// use burn::tensor::Tensor;
/// use jamba::moe::SparseMoeConfig;
/// let device = Default::default();
/// let moe = SparseMoeConfig::new(8, 16, 4, 2).init::<Cpu>(&device);
/// let (y, router_logits) = moe.forward(Tensor::<Cpu, 3>::ones([2, 3, 8], &device));
/// assert_eq!((y.dims(), router_logits.dims()), ([2, 3, 8], [6, 4]));
/// ```
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// `router`, hidden → num_experts, no bias.
    pub router: Linear<B>,
    /// The experts' weights, stacked.
    pub experts: Experts<B>,
    /// Experts per token.
    pub top_k: usize,
}

/// The SwiGLU experts of a [`SparseMoe`], their weights stacked over the experts in Burn's
/// `[in, out]` layout (the checkpoint's `experts.{e}.gate_proj.weight`, … transposed), so that
/// a kernel can pick an expert by index on the device.
///
/// ```
/// use jamba::backends::Cpu;
/// use jamba::moe::Experts;
/// let experts = Experts::<Cpu>::random(4, 8, 16, &Default::default());
/// assert_eq!((experts.len(), experts.gate_proj.dims()), (4, [4, 8, 16]));
/// ```
#[derive(Module, Debug)]
pub struct Experts<B: Backend> {
    /// `gate_proj` of every expert, `[experts, hidden, intermediate]`.
    pub gate_proj: Param<Tensor<B, 3>>,
    /// `up_proj` of every expert, `[experts, hidden, intermediate]`.
    pub up_proj: Param<Tensor<B, 3>>,
    /// `down_proj` of every expert, `[experts, intermediate, hidden]`.
    pub down_proj: Param<Tensor<B, 3>>,
}

impl<B: Backend> Experts<B> {
    /// `experts` experts of width `intermediate` initialised as Burn's `Linear` is (uniform in
    /// `±1/√fan_in`).
    pub fn random(experts: usize, hidden: usize, intermediate: usize, device: &B::Device) -> Self {
        let uniform = |fan_in: usize, shape: [usize; 3]| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Uniform(-bound, bound),
                device,
            ))
        };
        Self {
            gate_proj: uniform(hidden, [experts, hidden, intermediate]),
            up_proj: uniform(hidden, [experts, hidden, intermediate]),
            down_proj: uniform(intermediate, [experts, intermediate, hidden]),
        }
    }

    /// Number of experts.
    pub fn len(&self) -> usize {
        self.gate_proj.dims()[0]
    }

    /// Whether there are no experts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `e`'s `(gate, up, down)` weights, `[in, out]` views of the stacked tensors.
    pub fn weights(&self, e: usize) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let [_, hidden, inner] = self.gate_proj.dims();
        let pick = |t: &Param<Tensor<B, 3>>, rows: usize, cols: usize| {
            t.val().slice([e..e + 1]).reshape([rows, cols])
        };
        (
            pick(&self.gate_proj, hidden, inner),
            pick(&self.up_proj, hidden, inner),
            pick(&self.down_proj, inner, hidden),
        )
    }
}

impl<B: JambaBackend> Experts<B> {
    /// Expert `e` applied to `x` `[batch, seq, hidden]`.
    pub fn forward(&self, e: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up, down) = self.weights(e);
        swiglu(x, gate, up, down)
    }
}

impl SparseMoeConfig {
    /// Randomly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> SparseMoe<B> {
        SparseMoe {
            router: LinearConfig::new(self.hidden_size, self.num_experts)
                .with_bias(false)
                .init(device),
            experts: Experts::random(
                self.num_experts,
                self.hidden_size,
                self.intermediate_size,
                device,
            ),
            top_k: self.top_k,
        }
    }
}

impl<B: Backend> SparseMoe<B> {
    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }
}

impl<B: JambaBackend> SparseMoe<B> {
    /// The residual connection `s = (x + first) + second` and `norm` before this block, then
    /// the block on `norm(s)`, in the backend's fused form
    /// ([`JambaBackend::routed_experts_normed`]); `None` where it has none (the caller adds,
    /// normalises and calls [`forward`](Self::forward)). Returns `s`, the block's output and
    /// the router logits `[batch · seq, num_experts]`.
    pub fn forward_normed(
        &self,
        x: Tensor<B, 3>,
        first: Option<Tensor<B, 3>>,
        second: Tensor<B, 3>,
        norm: &crate::norm::RmsNorm<B>,
    ) -> Option<(Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 2>)> {
        let [batch, seq, hidden] = x.dims();
        if self.router.bias.is_some() {
            return None;
        }
        let flat = |t: Tensor<B, 3>| t.reshape([batch * seq, hidden]);
        let out = B::routed_experts_normed(NormedMoe {
            x: flat(x),
            first: first.map(flat),
            second: flat(second),
            norm: norm.weight.val(),
            eps: norm.eps,
            router: self.router.weight.val(),
            gate: self.experts.gate_proj.val(),
            up: self.experts.up_proj.val(),
            down: self.experts.down_proj.val(),
            top_k: self.top_k,
        })?;
        let unflat = |t: Tensor<B, 2>| t.reshape([batch, seq, hidden]);
        Some((unflat(out.residual), unflat(out.y), out.router_logits))
    }

    /// Routes `x` `[batch, seq, hidden]`; returns the output and the router logits
    /// `[batch * seq, num_experts]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [batch, seq, hidden] = x.dims();
        let tokens = batch * seq;
        let flat = x.reshape([tokens, hidden]);
        let router_logits = project(&self.router, flat.clone());
        if let Some(out) = B::routed_experts(RoutedExperts {
            x: flat.clone(),
            router_logits: router_logits.clone(),
            gate: self.experts.gate_proj.val(),
            up: self.experts.up_proj.val(),
            down: self.experts.down_proj.val(),
            top_k: self.top_k,
        }) {
            return (out.reshape([batch, seq, hidden]), router_logits);
        }
        let slots = tokens * self.top_k;
        let (weights, selected) =
            B::route_top_k(router_logits.clone(), self.top_k).unwrap_or_else(|| {
                let probs = softmax(router_logits.clone().cast(DType::F32), 1);
                let (weights, selected) = probs.topk_with_indices(self.top_k, 1);
                (
                    weights.cast(flat.dtype()).reshape([slots]),
                    selected.reshape([slots]),
                )
            });

        let selected: Vec<i64> = selected
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("top-k indices are integers");
        // The (token, slot) pairs sorted by expert, so that each expert's rows are one
        // contiguous block of a single gathered matrix.
        let mut order: Vec<usize> = (0..slots).collect();
        order.sort_by_key(|&slot| selected[slot]);
        let mut counts = vec![0usize; self.num_experts()];
        for &e in &selected {
            counts[e as usize] += 1;
        }
        if B::batched_experts() {
            return (
                self.batched(flat, &order, &counts, weights, [batch, seq, hidden]),
                router_logits,
            );
        }
        // `back[slot]` is where that slot's row lands in the sorted order. One upload, one
        // gather, a block per expert, one gather back: launches do not grow with the number of
        // active experts beyond the experts' own products.
        let mut back = vec![0i64; slots];
        for (position, &slot) in order.iter().enumerate() {
            back[slot] = position as i64;
        }
        let mut index: Vec<i64> = order.iter().map(|&s| (s / self.top_k) as i64).collect();
        index.extend_from_slice(&back);
        let index =
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [2 * slots]), &flat.device());
        let rows = index.clone().slice([0..slots]);
        let back = index.slice([slots..2 * slots]);
        let sorted = flat.select(0, rows);

        let mut outputs = Vec::new();
        let mut start = 0;
        for (expert, &count) in counts.iter().enumerate() {
            if count > 0 {
                let block = sorted.clone().slice([start..start + count]);
                let out = self
                    .experts
                    .forward(expert, block.reshape([1, count, hidden]));
                outputs.push(out.reshape([count, hidden]));
            }
            start += count;
        }
        let per_slot = Tensor::cat(outputs, 0).select(0, back);
        (
            self.weighted_sum(per_slot, weights, [batch, seq, hidden]),
            router_logits,
        )
    }

    /// Each token's `top_k` expert outputs `per_slot` `[tokens · top_k, hidden]` (slot order)
    /// weighted by their routing `weights` and summed.
    fn weighted_sum(
        &self,
        per_slot: Tensor<B, 2>,
        weights: Tensor<B, 1>,
        [batch, seq, hidden]: [usize; 3],
    ) -> Tensor<B, 3> {
        let tokens = batch * seq;
        (per_slot.reshape([tokens, self.top_k, hidden]) * weights.reshape([tokens, self.top_k, 1]))
            .sum_dim(1)
            .reshape([batch, seq, hidden])
    }

    /// The experts as batched products ([`JambaBackend::batched_experts`]): expert `e`'s rows
    /// are block `e` of a `[experts, capacity, hidden]` gather (its tokens in slot order,
    /// then copies of token 0 whose outputs nobody reads), `capacity` the busiest expert's
    /// count rounded up to 16. `order` is the slots sorted by expert, `counts` each expert's
    /// number of slots.
    fn batched(
        &self,
        flat: Tensor<B, 2>,
        order: &[usize],
        counts: &[usize],
        weights: Tensor<B, 1>,
        shape: [usize; 3],
    ) -> Tensor<B, 3> {
        let hidden = shape[2];
        let (experts, slots) = (counts.len(), order.len());
        let capacity = counts
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .next_multiple_of(16);
        let mut index = vec![0i64; experts * capacity + slots];
        let (rows, back) = index.split_at_mut(experts * capacity);
        let mut sorted = order.iter();
        for (e, &count) in counts.iter().enumerate() {
            for j in 0..count {
                let slot = *sorted.next().expect("counts sum to the slots");
                rows[e * capacity + j] = (slot / self.top_k) as i64;
                back[slot] = (e * capacity + j) as i64;
            }
        }
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(index, [experts * capacity + slots]),
            &flat.device(),
        );
        let rows = index.clone().slice([0..experts * capacity]);
        let back = index.slice([experts * capacity..experts * capacity + slots]);
        let x = flat.select(0, rows).reshape([experts, capacity, hidden]);
        let gate = B::batched_matmul(x.clone(), self.experts.gate_proj.val());
        let up = B::batched_matmul(x, self.experts.up_proj.val());
        let out = B::batched_matmul(B::silu_mul(gate, up), self.experts.down_proj.val());
        let per_slot = out.reshape([experts * capacity, hidden]).select(0, back);
        self.weighted_sum(per_slot, weights, shape)
    }
}

/// The Switch-Transformer load-balancing loss over the router logits of every MoE layer
/// (`load_balancing_loss_func` without an attention mask), before `router_aux_loss_coef`:
/// `E · Σₑ f̄ₑ · P̄ₑ`, where `f̄ₑ` is the fraction of (token, slot) assignments to expert `e` and
/// `P̄ₑ` its mean router probability, both averaged over every layer's rows.
///
/// Returns `None` when `router_logits` is empty.
pub fn load_balancing_loss<B: Backend>(
    router_logits: &[Tensor<B, 2>],
    top_k: usize,
) -> Option<Tensor<B, 1>> {
    let first = router_logits.first()?;
    let num_experts = first.dims()[1];
    let mut counts: Option<Tensor<B, 1>> = None;
    let mut probs_sum: Option<Tensor<B, 1>> = None;
    let mut rows = 0usize;
    for logits in router_logits {
        let probs = softmax(logits.clone().cast(DType::F32), 1);
        let (_, selected) = probs.clone().topk_with_indices(top_k, 1);
        let one_hot: Tensor<B, 3> = selected.one_hot::<3>(num_experts).float().cast(DType::F32);
        let c = one_hot.sum_dim(1).sum_dim(0).reshape([num_experts]);
        let p = probs.clone().sum_dim(0).reshape([num_experts]);
        rows += probs.dims()[0];
        counts = Some(match counts {
            Some(acc) => acc + c,
            None => c,
        });
        probs_sum = Some(match probs_sum {
            Some(acc) => acc + p,
            None => p,
        });
    }
    let rows = rows as f64;
    let tokens_per_expert = counts?.div_scalar(rows);
    let prob_per_expert = probs_sum?.div_scalar(rows);
    Some(
        (tokens_per_expert * prob_per_expert)
            .sum()
            .mul_scalar(num_experts as f64),
    )
}
