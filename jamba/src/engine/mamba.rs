//! The engine's Mamba mixer after `in_proj`, as separate operations (a prefill, or a decoding
//! step on a backend without a fused step).

use burn::tensor::Tensor;

use super::ops::{LinearOps, ScanParams};
use crate::cache::MambaState;
use crate::model::{MambaMixer, masked};
use crate::ops::{ConvInput, ScanInput};

/// `mixer` from `in_proj`'s output `xz` `[batch, seq, 2 · inner]` (its input already masked
/// by `keep`) to the gated scan output `[batch, seq, inner]` before `out_proj`, continuing
/// from `state` and advancing it.
pub(crate) fn mix<B: LinearOps>(
    mixer: &MambaMixer<B>,
    params: &ScanParams<B>,
    xz: Tensor<B, 3>,
    keep: Option<&Tensor<B, 3>>,
    state: &mut MambaState<B>,
) -> Tensor<B, 3> {
    let [batch, seq, _] = xz.dims();
    let (inner, r, n) = (mixer.intermediate_size(), mixer.dt_rank, mixer.d_state);
    let dtype = xz.dtype();
    let x = xz.clone().slice([0..batch, 0..seq, 0..inner]);
    let z = xz.slice([0..batch, 0..seq, inner..2 * inner]);

    let conv = B::causal_conv1d(ConvInput {
        x,
        weight: mixer.conv_weight.val(),
        bias: mixer.conv_bias.as_ref().map(|b| b.val()),
        prefix: Some(state.conv.clone()),
        silu: true,
    });
    let u = masked(conv.y, keep);

    let bias = mixer.x_proj.bias.as_ref().map(|b| b.val());
    let dbc = B::project(u.clone(), mixer.x_proj.weight.val(), bias);
    let part = |from: usize, to: usize| dbc.clone().slice([0..batch, 0..seq, from..to]);
    let dt = B::rms_norm(part(0, r), &mixer.dt_layernorm);
    let b = B::rms_norm(part(r, r + n), &mixer.b_layernorm);
    let c = B::rms_norm(part(r + n, r + 2 * n), &mixer.c_layernorm);

    let scan = B::selective_scan(ScanInput {
        u,
        delta: B::project(dt, mixer.dt_proj.weight.val(), None),
        a: params.a.clone(),
        b,
        c,
        d: Some(params.d.clone()),
        z: Some(z),
        delta_bias: params.dt_bias.clone(),
        delta_softplus: true,
        initial_state: Some(state.ssm.clone()),
    });
    state.conv = conv.state;
    state.ssm = scan.state;
    scan.y.cast(dtype)
}
