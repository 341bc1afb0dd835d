//! The index of each row's largest value (greedy decoding's choice over the vocabulary) in two
//! launches: blocks of the row reduced by one cube each, then the blocks' winners by one cube
//! per row. The first index wins ties, as `Tensor::argmax` does.
//!
//! Burn's argmax gives each output row one unit (a 65,536-wide row walked one value after
//! another: 1.5 ms on the H200), and composing it in two stages from Burn operations took six
//! launches (two argmaxes, two gathers, a multiply and an add).

use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use burn_std::DType;
use cubecl::prelude::*;

/// Units per cube (wgpu's limit).
const UNITS: usize = 256;
/// Values each unit of the first launch reads, all loads issued before any comparison.
const PER_UNIT: usize = 4;
/// Values per block of the first launch.
const BLOCK: usize = UNITS * PER_UNIT;
/// Cubes along x (wgpu allows 65,535 per dimension).
const MAX_CUBES_X: usize = 65_535;

/// Whether the candidate `(value, index)` beats `(best, at)`: a larger value, or an equal one
/// at a lower index (the first index wins ties).
#[cube]
fn beats(value: f32, index: u32, best: f32, at: u32) -> bool {
    value > best || (value == best && index < at)
}

/// Halves the cube's `(value, index)` pairs in shared memory down to pair 0: the larger value,
/// on ties the lower index. `units` is the cube's size, a power of two.
#[cube]
fn cube_best(value: f32, index: u32, #[comptime] units: usize) -> (f32, u32) {
    let u = UNIT_POS_X as usize;
    let mut values = SharedMemory::<f32>::new(units);
    let mut indices = SharedMemory::<u32>::new(units);
    values[u] = value;
    indices[u] = index;
    sync_cube();
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if u < half {
            let (v, i) = (values[u + half], indices[u + half]);
            if beats(v, i, values[u], indices[u]) {
                values[u] = v;
                indices[u] = i;
            }
        }
        sync_cube();
        half /= 2;
    }
    (values[0], indices[0])
}

#[cube(launch_unchecked)]
fn argmax_blocks_kernel<F: Float>(
    x: &crate::Strided<F>,
    best_values: &mut crate::Strided<f32>,
    best_indices: &mut crate::Strided<u32>,
    width: u32,
    #[define(F)] _dtype: StorageType,
) {
    // Cube (block, row); unit u reads values u, u + UNITS, … of the block. Past the row's
    // end it takes the row's first value at index 0 instead: a copy of a real candidate,
    // which changes no winner (and needs no −∞, which WGSL cannot write).
    let width = width as usize;
    let row = CUBE_POS_Y as usize;
    let block = CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let start = block * BLOCK + u;
    let mut loaded = Array::<f32>::new(PER_UNIT);
    let mut at = Array::<u32>::new(PER_UNIT);
    #[unroll]
    for q in 0..PER_UNIT {
        let mut j = start + q * UNITS;
        if j >= width {
            j = 0;
        }
        loaded[q] = f32::cast_from(x.buf[row * x.stride(0usize) + j * x.stride(1usize)]);
        at[q] = j as u32;
    }
    let mut best = loaded[0];
    let mut best_at = at[0];
    #[unroll]
    for q in 1..PER_UNIT {
        if beats(loaded[q], at[q], best, best_at) {
            best = loaded[q];
            best_at = at[q];
        }
    }
    let (value, index) = cube_best(best, best_at, UNITS);
    if u == 0 {
        let blocks = CUBE_COUNT_X as usize;
        best_values.buf[row * blocks + block] = value;
        best_indices.buf[row * blocks + block] = index;
    }
}

#[cube(launch_unchecked)]
fn argmax_rows_kernel<I: Int>(
    best_values: &crate::Strided<f32>,
    best_indices: &crate::Strided<u32>,
    out: &mut crate::Strided<I>,
    blocks: u32,
    #[define(I)] _dtype: StorageType,
) {
    // A cube per row over its blocks' winners; a unit past the last block starts from block
    // 0's (a copy of a real candidate changes no winner).
    let blocks = blocks as usize;
    let row = CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let mut best = best_values.buf[row * blocks];
    let mut at = best_indices.buf[row * blocks];
    let mut b = u;
    while b < blocks {
        let v = best_values.buf[row * blocks + b];
        let i = best_indices.buf[row * blocks + b];
        if beats(v, i, best, at) {
            best = v;
            at = i;
        }
        b += UNITS;
    }
    let (_, index) = cube_best(best, at, UNITS);
    if u == 0 {
        out.buf[row * out.stride(0usize)] = I::cast_from(index);
    }
}

/// Whether [`argmax_rows`] takes `rows` rows of `width` values (a grid of at most 65,535
/// blocks by 65,535 rows, indices in `u32`).
pub fn supports(rows: usize, width: usize) -> bool {
    width > 0
        && width < u32::MAX as usize
        && width.div_ceil(BLOCK) <= MAX_CUBES_X
        && rows <= MAX_CUBES_X
}

/// The index of the largest value of each row of `x` `[rows, width]` (any float dtype, any
/// strides; the first index on ties), as a `[rows]` tensor of
/// `int_dtype`.
///
/// # Panics
/// Where [`supports`] refuses the shape (the caller checks).
pub fn argmax_rows<R: CubeRuntime>(x: CubeTensor<R>, int_dtype: DType) -> CubeTensor<R> {
    let [rows, width] = [x.meta.shape()[0], x.meta.shape()[1]];
    assert!(supports(rows, width), "argmax_rows: {rows} rows of {width}");
    let (client, device) = (x.client.clone(), x.device.clone());
    let blocks = width.div_ceil(BLOCK);
    // The output and both scratch buffers.
    let [out, values, indices]: [CubeTensor<R>; 3] = crate::empty_many(
        &client,
        &device,
        &[
            (&[rows], int_dtype),
            (&[rows, blocks], DType::F32),
            (&[rows, blocks], DType::U32),
        ],
    )
    .try_into()
    .expect("three tensors");
    if rows == 0 {
        return out;
    }
    let dtype = x.dtype;
    // SAFETY: cube (block, row) reads row `row` (below `rows`) of `x` at indices below `width`
    // only, and unit 0 writes entry `(row, block)` of the `[rows, blocks]` buffers. Shared
    // memory holds `UNITS` pairs, the cube's size.
    unsafe {
        argmax_blocks_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(blocks as u32, rows as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            crate::strided(x),
            crate::strided(values.clone()),
            crate::strided(indices.clone()),
            width as u32,
            dtype.into(),
        );
    }
    // SAFETY: cube `row` reads that row's `blocks` entries of both buffers and unit 0 writes
    // its element of `out` (`[rows]`).
    unsafe {
        argmax_rows_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            crate::strided(values),
            crate::strided(indices),
            crate::strided(out.clone()),
            blocks as u32,
            int_dtype.into(),
        );
    }
    out
}
