//! `Fusion<B>`, the type of Burn's default GPU backends (`burn::backend::Cuda` and `Wgpu` with
//! Burn's `fusion` feature): each operation is handed to the inner backend `B` (its fused
//! kernels where it has them) and its outputs are registered back as fusion tensors. The
//! operations around them stay in Fusion's graph.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorMetadata, TensorPrimitive};
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{Fusion, FusionBackend, NoOp};
use burn_ir::{InitOperationIr, OperationIr};

use super::{ConvInput, ConvOutput, JambaBackend, ScanGrads, ScanInput, ScanOutput};

type Client<B> = GlobalFusionClient<<B as FusionBackend>::FusionRuntime>;

/// `t` as a tensor of the inner backend (the fusion stream is drained up to it).
fn inner<B: FusionBackend, const D: usize>(t: Tensor<Fusion<B>, D>) -> Tensor<B, D> {
    let t = t.into_primitive().tensor();
    let client = t.client.clone();
    Tensor::from_primitive(TensorPrimitive::Float(client.resolve_tensor_float::<B>(t)))
}

/// An inner backend's tensor registered with the fusion `client`.
fn outer<B: FusionBackend, const D: usize>(t: Tensor<B, D>, client: &Client<B>) -> Tensor<Fusion<B>, D> {
    let t = t.into_primitive().tensor();
    let (shape, dtype) = (t.shape(), t.dtype());
    let handle = B::float_tensor_handle(t);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    let out = client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            NoOp::<B>::new(),
        )
        .pop()
        .expect("an init operation has one output");
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn client_of<B: FusionBackend, const D: usize>(t: &Tensor<Fusion<B>, D>) -> Client<B> {
    t.clone().into_primitive().tensor().client.clone()
}

fn scan_inner<B: FusionBackend>(input: ScanInput<Fusion<B>>) -> ScanInput<B> {
    ScanInput {
        u: inner(input.u),
        delta: inner(input.delta),
        a: inner(input.a),
        b: inner(input.b),
        c: inner(input.c),
        d: input.d.map(inner),
        z: input.z.map(inner),
        delta_bias: input.delta_bias.map(inner),
        delta_softplus: input.delta_softplus,
        initial_state: input.initial_state.map(inner),
    }
}

impl<B: FusionBackend + JambaBackend> JambaBackend for Fusion<B> {
    fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
        let client = client_of(&input.u);
        let out = B::selective_scan(scan_inner(input));
        ScanOutput {
            y: outer(out.y, &client),
            state: outer(out.state, &client),
        }
    }

    fn fused_scan_backward(state: usize) -> bool {
        B::fused_scan_backward(state)
    }

    fn selective_scan_backward(
        input: ScanInput<Self>,
        grad_y: Tensor<Self, 3>,
    ) -> Option<ScanGrads<Self>> {
        let client = client_of(&input.u);
        let g = B::selective_scan_backward(scan_inner(input), inner(grad_y))?;
        Some(ScanGrads {
            u: outer(g.u, &client),
            delta: outer(g.delta, &client),
            a: outer(g.a, &client),
            b: outer(g.b, &client),
            c: outer(g.c, &client),
            d: outer(g.d, &client),
            z: g.z.map(|z| outer(z, &client)),
            delta_bias: outer(g.delta_bias, &client),
            initial_state: outer(g.initial_state, &client),
        })
    }

    fn causal_conv1d(input: ConvInput<Self>) -> ConvOutput<Self> {
        let client = client_of(&input.x);
        let out = B::causal_conv1d(ConvInput {
            x: inner(input.x),
            weight: inner(input.weight),
            bias: input.bias.map(inner),
            prefix: input.prefix.map(inner),
            silu: input.silu,
        });
        ConvOutput {
            y: outer(out.y, &client),
            state: outer(out.state, &client),
        }
    }

    fn projection(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let client = client_of(&x);
        outer(B::projection(inner(x), inner(weight), bias.map(inner)), &client)
    }

    fn scaled_dot_product_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        options: AttentionModuleOptions,
    ) -> Tensor<Self, 4> {
        // The mask crosses to the inner backend as floats (the bridge resolves float tensors).
        let client = client_of(&q);
        let mask = mask.map(|m| inner(m.float()).equal_elem(1.0));
        outer(
            B::scaled_dot_product_attention(inner(q), inner(k), inner(v), mask, options),
            &client,
        )
    }
}
