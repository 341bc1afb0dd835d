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
//!
//! Where the head dimension and the cache's strides are whole 16-byte vectors
//! ([`takes_vector_form`]), [`decode_attention_vec_kernel`] runs instead: a unit scores whole
//! keys with all of a key row's loads in flight, the scores stay in shared memory, and the
//! values are read 16 bytes at a time by (vector, slice of keys) units.

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

/// The vector form of [`decode_attention_kernel`]: keys and values read 16 bytes at a time, all
/// of a key row's loads in flight together. A cube per (row, query head) of [`UNITS`] units:
/// each unit scores the keys `unit, unit + UNITS, …` (the query staged in shared memory, the
/// scores kept there, at most [`MAX_KEYS`]); the cube takes their maximum and the sum of the
/// weights; then unit `(lane, slice)` accumulates value vector `lane` over keys `slice, slice +
/// slices, …`, and the slices' sums meet in shared memory. The scalar kernel walked a chunk's
/// keys with a unit per key looping over the head dimension, then a unit per dimension looping
/// over the chunk's keys: 76 µs for 512 keys of bench-jamba-1b on the H200.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decode_attention_vec_kernel<F: Float, N: Size>(
    q: &crate::Strided<F>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    pad: &crate::Strided<f32>,
    out: &mut Array<Vector<F, N>>,
    k0: u32,
    k1: u32,
    k2: u32,
    v0: u32,
    v1: u32,
    v2: u32,
    keys: u32,
    group: u32,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] masked: bool,
    #[define(F)] _dtype: StorageType,
) {
    let keys = keys as usize;
    let dvec = comptime!(dim / width);
    let slices = comptime!(UNITS / lanes);
    let head = CUBE_POS_X as usize;
    let heads = CUBE_COUNT_X as usize;
    let row = CUBE_POS_Y as usize;
    let kv = head / group as usize;
    let unit = UNIT_POS as usize;
    let k_base = row * k0 as usize + kv * k1 as usize;
    let v_base = row * v0 as usize + kv * v1 as usize;

    let mut qs = SharedMemory::<f32>::new(dim);
    if unit < dim {
        qs[unit] = f32::cast_from(
            q.buf[row * q.stride(0usize) + head * q.stride(1usize) + unit * q.stride(2usize)],
        );
    }
    sync_cube();

    // Scores, and this unit's maximum of them. No infinities (WGSL has no literal for them): a
    // hidden key scores the lowest finite value, and gets weight 0 explicitly below.
    let mut scores = SharedMemory::<f32>::new(MAX_KEYS);
    let mut reduce = SharedMemory::<f32>::new(UNITS);
    let mut m = f32::new(f32::MIN);
    let mut j = unit;
    while j < keys {
        let mut kr = Array::<Vector<F, N>>::new(dvec);
        let row_start = k_base + j * k2 as usize;
        #[unroll]
        for i in 0..dvec {
            kr[i] = k[row_start + i];
        }
        let mut dot = 0.0f32;
        #[unroll]
        for i in 0..dvec {
            let kv_i = kr[i];
            #[unroll]
            for l in 0..width {
                dot += qs[i * width + l] * f32::cast_from(kv_i[l]);
            }
        }
        let mut s = dot * scale;
        if comptime!(masked) {
            if pad.buf[row * pad.stride(0usize) + j * pad.stride(1usize)] != 0.0 {
                s = f32::new(f32::MIN);
            }
        }
        scores[j] = s;
        m = f32::max(m, s);
        j += UNITS;
    }
    reduce[unit] = m;
    sync_cube();
    reduce_shared(&mut reduce, true);
    let m_all = reduce[0];
    sync_cube();
    let mut l = 0.0f32;
    let mut j = unit;
    while j < keys {
        let mut p = f32::exp(scores[j] - m_all);
        if comptime!(masked) {
            if pad.buf[row * pad.stride(0usize) + j * pad.stride(1usize)] != 0.0 {
                p = 0.0;
            }
        }
        scores[j] = p;
        l += p;
        j += UNITS;
    }
    reduce[unit] = l;
    sync_cube();
    reduce_shared(&mut reduce, false);
    let l_all = reduce[0];

    // The weighted values: lane `lane` of the head dimension's vectors, keys `slice, slice +
    // slices, …`, four loads in flight.
    let lane = UNIT_POS_X as usize;
    let slice = UNIT_POS_Y as usize;
    let mut acc = Array::<f32>::new(width);
    #[unroll]
    for i in 0..width {
        acc[i] = 0.0;
    }
    if lane < dvec {
        let mut vv = Array::<Vector<F, N>>::new(4usize);
        let mut jj = slice;
        while jj < keys {
            #[unroll]
            for t in 0..4usize {
                let j = jj + t * slices;
                if j < keys {
                    vv[t] = v[v_base + j * v2 as usize + lane];
                }
            }
            #[unroll]
            for t in 0..4usize {
                let j = jj + t * slices;
                if j < keys {
                    let (p, vt) = (scores[j], vv[t]);
                    #[unroll]
                    for i in 0..width {
                        acc[i] += p * f32::cast_from(vt[i]);
                    }
                }
            }
            jj += comptime!(4 * slices);
        }
    }
    let mut red = SharedMemory::<f32>::new(comptime!(UNITS * width));
    let mut total = Array::<f32>::new(width);
    crate::gemv::slice_totals(&mut red, &acc, 0usize, &mut total, width, lanes, UNITS);
    if slice == 0 && lane < dvec {
        let inv = 1.0f32 / f32::max(l_all, f32::new(f32::MIN_POSITIVE));
        let mut out_v = Vector::<F, N>::empty();
        #[unroll]
        for l in 0..width {
            out_v[l] = F::cast_from(total[l] * inv);
        }
        out[(row * heads + head) * dvec + lane] = out_v;
    }
}

/// The vector width [`decode_attention`] reads `k` and `v` with, or `None` where it takes the
/// scalar kernel: the head dimension and every stride but the last (which must be 1) whole
/// 16-byte vectors, both buffers aligned, and at most [`MAX_KEYS`] keys.
fn vec_form<R: CubeRuntime>(k: &CubeTensor<R>, v: &CubeTensor<R>) -> Option<usize> {
    let width = crate::gemv::vec_width(k.dtype)?;
    let dim = k.meta.shape()[3];
    let fits = |t: &CubeTensor<R>| {
        let strides = t.meta.strides();
        strides[3] == 1 && strides[..3].iter().all(|s| s % width == 0) && crate::gemv::aligned(t)
    };
    (dim % width == 0 && k.meta.shape()[2] <= MAX_KEYS && fits(k) && fits(v)).then_some(width)
}

/// Whether [`decode_attention`] reads keys and values 16 bytes at a time for these tensors
/// (rather than one element at a time).
pub fn takes_vector_form<R: CubeRuntime>(k: &CubeTensor<R>, v: &CubeTensor<R>) -> bool {
    vec_form(k, v).is_some()
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
    if let Some(width) = vec_form(&k, &v) {
        let dvec = dim / width;
        let lanes = dvec.next_power_of_two();
        let ks = k.meta.strides().to_vec();
        let vs = v.meta.strides().to_vec();
        // SAFETY: a cube per (query head, row), both below their counts, of `lanes · (UNITS /
        // lanes)` = UNITS units (`lanes` a power of two ≤ UNITS as `dim ≤ UNITS`); key rows
        // `j < keys ≤ MAX_KEYS` (the scores' length) of `dim / width` vectors from their
        // row's start, strides whole vectors (checked); value vectors `lane < dim / width`;
        // `q` at `unit < dim`; `pad` only when `masked` (then `[batch, keys]`); slice 0's lanes
        // below `dim / width` write their vector of `out` (`[batch, heads · dim]`,
        // contiguous).
        unsafe {
            decode_attention_vec_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(heads as u32, batch as u32, 1),
                CubeDim::new_2d(lanes as u32, (UNITS / lanes) as u32),
                width,
                crate::strided(q),
                k.into_array_arg(),
                v.into_array_arg(),
                crate::strided(pad),
                out.clone().into_array_arg(),
                (ks[0] / width) as u32,
                (ks[1] / width) as u32,
                (ks[2] / width) as u32,
                (vs[0] / width) as u32,
                (vs[1] / width) as u32,
                (vs[2] / width) as u32,
                keys as u32,
                (heads / kv_heads) as u32,
                scale as f32,
                dim,
                width,
                lanes,
                masked,
                dtype.into(),
            );
        }
        return out;
    }
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
