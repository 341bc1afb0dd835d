//! A mixture of experts of a few tokens on flex (a decoding step's MoE layers) as host loops:
//! no per-operation overhead between the experts' products.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};

use super::gemv::{GemvArgs, MAX_ROWS, gemv};
use super::math::silu;
use super::values;

/// The mixture of experts of a few f32 tokens on flex as host loops: the router's softmax and
/// top-k, then each chosen expert once on the rows of the tokens that chose it, weighted and
/// summed. `None` (for the tensor-op form) for more than [`MAX_ROWS`] tokens, other dtypes or
/// weights that are not contiguous.
pub(crate) fn routed_experts(
    x: &Tensor<Flex, 2>,
    router_logits: &Tensor<Flex, 2>,
    [gate, up, down]: [&Tensor<Flex, 3>; 3],
    top_k: usize,
) -> Option<Tensor<Flex, 2>> {
    let [tokens, hidden] = x.dims();
    let [experts, _, inner] = gate.dims();
    let all_f32 = [
        x.dtype(),
        router_logits.dtype(),
        gate.dtype(),
        up.dtype(),
        down.dtype(),
    ]
    .iter()
    .all(|&d| d == DType::F32);
    if tokens > MAX_ROWS || !all_f32 || top_k == 0 || top_k > experts {
        return None;
    }
    let size = experts * hidden * inner;
    let (gate, up, down) = (
        gate.clone().into_primitive().tensor(),
        up.clone().into_primitive().tensor(),
        down.clone().into_primitive().tensor(),
    );
    let g = gate.as_slice::<f32>().filter(|s| s.len() == size)?;
    let u = up.as_slice::<f32>().filter(|s| s.len() == size)?;
    let d = down.as_slice::<f32>().filter(|s| s.len() == size)?;
    let device = x.device();
    let xv = values(x.clone());
    let logits = values(router_logits.clone());

    // Each token's top-k (expert, probability), the largest first, the lowest index among equals.
    let mut chosen: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    for t in 0..tokens {
        let row = &logits[t * experts..(t + 1) * experts];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
        for &expert in &order[..top_k] {
            chosen[expert].push((t, e[expert] / sum));
        }
    }
    let mut y = vec![0.0f32; tokens * hidden];
    let block = hidden * inner;
    for (expert, rows) in chosen.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
        let xs: Vec<f32> = rows
            .iter()
            .flat_map(|&(t, _)| xv[t * hidden..(t + 1) * hidden].iter().copied())
            .collect();
        let product = |w: &[f32], x: &[f32], inputs: usize, outputs: usize| {
            gemv(&GemvArgs {
                w,
                x,
                rows: rows.len(),
                inputs,
                outputs,
            })
        };
        let (ge, ue, de) = (
            &g[expert * block..][..block],
            &u[expert * block..][..block],
            &d[expert * block..][..block],
        );
        let gated = product(ge, &xs, hidden, inner);
        let upped = product(ue, &xs, hidden, inner);
        let act: Vec<f32> = gated
            .iter()
            .zip(&upped)
            .map(|(&a, &b)| silu(a) * b)
            .collect();
        let out = product(de, &act, inner, hidden);
        for (r, &(t, p)) in rows.iter().enumerate() {
            for (acc, &o) in y[t * hidden..(t + 1) * hidden]
                .iter_mut()
                .zip(&out[r * hidden..(r + 1) * hidden])
            {
                *acc += p * o;
            }
        }
    }
    Some(Tensor::from_data(
        TensorData::new(y, [tokens, hidden]),
        &device,
    ))
}

