//! The depthwise causal convolution on the host, the channels split across threads.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::math::silu;
use super::{Shared, for_channel_ranges, values};
use crate::ops::{ConvInput, ConvOutput};

/// The host conv's inputs as f32 slices, and its output.
struct ConvArgs<'a> {
    /// `[batch, k − 1 + seq, channels]`: the prefix, then the input.
    padded: &'a [f32],
    /// `[k, channels]`: tap-major, so that a tap's weights for a run of channels are contiguous.
    taps: &'a [f32],
    bias: Option<&'a [f32]>,
    silu: bool,
    batch: usize,
    seq: usize,
    channels: usize,
    k: usize,
    y: &'a Shared,
}

simd_dispatch! {
    /// The convolution for the channels in `range`, every row and step.
    fn conv_channels(p: &ConvArgs<'_>, range: std::ops::Range<usize>) {
        let (seq, channels, k) = (p.seq, p.channels, p.k);
        let span = range.len();
        let mut acc = vec![0.0f32; span];
        for b in 0..p.batch {
            for t in 0..seq {
                match p.bias {
                    Some(bias) => acc.copy_from_slice(&bias[range.clone()]),
                    None => acc.fill(0.0),
                }
                for j in 0..k {
                    let src = &p.padded[(b * (k - 1 + seq) + t + j) * channels..][range.clone()];
                    let w = &p.taps[j * channels..][range.clone()];
                    for ((a, &wv), &xv) in acc.iter_mut().zip(w).zip(src) {
                        *a += wv * xv;
                    }
                }
                if p.silu {
                    for a in &mut acc {
                        *a = silu(*a);
                    }
                }
                let row = (b * seq + t) * channels + range.start;
                for (i, &v) in acc.iter().enumerate() {
                    // SAFETY: (b, t, ch) with ch in this thread's range: written once.
                    unsafe { p.y.write(row + i, v) };
                }
            }
        }
    }
}

/// Depthwise causal conv1d + bias (+ SiLU) continuing from the prefix, on the host. `y` and the
/// new prefix come back in the dtype of `x`.
pub(crate) fn causal_conv1d<B: Backend>(input: ConvInput<B>) -> ConvOutput<B> {
    let device = input.x.device();
    let dtype = input.x.dtype();
    let [batch, seq, channels] = input.x.dims();
    let k = input.weight.dims()[1];
    let x = values(input.x);
    let w = values(input.weight);
    let bias = input.bias.map(values);
    let prefix = match input.prefix {
        Some(p) => values(p),
        None => vec![0.0; batch * (k - 1) * channels],
    };
    // [prefix, x] per row: the convolution then reads k consecutive rows for every step.
    let rows = k - 1 + seq;
    let mut padded = Vec::with_capacity(batch * rows * channels);
    for b in 0..batch {
        padded.extend_from_slice(&prefix[b * (k - 1) * channels..][..(k - 1) * channels]);
        padded.extend_from_slice(&x[b * seq * channels..][..seq * channels]);
    }
    let mut taps = vec![0.0f32; k * channels];
    for ch in 0..channels {
        for j in 0..k {
            taps[j * channels + ch] = w[ch * k + j];
        }
    }
    let mut y = vec![0.0f32; batch * seq * channels];
    let y_out = Shared(y.as_mut_ptr());
    let args = ConvArgs {
        padded: &padded,
        taps: &taps,
        bias: bias.as_deref(),
        silu: input.silu,
        batch,
        seq,
        channels,
        k,
        y: &y_out,
    };
    for_channel_ranges(channels, batch * seq * channels * k, |range| {
        conv_channels(&args, range)
    });
    // The new prefix: the last k − 1 rows of [prefix, x].
    let mut state = Vec::with_capacity(batch * (k - 1) * channels);
    for b in 0..batch {
        state.extend_from_slice(&padded[(b * rows + seq) * channels..][..(k - 1) * channels]);
    }
    ConvOutput {
        y: Tensor::<B, 3>::from_data(TensorData::new(y, [batch, seq, channels]), &device)
            .cast(dtype),
        state: Tensor::<B, 3>::from_data(TensorData::new(state, [batch, k - 1, channels]), &device)
            .cast(dtype),
    }
}

