//! f32 products kept off TF32 tensor cores, and cubek's TMA kernel for half-precision products
//! of many rows, against f64 products of the same (rounded) operands.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use common::{Rng, assert_close, host, prim, rounded};
use jamba_kernels::matmul;

/// `[.., m, k] · [.., k, n]` in f64 at the sampled flat output indices `picks`.
fn sampled_expected(x: &[f32], w: &[f32], [batch, m, k, n]: [usize; 4], picks: &[usize]) -> Vec<f32> {
    let _ = batch;
    picks
        .iter()
        .map(|&i| {
            let (b, r, o) = (i / (m * n), (i / n) % m, i % n);
            (0..k)
                .map(|j| x[(b * m + r) * k + j] as f64 * w[(b * k + j) * n + o] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

/// f32 products of a prefill's and a decoding step's shapes, plain and batched: f32 arithmetic
/// (a TF32 product would be ~1e-3 off).
fn f32_matmul_matches_the_product<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(18);
    for &(batch, m, k, n) in &[(1usize, 1usize, 300usize, 70usize), (1, 130, 64, 200), (3, 17, 40, 33)] {
        let (x, xh) = rounded::<R, 3>(rng.normal(batch * m * k, 0.0, 1.0), [batch, m, k], DType::F32, device);
        let (w, wh) = rounded::<R, 3>(
            rng.normal(batch * k * n, 0.0, 1.0 / (k as f64).sqrt()),
            [batch, k, n],
            DType::F32,
            device,
        );
        let y = host::<R, 3>(matmul::matmul_f32(prim(x), prim(w)));
        let picks: Vec<usize> = (0..batch * m * n).collect();
        let want = sampled_expected(&xh, &wh, [batch, m, k, n], &picks);
        assert_close(&format!("f32 matmul {batch} x {m} x {k} -> {n}"), &y, &want, 1e-5);
    }
}

/// A prefill's `in_proj` shape and two small ones, plain (as the projections call it) and
/// batched (as the experts do), at sampled outputs: one rounding of the output (bf16's unit
/// roundoff is 3.9e-3) over f32 accumulation. The plain products must take the kernel; a
/// batched one it refuses returns `None`, for the caller's product.
fn tma_products_match_the_product<R: CubeRuntime>(device: &R::Device) {
    let mut rng = Rng::new(19);
    for &(batch, rows, inputs, outputs) in &[
        (1usize, 2048usize, 1024usize, 4096usize),
        (1, 256, 512, 1024),
        (1, 136, 64, 200),
        (3, 256, 512, 1024),
    ] {
        let (x, xh) = rounded::<R, 3>(
            rng.normal(batch * rows * inputs, 0.0, 1.0),
            [batch, rows, inputs],
            DType::BF16,
            device,
        );
        let (w, wh) = rounded::<R, 3>(
            rng.normal(batch * inputs * outputs, 0.0, 1.0 / (inputs as f64).sqrt()),
            [batch, inputs, outputs],
            DType::BF16,
            device,
        );
        let picks: Vec<usize> = (0..512)
            .map(|_| (rng.next_u64() % (batch * rows * outputs) as u64) as usize)
            .collect();
        let expected = sampled_expected(&xh, &wh, [batch, rows, inputs, outputs], &picks);
        let name = format!("bf16 TMA product {batch} x {rows} x {inputs} -> {outputs}");
        let y = if batch == 1 {
            matmul::matmul_tma(prim(x.reshape([rows, inputs])), prim(w.reshape([inputs, outputs])))
                .map(host::<R, 2>)
        } else {
            matmul::matmul_tma(prim(x), prim(w)).map(host::<R, 3>)
        };
        match y {
            Some(y) => {
                let sampled: Vec<f32> = picks.iter().map(|&i| y[i]).collect();
                assert_close(&name, &sampled, &expected, 1e-2);
            }
            None if batch > 1 => eprintln!("{name}: refused; the caller's product runs"),
            None => panic!("{name}: the TMA kernel refused a projection's product"),
        }
    }
}

runtime_tests!(
    f32_matmul_matches_the_product;
    cuda: tma_products_match_the_product,
);
