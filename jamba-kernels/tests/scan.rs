//! The selective scan's forward kernels (tiled and chunked, and the one-step update) against an
//! f64 loop of the recurrence, with output buffers poisoned with NaN first.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use common::{Problem, Rng, assert_close, host, poisoned};
use jamba_kernels::{scan, scan_chunked};

/// Runs the scan kernels on `p` with its per-step inputs in `dtype` (the expectation is
/// computed from the same rounded values) under every plan that applies, and checks `y` and
/// the final state: the default plan; the tiled kernel with every number of state indices per
/// unit that divides the state size; the chunked kernel with one chunk, with chunks that do not
/// divide the length, and with more chunks than steps.
fn check_scan<R: CubeRuntime>(
    name: &str,
    p: &mut Problem,
    dtype: DType,
    tolerance_y: f64,
    device: &R::Device,
) {
    let tensors = p.tensors::<R>(dtype, device);
    let expected = p.expected();
    let mut plans = vec![None];
    for spu in [1usize, 2, 4] {
        if p.state % spu == 0 {
            plans.push(Some(scan::ScanPlan::Tiled(
                scan::ScanGeometry::with_states_per_unit(p.state, spu),
            )));
        }
    }
    if scan_chunked::supports_state(p.state) {
        for chunks in [1usize, 3, 8] {
            plans.push(Some(scan::ScanPlan::Chunked { chunks }));
        }
    }
    for plan in plans {
        let y = poisoned::<R, 3>([p.batch, p.seq, p.channels], dtype, device);
        let h = poisoned::<R, 3>([p.batch, p.channels, p.state], DType::F32, device);
        let input = tensors.clone();
        match plan {
            None => scan::selective_scan_fwd_into(input, y.clone(), h.clone()),
            Some(plan) => scan::selective_scan_fwd_with(input, y.clone(), h.clone(), plan),
        }
        let tag = format!("{name}, plan {plan:?}");
        assert_close(&format!("{tag}: y"), &host::<R, 3>(y), &expected.0, tolerance_y);
        assert_close(&format!("{tag}: state"), &host::<R, 3>(h), &expected.1, 1e-5);
    }
}

/// The scan over a grid: every sequence length, batch 1..4, channel counts that are not
/// multiples of the cube's channel block, d_state 1..64 (and 256, the maximum), every
/// combination of D, z, Δ bias and initial state on the short sequences.
fn scan_kernel_matches_the_definition_over_the_grid<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(1);
    let shapes = [
        (1usize, 3usize, 1usize),
        (2, 37, 4),
        (3, 19, 16),
        (4, 5, 64),
    ];
    let mut cases = 0;
    for &seq in &[1usize, 2, 7, 64, 1000, 5000] {
        for &(batch, channels, state) in &shapes {
            for options in 0..16u8 {
                if seq > 64 && ![0u8, 5, 10, 15].contains(&options) {
                    continue;
                }
                if seq == 5000 && state == 64 && options != 15 {
                    continue; // keeps the f64 loop and the software rasteriser quick
                }
                let with = [0, 1, 2, 3].map(|bit| options & (1 << bit) != 0);
                let mut p = Problem::random(&mut rng, batch, seq, channels, state, with);
                let tag = format!(
                    "seq {seq} batch {batch} channels {channels} state {state} D/z/bias/h0 {with:?}"
                );
                check_scan::<R>(&tag, &mut p, DType::F32, 1e-5, device);
                cases += 1;
            }
        }
    }
    let mut p = Problem::random(&mut rng, 2, 7, 3, 256, [true; 4]);
    check_scan::<R>("state 256", &mut p, DType::F32, 1e-5, device);
    assert!(cases > 250, "{cases} cases");
}

/// Half-precision per-step inputs (f32 arithmetic inside): the state to f32 precision, `y` to
/// the rounding of its half-precision store.
fn scan_kernel_takes_half_inputs<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(2);
    for (dtype, tolerance) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for &(batch, seq, channels, state) in &[
            (1usize, 1usize, 7usize, 16usize),
            (2, 300, 37, 16),
            (3, 64, 19, 4),
        ] {
            let mut p = Problem::random(&mut rng, batch, seq, channels, state, [true; 4]);
            check_scan::<R>(&format!("{dtype:?} seq {seq}"), &mut p, dtype, tolerance, device);
        }
    }
}

runtime_tests!(
    scan_kernel_matches_the_definition_over_the_grid;
    cuda: scan_kernel_takes_half_inputs,
);
