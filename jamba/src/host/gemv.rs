//! Products of a few rows by a weight on flex (a decoding step's projections), streaming the
//! weight once at memory bandwidth: flex's GEMM is tuned for large products.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};

use super::{threads, values};

/// Rows up to which [`linear`] runs its own loop (decoding: a row per sequence).
pub(crate) const MAX_ROWS: usize = 8;

/// `x [batch, seq, in] · weight [in, out] (+ bias)` for up to [`MAX_ROWS`] rows of f32, or
/// `None` (other shapes and dtypes, or a weight that is not one contiguous buffer).
pub(crate) fn linear(
    x: &Tensor<Flex, 3>,
    weight: &Tensor<Flex, 2>,
    bias: Option<&Tensor<Flex, 1>>,
) -> Option<Tensor<Flex, 3>> {
    let [batch, seq, inputs] = x.dims();
    let outputs = weight.dims()[1];
    let rows = batch * seq;
    if rows > MAX_ROWS || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let w_prim = weight.clone().into_primitive().tensor();
    let w = w_prim
        .as_slice::<f32>()
        .filter(|w| w.len() == inputs * outputs)?;
    let xv = values(x.clone());
    let mut out = gemv(&GemvArgs {
        w,
        x: &xv,
        rows,
        inputs,
        outputs,
    });
    if let Some(bias) = bias {
        let bv = values(bias.clone());
        for row in out.chunks_exact_mut(outputs) {
            row.iter_mut().zip(&bv).for_each(|(o, b)| *o += b);
        }
    }
    Some(Tensor::from_data(
        TensorData::new(out, [batch, seq, outputs]),
        &x.device(),
    ))
}

/// A product's operands.
pub(crate) struct GemvArgs<'a> {
    /// `[inputs, outputs]`.
    pub w: &'a [f32],
    /// `[rows, inputs]`.
    pub x: &'a [f32],
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// `x · w` on the host: `[rows, outputs]`. Each thread streams one contiguous band of the
/// weight's input rows into partial sums over every output column, and the partials are added
/// at the end (`rows · outputs` adds per extra thread, nothing next to the weight). Two bands
/// meet through `rayon::join`, which runs the second itself when no other thread takes it in
/// time: a busy machine degrades to one thread instead of waiting.
pub(crate) fn gemv(args: &GemvArgs<'_>) -> Vec<f32> {
    use rayon::prelude::*;
    let (rows, inputs, outputs) = (args.rows, args.inputs, args.outputs);
    // Bands of at least 64K weights (below that a thread costs more than it saves).
    let bands = threads()
        .min((inputs * outputs).div_ceil(1 << 16))
        .min(inputs.div_ceil(4))
        .max(1);
    if bands == 1 {
        return gemv_rows(args, 0..inputs);
    }
    // Whole groups of 4 input rows per band (the loop's unit).
    let per = inputs.div_ceil(bands).div_ceil(4) * 4;
    let band = |t: usize| gemv_rows(args, (t * per).min(inputs)..((t + 1) * per).min(inputs));
    if bands == 2 {
        let (mut out, second) = rayon::join(|| band(0), || band(1));
        add_assign(&mut out, &second);
        return out;
    }
    let mut parts = (0..bands)
        .into_par_iter()
        .map(band)
        .collect::<Vec<_>>()
        .into_iter();
    let mut out = parts.next().unwrap_or_else(|| vec![0.0; rows * outputs]);
    for part in parts {
        add_assign(&mut out, &part);
    }
    out
}

simd_dispatch! {
    /// `x[:, inputs] · w[inputs, :]` over a band of input rows: partial sums, `[rows, outputs]`.
    fn gemv_rows(p: &GemvArgs<'_>, inputs: std::ops::Range<usize>) -> Vec<f32> {
        let (rows, width, outputs) = (p.rows, p.inputs, p.outputs);
        let mut out = vec![0.0f32; rows * outputs];
        let row = |i: usize| &p.w[i * outputs..][..outputs];
        let mut i = inputs.start;
        while i + 4 <= inputs.end {
            let (w0, w1, w2, w3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
            for r in 0..rows {
                let xs = &p.x[r * width + i..][..4];
                let (x0, x1, x2, x3) = (xs[0], xs[1], xs[2], xs[3]);
                let acc = &mut out[r * outputs..][..outputs];
                for c in 0..outputs {
                    acc[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
                }
            }
            i += 4;
        }
        while i < inputs.end {
            let wi = row(i);
            for r in 0..rows {
                let xv = p.x[r * width + i];
                for (a, &wv) in out[r * outputs..][..outputs].iter_mut().zip(wi) {
                    *a += xv * wv;
                }
            }
            i += 1;
        }
        out
    }
}

simd_dispatch! {
    /// `out += part`, element by element.
    fn add_assign(out: &mut [f32], part: &[f32]) {
        for (o, p) in out.iter_mut().zip(part) {
            *o += p;
        }
    }
}
