//! One-query attention over cached keys and values (a decoding step's attention) against an
//! f64 loop.
#![cfg(any(feature = "wgpu", feature = "cuda"))]
// The half-precision tests run on CUDA alone.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use common::{K, Rng, assert_close, prim, rounded, to_vec, wrap};
use jamba_kernels::attention;

/// One-query attention over a cache against an f64 loop: grouped heads (1, 2 and 4 query heads
/// per key/value head), head widths below and at a cube's units and not multiples of 32, key
/// counts in one chunk and across several (the online softmax's rescaling), keys and values read
/// in place from a larger preallocated buffer (strided views), and a padding mask that hides
/// some keys of one row and every key of another (which must give zeros). Both forms: head
/// widths that split into 16-byte vectors take the vector kernel, width 30 the scalar one.
/// Inputs are rounded to `dtype` first; the error left is f32 arithmetic and the output's
/// rounding.
fn decode_attention_grid<R: CubeRuntime>(device: &R::Device, dtype: DType, tolerance: f64) {
    let mut rng = Rng::new(10);
    let mut cases = 0;
    let mut forms = [0usize; 2];
    for &(batch, heads, kv_heads, dim, keys) in &[
        (1usize, 8usize, 2usize, 128usize, 1usize),
        (1, 8, 2, 128, 300),
        (3, 4, 4, 24, 257),
        (2, 6, 3, 256, 700),
        (3, 2, 1, 40, 33),
        (2, 4, 2, 30, 65),
    ] {
        for masked in [false, true] {
            let capacity = keys + 5;
            let round = |v: Vec<f32>, shape: [usize; 4]| rounded::<R, 4>(v, shape, dtype, device);
            let q_shape = [batch, heads, 1, dim];
            let (q, q_host) = round(rng.normal(batch * heads * dim, 0.0, 1.0), q_shape);
            let kv_shape = [batch, kv_heads, capacity, dim];
            let n = batch * kv_heads * capacity * dim;
            let (k_full, k_host) = round(rng.normal(n, 0.0, 1.0), kv_shape);
            let (v_full, v_host) = round(rng.normal(n, 0.0, 1.0), kv_shape);
            let view = [0..batch, 0..kv_heads, 0..keys];
            let (k, v) = (k_full.slice(view.clone()), v_full.slice(view));
            // Row 0 hides its first third of keys, the last row (when there are two) all of them.
            let hidden: Vec<bool> = (0..batch * keys)
                .map(|i| {
                    let (row, key) = (i / keys, i % keys);
                    masked && ((row == 0 && key < keys / 3) || (row > 0 && row == batch - 1))
                })
                .collect();
            let scale = 1.0 / (dim as f64).sqrt();
            let mut expected = vec![0f32; batch * heads * dim];
            for b in 0..batch {
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let at = |t: &[f32], j: usize, d: usize| {
                        t[((b * kv_heads + g) * capacity + j) * dim + d] as f64
                    };
                    let scores: Vec<f64> = (0..keys)
                        .map(|j| {
                            if hidden[b * keys + j] {
                                return f64::NEG_INFINITY;
                            }
                            (0..dim)
                                .map(|d| {
                                    q_host[(b * heads + h) * dim + d] as f64 * at(&k_host, j, d)
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue; // every key hidden: zeros
                    }
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..dim {
                        let o: f64 = (0..keys).map(|j| weights[j] * at(&v_host, j, d)).sum();
                        expected[(b * heads + h) * dim + d] = (o / total) as f32;
                    }
                }
            }
            let pad = masked.then(|| {
                let t = Tensor::<K<R>, 1>::from_data(
                    TensorData::new(
                        hidden.iter().map(|&h| h as i32 as f32).collect::<Vec<_>>(),
                        [batch * keys],
                    ),
                    device,
                );
                prim(t.reshape([batch, keys]))
            });
            let (k, v) = (prim(k), prim(v));
            forms[usize::from(attention::takes_vector_form(&k, &v))] += 1;
            let y = wrap::<R, 2>(attention::decode_attention(
                prim(q.reshape([batch, heads, dim])),
                k,
                v,
                pad,
                scale,
            ));
            assert_eq!(y.dims(), [batch, heads * dim]);
            assert_close(
                &format!(
                    "{dtype:?} decode attention b {batch} heads {heads}/{kv_heads} dim {dim} keys {keys} masked {masked}"
                ),
                &to_vec(y.cast(DType::F32)),
                &expected,
                tolerance,
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 12);
    // Both forms ran: the vector form where the head dimension splits into 16-byte vectors.
    assert!(
        forms.iter().all(|&n| n > 0),
        "cases per form (scalar, vector): {forms:?}"
    );
}


fn decode_attention_kernel_matches_the_definition<R: CubeRuntime>(device: &R::Device) {
    decode_attention_grid::<R>(device, DType::F32, 1e-5);
}

/// bf16 and f16 operands: f32 arithmetic, the output rounded once.
fn decode_attention_takes_half_inputs<R: CubeRuntime>(device: &R::Device) {
    decode_attention_grid::<R>(device, DType::BF16, 4e-3);
    decode_attention_grid::<R>(device, DType::F16, 5e-4);
}

runtime_tests!(
    decode_attention_kernel_matches_the_definition;
    cuda: decode_attention_takes_half_inputs,
);
