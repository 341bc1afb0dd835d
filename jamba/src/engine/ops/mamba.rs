//! A Mamba mixer's decoding step.

use burn::tensor::{DType, Tensor, backend::Backend};

use super::LinearOps;
use crate::cache::MambaState;
use crate::model::MambaMixer;

/// A Mamba layer's scan parameters in f32, computed once when the engine is built:
/// `A = −exp(A_log)`, the skip `D` and the Δ bias (a model's weights do not change between
/// forward passes, and each was three launches or a pass of `exp` on every one).
#[derive(Debug, Clone)]
pub struct ScanParams<B: Backend> {
    /// `A = −exp(A_log)`, `[inner, d_state]`.
    pub a: Tensor<B, 2>,
    /// `D`, `[inner]`.
    pub d: Tensor<B, 1>,
    /// `dt_proj`'s bias, `[inner]`.
    pub dt_bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> ScanParams<B> {
    /// The parameters of `mixer`.
    pub fn new(mixer: &MambaMixer<B>) -> Self {
        let f32 = |t: Tensor<B, 1>| t.cast(DType::F32);
        Self {
            a: mixer.a_log.val().cast(DType::F32).exp().neg(),
            d: f32(mixer.d.val()),
            dt_bias: mixer.dt_proj.bias.as_ref().map(|b| f32(b.val())),
        }
    }
}

/// The engine's Mamba operations.
pub trait MambaOps: LinearOps {
    /// One decoding step of `mixer` between `in_proj` and `out_proj`: `xz` is `in_proj`'s
    /// output for one token per row, `[batch, 2 · inner]`; returns the gated output
    /// `[batch, inner]` and advances `state`. By default the separate operations of a prefill.
    fn mamba_step(
        mixer: &MambaMixer<Self>,
        params: &ScanParams<Self>,
        xz: Tensor<Self, 2>,
        state: &mut MambaState<Self>,
    ) -> Tensor<Self, 2> {
        let [batch, width] = xz.dims();
        crate::engine::mamba::mix(mixer, params, xz.reshape([batch, 1, width]), None, state)
            .reshape([batch, width / 2])
    }
}

#[cfg(feature = "kernels")]
mod cube {
    use burn::tensor::{DType, Tensor};
    use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
    use jamba_kernels::mamba_step;

    use super::{MambaOps, ScanParams};
    use crate::cache::MambaState;
    use crate::cube::{Cube, prim, wrap};
    use crate::model::MambaMixer;

    /// Conv + SiLU, `x_proj`, the norms of Δ, B and C, `dt_proj`, softplus, the state update,
    /// the D skip and the SiLU(z) gate in one launch (up to four rows) or two, where the
    /// separate operations take about fifteen.
    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> MambaOps
        for Cube<R, F, I, BT>
    {
        fn mamba_step(
            mixer: &MambaMixer<Self>,
            params: &ScanParams<Self>,
            xz: Tensor<Self, 2>,
            state: &mut MambaState<Self>,
        ) -> Tensor<Self, 2> {
            let dtype = xz.dtype();
            let [batch, width] = xz.dims();
            let conv_weight = mixer.conv_weight.val();
            let [inner, d_conv] = conv_weight.dims();
            let (rank, n) = (mixer.dt_rank, mixer.d_state);
            let norms = [&mixer.dt_layernorm, &mixer.b_layernorm, &mixer.c_layernorm];
            let same_dtype = conv_weight.dtype() == dtype
                && [
                    mixer.x_proj.weight.val(),
                    mixer.dt_proj.weight.val(),
                    mixer.a_log.val(),
                ]
                .iter()
                .all(|t| t.dtype() == dtype)
                && norms.iter().all(|n| n.weight.val().dtype() == dtype)
                && [&mixer.conv_bias, &mixer.dt_proj.bias]
                    .iter()
                    .all(|b| b.as_ref().is_none_or(|b| b.val().dtype() == dtype))
                && mixer.d.val().dtype() == dtype;
            // One epsilon for the three norms and no `x_proj` bias, as every Jamba checkpoint.
            let fusable = mixer.x_proj.bias.is_none()
                && norms.iter().all(|n| n.eps == mixer.dt_layernorm.eps);
            if !same_dtype
                || !fusable
                || !mamba_step::supports(d_conv, rank, n)
                || width != 2 * inner
                || state.conv.dims() != [batch, d_conv - 1, inner]
                || state.ssm.dims() != [batch, inner, n]
            {
                return crate::engine::mamba::mix(
                    mixer,
                    params,
                    xz.reshape([batch, 1, width]),
                    None,
                    state,
                )
                .reshape([batch, inner]);
            }
            let (y, conv_state, ssm_state) = mamba_step::mamba_step(mamba_step::MambaStepTensors {
                xz: prim(xz),
                conv_state: prim(state.conv.clone().cast(dtype)),
                conv_weight: prim(conv_weight),
                conv_bias: mixer.conv_bias.as_ref().map(|b| prim(b.val())),
                x_proj: prim(mixer.x_proj.weight.val()),
                dt_norm: prim(mixer.dt_layernorm.weight.val()),
                b_norm: prim(mixer.b_layernorm.weight.val()),
                c_norm: prim(mixer.c_layernorm.weight.val()),
                eps: mixer.dt_layernorm.eps,
                dt_proj: prim(mixer.dt_proj.weight.val()),
                dt_bias: mixer.dt_proj.bias.as_ref().map(|b| prim(b.val())),
                a_log: prim(mixer.a_log.val()),
                d: prim(mixer.d.val()),
                ssm_state: prim(state.ssm.clone().cast(DType::F32)),
            });
            state.conv = wrap(conv_state);
            state.ssm = wrap(ssm_state);
            wrap(y)
        }
    }
}
