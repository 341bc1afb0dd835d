//! `Autodiff<B>`: the fused scan as one recorded operation whose backward is
//! [`JambaBackend::selective_scan_backward`] (the backward kernel) where the inner backend has
//! one; everything else, and backends without it, differentiate the tensor-op path.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};

use super::JambaBackend;
use super::{ScanInput, ScanOutput, selective_scan_tensor_ops};

fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The inner backend's inputs, in [`ScanInput`] order; `z` is `None` without a gate.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    u: B::FloatTensorPrimitive,
    delta: B::FloatTensorPrimitive,
    a: B::FloatTensorPrimitive,
    b: B::FloatTensorPrimitive,
    c: B::FloatTensorPrimitive,
    d: B::FloatTensorPrimitive,
    z: Option<B::FloatTensorPrimitive>,
    bias: B::FloatTensorPrimitive,
    h0: B::FloatTensorPrimitive,
    softplus: bool,
}

impl<B: Backend> Saved<B> {
    fn input(&self) -> ScanInput<B> {
        ScanInput {
            u: tensor(self.u.clone()),
            delta: tensor(self.delta.clone()),
            a: tensor(self.a.clone()),
            b: tensor(self.b.clone()),
            c: tensor(self.c.clone()),
            d: Some(tensor(self.d.clone())),
            z: self.z.clone().map(tensor),
            delta_bias: Some(tensor(self.bias.clone())),
            delta_softplus: self.softplus,
            initial_state: Some(tensor(self.h0.clone())),
        }
    }
}

#[derive(Debug)]
struct ScanBackward;

impl<B: JambaBackend> Backward<B, 9> for ScanBackward {
    type State = Saved<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 9>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad_y = tensor::<B, 3>(grads.consume::<B>(&ops.node));
        let saved = ops.state;
        let has_z = saved.z.is_some();
        let Some(g) = B::selective_scan_backward(saved.input(), grad_y) else {
            unreachable!("recorded only where the inner backend has a fused backward");
        };
        let grads_in_order = [
            Some(g.u.into_primitive().tensor()),
            Some(g.delta.into_primitive().tensor()),
            Some(g.a.into_primitive().tensor()),
            Some(g.b.into_primitive().tensor()),
            Some(g.c.into_primitive().tensor()),
            Some(g.d.into_primitive().tensor()),
            g.z.filter(|_| has_z).map(|z| z.into_primitive().tensor()),
            Some(g.delta_bias.into_primitive().tensor()),
            Some(g.initial_state.into_primitive().tensor()),
        ];
        for (node, grad) in ops.parents.into_iter().zip(grads_in_order) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: JambaBackend, C: CheckpointStrategy> JambaBackend for Autodiff<B, C> {
    fn selective_scan(input: ScanInput<Self>) -> ScanOutput<Self> {
        let [batch, _, channels] = input.u.dims();
        let state = input.a.dims()[1];
        if !B::fused_scan_backward(state) {
            return selective_scan_tensor_ops(input);
        }
        let device = input.u.device();
        let zeros1 = || Tensor::<Self, 1>::zeros([channels], (&device, DType::F32));
        let p = |t: Tensor<Self, 3>| t.into_primitive().tensor();
        let u = p(input.u);
        let z = input.z.map(p);
        let delta = p(input.delta);
        let a = input.a.into_primitive().tensor();
        let b = p(input.b);
        let c = p(input.c);
        let d = input.d.unwrap_or_else(zeros1).into_primitive().tensor();
        let bias = input
            .delta_bias
            .unwrap_or_else(zeros1)
            .into_primitive()
            .tensor();
        let h0 = p(input
            .initial_state
            .unwrap_or_else(|| Tensor::zeros([batch, channels, state], (&device, DType::F32))));
        let saved = Saved::<B> {
            u: u.primitive.clone(),
            delta: delta.primitive.clone(),
            a: a.primitive.clone(),
            b: b.primitive.clone(),
            c: c.primitive.clone(),
            d: d.primitive.clone(),
            z: z.as_ref().map(|z| z.primitive.clone()),
            bias: bias.primitive.clone(),
            h0: h0.primitive.clone(),
            softplus: input.delta_softplus,
        };
        // Without a gate, `u` stands in for the `z` parent; its gradient is not registered.
        let z_node = z.as_ref().unwrap_or(&u).node.clone();
        let nodes = [
            u.node.clone(),
            delta.node.clone(),
            a.node.clone(),
            b.node.clone(),
            c.node.clone(),
            d.node.clone(),
            z_node,
            bias.node.clone(),
            h0.node.clone(),
        ];
        let out = B::selective_scan(saved.input());
        let y = out.y.into_primitive().tensor();
        let y = match ScanBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(saved, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        ScanOutput {
            y: Tensor::from_primitive(TensorPrimitive::Float(y)),
            state: Tensor::from_inner(out.state),
        }
    }

    // The backward of the backward is not fused (`fused_scan_backward` stays false), and
    // products, attention and the convolution stay Burn's operations, which autodiff
    // differentiates.
}
