// Included by `engine_ops.rs`: the scan's gradients on any autodiff backend.

/// Every input's gradient through the scan, for the loss `Σ y·w`.
fn scan_grads<B: burn::tensor::backend::AutodiffBackend + JambaBackend>(
    p: &Problem,
    w: &[f32],
    device: &B::Device,
) -> Vec<(&'static str, Vec<f32>)> {
    let input = p.input::<B>(device);
    let input = jamba::ops::ScanInput {
        u: input.u.require_grad(),
        delta: input.delta.require_grad(),
        a: input.a.require_grad(),
        b: input.b.require_grad(),
        c: input.c.require_grad(),
        d: input.d.map(|t| t.require_grad()),
        z: input.z.map(|t| t.require_grad()),
        delta_bias: input.delta_bias.map(|t| t.require_grad()),
        initial_state: input.initial_state.map(|t| t.require_grad()),
        ..input
    };
    let y = B::selective_scan(input.clone()).y;
    let w = Tensor::<B, 3>::from_data(TensorData::new(w.to_vec(), y.dims()), device);
    let grads = (y * w).sum().backward();
    let g3 = |t: &Tensor<B, 3>| to_vec(t.grad(&grads).expect("tracked input has a gradient"));
    let mut out = vec![
        ("u", g3(&input.u)),
        ("delta", g3(&input.delta)),
        ("A", to_vec(input.a.grad(&grads).unwrap())),
        ("B", g3(&input.b)),
        ("C", g3(&input.c)),
    ];
    if let Some(d) = &input.d {
        out.push(("D", to_vec(d.grad(&grads).unwrap())));
    }
    if let Some(z) = &input.z {
        out.push(("z", g3(z)));
    }
    if let Some(bias) = &input.delta_bias {
        out.push(("delta_bias", to_vec(bias.grad(&grads).unwrap())));
    }
    if let Some(h0) = &input.initial_state {
        out.push(("initial_state", g3(h0)));
    }
    out
}

/// The backward kernel (through `Autodiff<CubeBackend>`) against autodiff of the tensor-op scan
/// on the CPU, on seeded random inputs and output gradients.
fn scan_backward_kernel_matches_autodiff_of_tensor_ops<G: Gpu>(device: &G::Device) {
    type Cpu = burn::backend::Autodiff<jamba::backends::Cpu>;
    let mut rng = Rng(SplitMix64::new(31));
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 300] {
        for &(batch, channels, state) in &[
            (1usize, 3usize, 1usize),
            (2, 37, 4),
            (3, 19, 16),
            (2, 5, 64),
        ] {
            for options in [0u8, 3, 5, 10, 15] {
                let with = [0, 1, 2, 3].map(|bit| options & (1 << bit) != 0);
                let p = Problem::random(&mut rng, batch, seq, channels, state, with);
                let w = rng.normal(batch * seq * channels, 0.0, 1.0);
                let ours = scan_grads::<burn::backend::Autodiff<G>>(&p, &w, device);
                let reference = scan_grads::<Cpu>(&p, &w, &Default::default());
                assert_eq!(ours.len(), reference.len());
                for ((name, g), (_, e)) in ours.iter().zip(&reference) {
                    // A gradient of one to three elements is one to three sums over channels
                    // and steps, each of which may cancel: both sides' f32 summation errors are
                    // bounded relative to the terms, not to the result (dB of one step and one
                    // state once measured 1.8e-5). An indexing error is still O(1) there.
                    let tolerance = if e.len() < 4 { 1e-3 } else { 1e-5 };
                    assert_close(
                        &format!(
                            "d{name}, seq {seq} batch {batch} channels {channels} state {state} D/z/bias/h0 {with:?}"
                        ),
                        g,
                        e,
                        tolerance,
                    );
                }
                cases += 1;
            }
        }
    }
    assert!(cases >= 100);
}

