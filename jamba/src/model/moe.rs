//! The sparse mixture-of-experts block (`JambaSparseMoeBlock`) and its load-balancing loss.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{
    DType, Distribution, Int, Tensor, TensorData, activation::silu, activation::softmax,
    backend::Backend,
};

use crate::ops::{JambaBackend, linear};

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

/// A bias-free softmax router over SwiGLU experts, top-k per token, the selected weights
/// **not** renormalised (they are the softmax probabilities themselves). Each expert runs only
/// on the tokens routed to it.
///
/// ```
/// use burn::tensor::Tensor;
/// use jamba::backends::Cpu;
/// use jamba::model::SparseMoeConfig;
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
/// use jamba::model::Experts;
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
    pub fn weights(&self, e: usize) -> [Tensor<B, 2>; 3] {
        let [_, hidden, inner] = self.gate_proj.dims();
        let pick = |t: &Param<Tensor<B, 3>>, rows: usize, cols: usize| {
            t.val().slice([e..e + 1]).reshape([rows, cols])
        };
        [
            pick(&self.gate_proj, hidden, inner),
            pick(&self.up_proj, hidden, inner),
            pick(&self.down_proj, inner, hidden),
        ]
    }
}

impl<B: JambaBackend> Experts<B> {
    /// Expert `e` applied to the rows of `x` `[rows, hidden]`.
    pub fn forward(&self, e: usize, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [gate, up, down] = self.weights(e);
        let [rows, hidden] = x.dims();
        let x = x.reshape([1, rows, hidden]);
        let act = silu(B::projection(x.clone(), gate, None)) * B::projection(x, up, None);
        B::projection(act, down, None).reshape([rows, hidden])
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
    /// Routes `x` `[batch, seq, hidden]`; returns the output and the router logits
    /// `[batch · seq, num_experts]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [batch, seq, hidden] = x.dims();
        let (tokens, k) = (batch * seq, self.top_k);
        let x = x.reshape([tokens, hidden]);
        let router_logits = linear(&self.router, x.clone());
        let (weights, experts) = route(router_logits.clone(), k);

        // Every (token, slot) pair grouped by expert (the choice read back to the host): one
        // block of rows per expert, each expert run on its block only.
        let slots = tokens * k;
        let chosen = host_ids(experts.reshape([slots]));
        let mut order: Vec<usize> = (0..slots).collect();
        order.sort_by_key(|&slot| chosen[slot]);
        let mut back = vec![0i64; slots];
        for (position, &slot) in order.iter().enumerate() {
            back[slot] = position as i64;
        }
        let device = x.device();
        let ids = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [slots]), &device);
        let sorted = x.select(0, ids(order.iter().map(|&s| (s / k) as i64).collect()));
        let mut outputs = Vec::new();
        let mut start = 0;
        for e in 0..self.num_experts() {
            let count = chosen.iter().filter(|&&c| c == e as i64).count();
            if count > 0 {
                let block = sorted.clone().slice([start..start + count]);
                outputs.push(self.experts.forward(e, block));
            }
            start += count;
        }
        let per_slot = Tensor::cat(outputs, 0).select(0, ids(back));

        let weighted = per_slot.reshape([tokens, k, hidden]) * weights.reshape([tokens, k, 1]);
        (
            weighted.sum_dim(1).reshape([batch, seq, hidden]),
            router_logits,
        )
    }
}

/// The router's choice: softmax over the experts in f32, each token's `top_k` largest
/// probabilities (not renormalised, rounded to the logits' dtype) and their experts, both
/// `[tokens, top_k]`.
pub fn route<B: Backend>(
    router_logits: Tensor<B, 2>,
    top_k: usize,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let dtype = router_logits.dtype();
    let probs = softmax(router_logits.cast(DType::F32), 1);
    let (weights, experts) = probs.topk_with_indices(top_k, 1);
    (weights.cast(dtype), experts)
}

/// Integer ids read back to the host.
pub(crate) fn host_ids<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .into_vec()
        .expect("integer data converts to i64")
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
    let num_experts = router_logits.first()?.dims()[1];
    let mut rows = 0usize;
    let (mut counts, mut probs_sum) = (None::<Tensor<B, 1>>, None::<Tensor<B, 1>>);
    for logits in router_logits {
        let probs = softmax(logits.clone().cast(DType::F32), 1);
        let (_, selected) = probs.clone().topk_with_indices(top_k, 1);
        let one_hot: Tensor<B, 3> = selected.one_hot::<3>(num_experts).float().cast(DType::F32);
        let c = one_hot.sum_dim(1).sum_dim(0).reshape([num_experts]);
        let p = probs.clone().sum_dim(0).reshape([num_experts]);
        rows += probs.dims()[0];
        counts = Some(counts.map_or(c.clone(), |acc| acc + c));
        probs_sum = Some(probs_sum.map_or(p.clone(), |acc| acc + p));
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
