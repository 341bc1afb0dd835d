//! Matrix products with a few rows (a decoding step's projections): `x [rows, k] · w [k, n]`,
//! `rows <= 16`, at memory bandwidth.
//!
//! Burn's matmul ran these at ~80 GB/s on the H200 (~100 µs for one 1024 × 4096 bf16
//! projection of one row; 82% of a decoding step's device time, ncu): its kernels tile for
//! large products and leave most of the GPU idle when `rows` is 1. Here the weight is the whole
//! cost, so the work is cut along both of its dimensions: a unit per (column, slice of `k`)
//! accumulates every row's partial sum in f32 registers, consecutive units reading consecutive
//! columns (coalesced). The default form ([`gemv_single`]) keeps all of a column's slices in
//! one cube and sums them in shared memory: one launch. The split form ([`gemv_split`]) spreads
//! the slices over many cubes (about 2^18 units in all) and a second launch sums the cubes'
//! partial sums, adds the bias and rounds to the output dtype.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use burn_std::DType;
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;

/// The most rows [`gemv`] takes (a decoding step of 16 rows: above 8, Burn's matmul ran
/// bench-jamba-1b's 1024 × 65,536 head for 16 rows in 1.8 ms on the H200).
pub const MAX_ROWS: usize = 16;
/// The shared memory a cube of [`gemv_single`] may use for its partial sums, in f32s.
const SHARED_FLOATS: usize = 8192;
/// Columns per cube (x), slices of `k` per cube (y): 256 units.
pub(crate) const COLS: usize = 32;
pub(crate) const SLICES: usize = 8;
/// Units to aim for: enough loads in flight to stream the weight at bandwidth.
const TARGET_UNITS: usize = 1 << 18;
/// The fewest `k` per slice (below it the partial sums cost more than they save).
const MIN_K_PER_SLICE: usize = 16;
/// Cubes along x before they continue along z (wgpu allows 65,535 per dimension).
const MAX_CUBES_X: usize = 65_535;

/// What both forms share: unit `(lane, slice)` of a cube of `COLS × slices` units sums its
/// slice of `k` for column `col` and every row into shared memory (`[slices, rows, COLS]`),
/// which it returns after the cube's barrier; [`row_sum`] adds a row's slices. Rows
/// `UNIT_POS_Y, UNIT_POS_Y + slices, …` are that unit's to finish. Slice `s` of cube row
/// `CUBE_POS_Y` covers `k` from `(CUBE_POS_Y · slices + s) · k_per_slice`. (Loading four
/// weights before using them, by hand, made the H200's decoding GEMVs 1.5× slower: NVRTC
/// schedules this plain loop better.) Units past the last column (`!active`) stay for
/// the shared-memory sum but read nothing.
#[cube]
#[allow(clippy::too_many_arguments)]
fn cube_column_sum<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    col: usize,
    active: bool,
    k: usize,
    k_per_slice: usize,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
) -> SharedMemory<f32> {
    let unit_slice = UNIT_POS_Y as usize;
    let k0 = (CUBE_POS_Y as usize * slices + unit_slice) * k_per_slice;
    let mut k1 = min(k0 + k_per_slice, k);
    if !active {
        k1 = k0;
    }
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        acc[r] = 0.0;
    }
    let mut kk = k0;
    while kk < k1 {
        let wv = f32::cast_from(w[kk * w.stride(0) + col * w.stride(1)]);
        #[unroll]
        for r in 0..rows {
            acc[r] += f32::cast_from(x[r * x.stride(0) + kk * x.stride(1)]) * wv;
        }
        kk += 1;
    }
    let mut shared = SharedMemory::<f32>::new(slices * COLS * rows);
    let lane = UNIT_POS_X as usize;
    #[unroll]
    for r in 0..rows {
        shared[(unit_slice * rows + r) * COLS + lane] = acc[r];
    }
    sync_cube();
    shared
}

/// Row `r`'s sum over the cube's slices from [`cube_column_sum`]'s shared memory, for this
/// unit's lane.
#[cube]
fn row_sum(
    shared: &SharedMemory<f32>,
    r: usize,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
) -> f32 {
    let lane = UNIT_POS_X as usize;
    let mut sum = 0.0f32;
    #[unroll]
    for s in 0..slices {
        sum += shared[(s * rows + r) * COLS + lane];
    }
    sum
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_partial_kernel<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    partial: &mut CubeArg<f32>,
    k: u32,
    n: u32,
    k_per_slice: u32,
    #[comptime] rows: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (k, n, k_per_slice) = (k as usize, n as usize, k_per_slice as usize);
    let col = ((CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) * COLS as u32 + UNIT_POS_X) as usize;
    let active = col < n;
    // The cube's slices of k are summed in shared memory: the reduction launch then reads one
    // partial per cube of slices instead of one per slice (64 reads per output for a
    // 1024 × 4096 weight made it the larger half of the product's time).
    let shared = cube_column_sum(x, w, col, active, k, k_per_slice, rows, SLICES);
    if active {
        let mut r = UNIT_POS_Y as usize;
        while r < rows {
            partial[(CUBE_POS_Y as usize * rows + r) * n + col] = row_sum(&shared, r, rows, SLICES);
            r += SLICES;
        }
    }
}

#[cube(launch_unchecked)]
fn gemv_reduce_kernel<F: Float>(
    partial: &CubeArg<f32>,
    bias: &CubeArg<F>,
    y: &mut CubeArg<F>,
    n: u32,
    slices: u32,
    #[comptime] rows: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (n, slices) = (n as usize, slices as usize);
    let i = (CUBE_POS_Y * CUBE_COUNT_X * CUBE_DIM_X + ABSOLUTE_POS_X) as usize;
    if i >= rows * n {
        terminate!();
    }
    let (r, col) = (i / n, i % n);
    let mut acc = 0.0f32;
    for s in 0..slices {
        acc += partial[(s * rows + r) * n + col];
    }
    if comptime!(has_bias) {
        acc += f32::cast_from(bias[col * bias.stride(0)]);
    }
    y[r * y.stride(0) + col * y.stride(1)] = F::cast_from(acc);
}

/// The one-launch form: one cube along y, whose `slices` units per column split all of `k`
/// between them, so no partial sums leave the cube.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_single_kernel<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    bias: &CubeArg<F>,
    y: &mut CubeArg<F>,
    k: u32,
    n: u32,
    k_per_slice: u32,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (k, n, k_per_slice) = (k as usize, n as usize, k_per_slice as usize);
    let col = ((CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) * COLS as u32 + UNIT_POS_X) as usize;
    let active = col < n;
    let shared = cube_column_sum(x, w, col, active, k, k_per_slice, rows, slices);
    if active {
        let mut b = 0.0f32;
        if comptime!(has_bias) {
            b = f32::cast_from(bias[col * bias.stride(0)]);
        }
        let mut r = UNIT_POS_Y as usize;
        while r < rows {
            y[r * y.stride(0) + col * y.stride(1)] =
                F::cast_from(row_sum(&shared, r, rows, slices) + b);
            r += slices;
        }
    }
}

/// How [`gemv`] cuts a problem: `k` per slice and the number of slices (a multiple of the
/// slices per cube).
pub(crate) fn plan(k: usize, n: usize) -> (usize, usize) {
    let columns = n.div_ceil(COLS) * COLS;
    let wanted = (TARGET_UNITS / columns).clamp(1, k.div_ceil(MIN_K_PER_SLICE).max(1));
    let k_per_slice = k.div_ceil(wanted).max(1);
    let slices = k.div_ceil(k_per_slice).div_ceil(SLICES) * SLICES;
    (k_per_slice, slices)
}

/// How [`gemv`] runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvForm {
    /// One launch: each cube owns its columns and all of `k` ([`gemv_single`]).
    Single,
    /// Two launches: partial sums over slices of `k` from many cubes, then their sum
    /// ([`gemv_split`]).
    Split,
}

/// The form [`gemv`] uses: `JAMBA_GEMV=single|split`, by default single. A decoding step on
/// a GPU is bound by the host issuing launches, not by the device reading weights, so one
/// launch that streams the weight at a fraction of the bandwidth beats two that stream it at
/// most of it: on the H200, bf16 decoding at batch 1 went from ~397 to ~514 tokens/s
/// (bench-jamba-1b, context 512), batch 16 unchanged (`jamba-bench/RESULTS.md`, session 15).
pub fn gemv_form() -> GemvForm {
    static FORM: std::sync::OnceLock<GemvForm> = std::sync::OnceLock::new();
    *FORM.get_or_init(|| match std::env::var("JAMBA_GEMV").as_deref() {
        Ok("split") => GemvForm::Split,
        _ => GemvForm::Single,
    })
}

/// `x [rows, k] · w [k, n] (+ bias [n])` for `rows <= MAX_ROWS`, f32 accumulation; `x`, `w`
/// and `bias` share one float dtype, which the result `[rows, n]` has too. Any strides. In
/// the form [`gemv_form`] names.
///
/// # Panics
/// If `rows` exceeds [`MAX_ROWS`] or the shapes disagree (the caller checks).
pub fn gemv<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    match gemv_form() {
        GemvForm::Single => gemv_single(x, w, bias),
        GemvForm::Split => gemv_split(x, w, bias),
    }
}

/// [`gemv`] in one launch: a cube per 32 columns with up to 32 units per column (as many as
/// the device allows in a cube), each summing a slice of `k`, the slices added in shared
/// memory.
///
/// # Panics
/// As [`gemv`].
pub fn gemv_single<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let (rows, k, n) = check_shapes(&x, &w);
    let client = x.client.clone();
    let dtype = x.dtype;
    let y =
        empty_device_contiguous_dtype(client.clone(), x.device.clone(), [rows, n].into(), dtype);
    if rows == 0 || n == 0 {
        return y;
    }
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    // As many slices as the device allows in a cube, up to 32 and to 32 KiB of shared memory.
    let slices = (max_units / COLS)
        .min(SHARED_FLOATS / (COLS * rows.max(1)))
        .clamp(1, 32);
    let k_per_slice = k.div_ceil(slices).max(1);
    let col_cubes = n.div_ceil(COLS);
    let count = CubeCount::Static(
        col_cubes.min(MAX_CUBES_X) as u32,
        1,
        col_cubes.div_ceil(MAX_CUBES_X) as u32,
    );
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| y.clone());
    // SAFETY: units whose column is past `n` read nothing and write nothing; the others read
    // rows below `rows` of `x` and `k` indices below `k` (each slice's range is clamped), and
    // unit `(lane, s)` writes that column of rows `s, s + slices, …` below `rows` of `y`.
    // Shared memory holds `slices · COLS · rows` values (at most `SHARED_FLOATS`), written once
    // per unit before the barrier.
    unsafe {
        gemv_single_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_2d(COLS as u32, slices as u32),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            bias.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            k as u32,
            n as u32,
            k_per_slice as u32,
            rows,
            slices,
            has_bias,
            dtype.into(),
        );
    }
    y
}

fn check_shapes<R: CubeRuntime>(x: &CubeTensor<R>, w: &CubeTensor<R>) -> (usize, usize, usize) {
    let (rows, k) = (x.meta.shape()[0], x.meta.shape()[1]);
    let n = w.meta.shape()[1];
    assert!(
        rows <= MAX_ROWS,
        "gemv takes at most {MAX_ROWS} rows, got {rows}"
    );
    assert_eq!(
        w.meta.shape()[0],
        k,
        "gemv: x is [{rows}, {k}], w is {:?}",
        w.meta.shape()
    );
    (rows, k, n)
}

/// [`gemv`] in two launches, partial sums over slices of `k` from many cubes and then their
/// sum: the weight streams at most of the memory bandwidth.
///
/// # Panics
/// As [`gemv`].
pub fn gemv_split<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let (rows, k, n) = check_shapes(&x, &w);
    let client = x.client.clone();
    let dtype = x.dtype;
    let y =
        empty_device_contiguous_dtype(client.clone(), x.device.clone(), [rows, n].into(), dtype);
    if rows == 0 || n == 0 {
        return y;
    }
    if k == 0 {
        // An empty sum: zeros (plus the bias), without launching the partial kernel.
        let zeros = burn_cubecl::ops::numeric::zeros_client(
            client.clone(),
            x.device.clone(),
            [1, rows, n].into(),
            DType::F32,
        );
        launch_reduce::<R>(zeros, bias, y.clone(), rows, n, 1, dtype);
        return y;
    }
    let (k_per_slice, slices) = plan(k, n);
    let partial = empty_device_contiguous_dtype(
        client.clone(),
        x.device.clone(),
        [slices / SLICES, rows, n].into(),
        DType::F32,
    );
    let col_cubes = n.div_ceil(COLS);
    let count = CubeCount::Static(
        col_cubes.min(MAX_CUBES_X) as u32,
        (slices / SLICES) as u32,
        col_cubes.div_ceil(MAX_CUBES_X) as u32,
    );
    // SAFETY: units whose column is past `n` read and write nothing; the others read rows
    // below `rows` of `x`, `k` indices below `k` (the slice's range is clamped), and the
    // cube's unit `(lane, s)` writes that column of rows `s, s + SLICES, …` below `rows` of
    // `partial`, which has a row of partial sums per cube along y. Shared memory holds
    // `SLICES · COLS · rows` values.
    unsafe {
        gemv_partial_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_2d(COLS as u32, SLICES as u32),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            k as u32,
            n as u32,
            k_per_slice as u32,
            rows,
            dtype.into(),
        );
    }
    launch_reduce::<R>(partial, bias, y.clone(), rows, n, slices / SLICES, dtype);
    y
}

fn launch_reduce<R: CubeRuntime>(
    partial: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    y: CubeTensor<R>,
    rows: usize,
    n: usize,
    slices: usize,
    dtype: DType,
) {
    let client = y.client.clone();
    let units = 256usize;
    let cubes = (rows * n).div_ceil(units);
    let count = CubeCount::Static(
        cubes.min(MAX_CUBES_X) as u32,
        cubes.div_ceil(MAX_CUBES_X) as u32,
        1,
    );
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| y.clone());
    // SAFETY: units past `rows · n` return first; the others read `slices` partials of their
    // (row, column), which `partial` holds, and write their own element of `y`.
    unsafe {
        gemv_reduce_kernel::launch_unchecked::<R>(
            &client,
            count,
            CubeDim::new_1d(units as u32),
            partial.into_tensor_arg(),
            bias.into_tensor_arg(),
            y.into_tensor_arg(),
            n as u32,
            slices as u32,
            rows,
            has_bias,
            dtype.into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_k_with_whole_cubes_of_slices() {
        for (k, n) in [
            (1, 1),
            (5, 17),
            (1024, 4096),
            (2048, 96),
            (1024, 65536),
            (4097, 33),
        ] {
            let (per, slices) = plan(k, n);
            assert!(per * slices >= k, "k {k} n {n}: {per} x {slices}");
            assert_eq!(slices % SLICES, 0);
            assert!(
                per >= MIN_K_PER_SLICE.min(k),
                "k {k} n {n}: {per} per slice"
            );
        }
    }
}
