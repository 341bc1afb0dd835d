//! Each row's largest value's index (greedy decoding) against a host loop.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, host_ids, prim};
use jamba_kernels::argmax;

/// The index of the largest value, the first on ties.
fn first_max(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The argmax kernel against a host loop over seeded random rows: widths around a block's size
/// and a vocabulary's, several rows, the maximum repeated at a later index (the first must
/// win) and placed in the last block.
fn argmax_kernel_matches_a_host_loop<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(11);
    for &(rows, width) in &[
        (1usize, 1usize),
        (1, 5),
        (3, 1023),
        (2, 1025),
        (1, 65_536),
        (4, 70_001),
    ] {
        let mut x = rng.normal(rows * width, 0.0, 3.0);
        for r in 0..rows {
            let row = &mut x[r * width..(r + 1) * width];
            let at = (rng.next_f64() * width as f64) as usize % width;
            let top = row.iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            row[at] = top;
            if r % 2 == 1 {
                // A tie after it, and (odd rows) the first copy in the last block.
                row[width - 1] = top;
            }
        }
        let want: Vec<i64> = x
            .chunks_exact(width)
            .map(|row| first_max(row) as i64)
            .collect();
        let t = Tensor::<K<R>, 2>::from_data(TensorData::new(x, [rows, width]), device);
        let out = argmax::argmax_rows(prim(t), DType::I32);
        let got = host_ids::<R, 1>(out);
        assert_eq!(got, want, "argmax of {rows} rows of {width}");
    }
}

runtime_tests!(argmax_kernel_matches_a_host_loop);
