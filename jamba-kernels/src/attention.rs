//! Attention of one new position per row over cached keys and values (a decoding step of an
//! attention layer) in one launch.
//!
//! The separate operations (`q·kᵀ`, scale, mask, max, subtract, `exp`, sum, divide, `·v`) are
//! about a dozen launches, and a GPU decoding step is bound by the host issuing launches. Here
//! a cube per (row, query head) walks the keys in chunks of [`UNITS`]: a unit per key computes
//! its score, the cube takes the chunk's maximum and sum in shared memory (an online softmax
//! across chunks), and a unit per head dimension accumulates the weighted values. Grouped-query
//! heads read their key/value head directly (no repeated copies). One cube walks all of a
//! head's keys, so the caller keeps it to short contexts ([`MAX_KEYS`]).

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::prelude::*;

/// Units per cube: keys per chunk, and the largest head dimension taken (`reduce_shared`'s
/// levels are written for 256).
pub const UNITS: usize = 256;
/// The most keys [`decode_attention`] is meant for: one cube walks all of a head's keys, so
/// beyond a few thousand the separate operations (which spread the keys over the device) win.
pub const MAX_KEYS: usize = 4096;

/// One level of a cube-wide tree reduction of `shared`: `shared[i] ∘= shared[i + stride]`.
#[cube]
fn reduce_level(shared: &mut SharedMemory<f32>, #[comptime] stride: usize, #[comptime] max: bool) {
    let unit = UNIT_POS as usize;
    if unit < stride {
        let (a, b) = (shared[unit], shared[unit + stride]);
        if comptime!(max) {
            shared[unit] = f32::max(a, b);
        } else {
            shared[unit] = a + b;
        }
    }
    sync_cube();
}

/// A cube-wide reduction of `shared[0..UNITS]` into `shared[0]`, by maximum or by sum.
#[cube]
fn reduce_shared(shared: &mut SharedMemory<f32>, #[comptime] max: bool) {
    reduce_level(shared, 128usize, max);
    reduce_level(shared, 64usize, max);
    reduce_level(shared, 32usize, max);
    reduce_level(shared, 16usize, max);
    reduce_level(shared, 8usize, max);
    reduce_level(shared, 4usize, max);
    reduce_level(shared, 2usize, max);
    reduce_level(shared, 1usize, max);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_attention_kernel<F: Float>(
    q: &crate::Strided<F>,
    k: &crate::Strided<F>,
    v: &crate::Strided<F>,
    pad: &crate::Strided<f32>,
    out: &mut crate::Strided<F>,
    keys: u32,
    dim: u32,
    group: u32,
    scale: f32,
    #[comptime] masked: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (keys, dim, group) = (keys as usize, dim as usize, group as usize);
    let head = CUBE_POS_X as usize;
    let row = CUBE_POS_Y as usize;
    let kv = head / group;
    let unit = UNIT_POS as usize;
    let q_base = row * q.stride(0usize) + head * q.stride(1usize);
    let k_base = row * k.stride(0usize) + kv * k.stride(1usize);
    let v_base = row * v.stride(0usize) + kv * v.stride(1usize);

    let mut scores = SharedMemory::<f32>::new(UNITS);
    let mut reduce = SharedMemory::<f32>::new(UNITS);
    // Running maximum, sum of weights, and this unit's output element.
    let mut m = f32::new(f32::MIN);
    let mut l = 0.0f32;
    let mut acc = 0.0f32;
    let mut start = 0usize;
    while start < keys {
        let j = start + unit;
        // No infinities (WGSL has no literal for them): a hidden key scores the lowest finite
        // value and gets weight 0 explicitly.
        let mut valid = j < keys;
        let mut s = f32::new(f32::MIN);
        if valid {
            let mut dot = 0.0f32;
            let kr = k_base + j * k.stride(2usize);
            for d in 0..dim {
                dot += f32::cast_from(q.buf[q_base + d * q.stride(2usize)])
                    * f32::cast_from(k.buf[kr + d * k.stride(3usize)]);
            }
            if comptime!(masked) {
                valid = pad.buf[row * pad.stride(0usize) + j * pad.stride(1usize)] == 0.0;
            }
            if valid {
                s = dot * scale;
            }
        }
        reduce[unit] = s;
        sync_cube();
        reduce_shared(&mut reduce, true);
        let m_new = f32::max(m, reduce[0]);
        sync_cube();
        let mut p = 0.0f32;
        if valid {
            p = f32::exp(s - m_new);
        }
        scores[unit] = p;
        reduce[unit] = p;
        sync_cube();
        reduce_shared(&mut reduce, false);
        let correction = f32::exp(m - m_new);
        l = l * correction + reduce[0];
        m = m_new;
        let chunk = min(UNITS, keys - start);
        if unit < dim {
            let mut sum = 0.0f32;
            for i in 0..chunk {
                sum += scores[i]
                    * f32::cast_from(
                        v.buf[v_base + (start + i) * v.stride(2usize) + unit * v.stride(3usize)],
                    );
            }
            acc = acc * correction + sum;
        }
        // Nobody may overwrite `scores` or `reduce` for the next chunk before all have read.
        sync_cube();
        start += UNITS;
    }
    if unit < dim {
        let o = acc / f32::max(l, f32::new(f32::MIN_POSITIVE));
        out.buf[row * out.stride(0usize) + (head * dim + unit) * out.stride(1usize)] =
            F::cast_from(o);
    }
}

/// `softmax(q·kᵀ · scale, masked) · v` for one query per row: `q [batch, heads, dim]`, `k` and
/// `v` `[batch, kv_heads, keys, dim]` (any strides: a view of a preallocated cache is read in
/// place), `heads` a multiple of `kv_heads` (query head `h` reads key/value head
/// `h / (heads / kv_heads)`). `pad` `[batch, keys]` f32, nonzero where the key is hidden.
/// Returns `[batch, heads · dim]` in the dtype of `q`. A row whose keys are all hidden gets
/// zeros. Arithmetic is f32.
///
/// # Panics
/// If `dim` exceeds [`UNITS`] or the shapes disagree (the caller checks).
pub fn decode_attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    pad: Option<CubeTensor<R>>,
    scale: f64,
) -> CubeTensor<R> {
    let [batch, heads, dim] = [q.meta.shape()[0], q.meta.shape()[1], q.meta.shape()[2]];
    let (kv_heads, keys) = (k.meta.shape()[1], k.meta.shape()[2]);
    assert!(
        dim <= UNITS,
        "decode_attention: head dimension {dim} > {UNITS}"
    );
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "decode_attention: {heads} query heads for {kv_heads} key/value heads"
    );
    assert_eq!(k.meta.shape()[..], [batch, kv_heads, keys, dim][..]);
    assert_eq!(v.meta.shape()[..], [batch, kv_heads, keys, dim][..]);
    let client = q.client.clone();
    let dtype = q.dtype;
    let out = empty_device_contiguous_dtype(
        client.clone(),
        q.device.clone(),
        [batch, heads * dim].into(),
        dtype,
    );
    if batch == 0 || heads == 0 || dim == 0 {
        return out;
    }
    let masked = pad.is_some();
    let pad = pad.unwrap_or_else(|| out.clone());
    // SAFETY: a cube per (query head, row) with both below their counts; units read keys
    // below `keys` and head dimensions below `dim` (the shapes checked above), `pad` only when
    // `masked` (then `[batch, keys]`), and unit `d < dim` writes its own output element.
    // Shared memory is two arrays of `UNITS` values, every access below `UNITS`.
    unsafe {
        decode_attention_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(heads as u32, batch as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            crate::strided(q),
            crate::strided(k),
            crate::strided(v),
            crate::strided(pad),
            crate::strided(out.clone()),
            keys as u32,
            dim as u32,
            (heads / kv_heads) as u32,
            scale as f32,
            masked,
            dtype.into(),
        );
    }
    out
}
