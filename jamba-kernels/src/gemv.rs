//! Matrix products with a few rows (a decoding step's projections): `x [rows, k] · w [k, n]`,
//! `rows <= 16`, at memory bandwidth.
//!
//! Burn's matmul ran these at ~80 GB/s on the H200 (~100 µs for one 1024 × 4096 bf16
//! projection of one row; 82% of a decoding step's device time, ncu): its kernels tile for
//! large products and leave most of the GPU idle when `rows` is 1. Here the weight is the whole
//! cost, so the work is cut along both of its dimensions: a unit per (column, slice of `k`)
//! accumulates every row's partial sum in f32 registers, consecutive units reading consecutive
//! columns (coalesced), and all of a column's slices meet in one cube's shared memory: one
//! launch. (A split form, slices spread over many cubes and summed by a second launch, streams
//! the weight closer to bandwidth but loses to the single launch where a decoding step is
//! bound by the host issuing launches: `docs/optimisation-history.md`, session 15.)

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use burn_std::DType;
use cubecl::prelude::Tensor as CubeArg;
use cubecl::prelude::*;

/// The most rows [`gemv`] takes (a decoding step of 16 rows: above 8, Burn's matmul ran
/// bench-jamba-1b's 1024 × 65,536 head for 16 rows in 1.8 ms on the H200).
pub const MAX_ROWS: usize = 16;
/// The shared memory a cube of [`gemv`] may use for its partial sums, in f32s.
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
///
/// With `normed`, row `r` of the input is not `x` but its RMSNorm with weight `norm` (of
/// `x + update` with `add`), computed as it is read ([`normed_value`]) from `inv_rms` (one
/// per row at `r · COLS · slices`, from [`row_inv_rms`]). Without it, `update`, `norm` and
/// `inv_rms` are not read.
#[cube]
#[allow(clippy::too_many_arguments)]
fn cube_column_sum<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    col: usize,
    active: bool,
    k: usize,
    k_per_slice: usize,
    update: &CubeArg<F>,
    norm: &CubeArg<F>,
    inv_rms: &SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
    #[comptime] normed: bool,
    #[comptime] add: bool,
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
    let mut inv = Array::<f32>::new(rows);
    if comptime!(normed) {
        #[unroll]
        for r in 0..rows {
            inv[r] = inv_rms[r * COLS * slices];
        }
    }
    let mut kk = k0;
    while kk < k1 {
        let wv = f32::cast_from(w[kk * w.stride(0) + col * w.stride(1)]);
        #[unroll]
        for r in 0..rows {
            let mut xv = f32::cast_from(x[r * x.stride(0) + kk * x.stride(1)]);
            if comptime!(normed) {
                xv = normed_value::<F>(xv, update, norm, inv[r], r, kk, add);
            }
            acc[r] += xv * wv;
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

/// [`cube_column_sum`] of `x` itself (not normalised: `x` stands in for the update and the
/// norm, and the statistics' buffer is not read).
#[cube]
#[allow(clippy::too_many_arguments)]
fn plain_column_sum<F: Float>(
    x: &CubeArg<F>,
    w: &CubeArg<F>,
    col: usize,
    active: bool,
    k: usize,
    k_per_slice: usize,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
) -> SharedMemory<f32> {
    let unused = SharedMemory::<f32>::new(1usize);
    cube_column_sum(
        x,
        w,
        col,
        active,
        k,
        k_per_slice,
        x,
        x,
        &unused,
        rows,
        slices,
        false,
        false,
    )
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

/// Halves `rows` sums of the cube's partials (`part[r · units + u]` for each unit `u`, the
/// cube's `units` a power of two) down to entry `r · units`, ending with a barrier.
#[cube]
fn halve_row_sums(part: &mut SharedMemory<f32>, #[comptime] rows: usize, #[comptime] units: usize) {
    let u = UNIT_POS as usize;
    let mut half = CUBE_DIM as usize / 2;
    while half > 0 {
        if u < half {
            #[unroll]
            for r in 0..rows {
                part[r * units + u] = part[r * units + u] + part[r * units + u + half];
            }
        }
        sync_cube();
        half /= 2;
    }
}

/// Element `kk` of row `r` of the normalised input given `x`'s element `xv`: the residual sum
/// rounded to the dtype (with `add`), times `inv`, rounded, times the norm's weight, rounded,
/// as [`crate::norm::add_rms_norm`] stores it.
#[cube]
fn normed_value<F: Float>(
    xv: f32,
    update: &CubeArg<F>,
    weight: &CubeArg<F>,
    inv: f32,
    r: usize,
    kk: usize,
    #[comptime] add: bool,
) -> f32 {
    let mut v = xv;
    if comptime!(add) {
        v = f32::cast_from(F::cast_from(
            v + f32::cast_from(update[r * update.stride(0) + kk * update.stride(1)]),
        ));
    }
    let normed = F::cast_from(v * inv);
    f32::cast_from(F::cast_from(
        f32::cast_from(normed) * f32::cast_from(weight[kk * weight.stride(0)]),
    ))
}

/// Each row's `1 / sqrt(mean((x + update)²) + eps)` (the sum rounded to the dtype first, with
/// `add`), over all `k` of the row, computed by the whole cube: its `units` units (a power of
/// two, the cube's size) stride over the row and add their squares in shared memory. Row `r`'s
/// value is entry `r · units` of the returned buffer.
#[cube]
fn row_inv_rms<F: Float>(
    x: &CubeArg<F>,
    update: &CubeArg<F>,
    k: usize,
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] add: bool,
) -> SharedMemory<f32> {
    let u = UNIT_POS as usize;
    let mut part = SharedMemory::<f32>::new(rows * units);
    #[unroll]
    for r in 0..rows {
        let mut acc = 0.0f32;
        let mut j = u;
        while j < k {
            let mut v = f32::cast_from(x[r * x.stride(0) + j * x.stride(1)]);
            if comptime!(add) {
                v = f32::cast_from(F::cast_from(
                    v + f32::cast_from(update[r * update.stride(0) + j * update.stride(1)]),
                ));
            }
            acc += v * v;
            j += units;
        }
        part[r * units + u] = acc;
    }
    sync_cube();
    halve_row_sums(&mut part, rows, units);
    // Each row's statistic in place of its sum (unit r reads and writes only entry r · units).
    // (A separate `rows`-long shared buffer read back wrong values for 4 rows on wgpu.)
    if u < rows {
        part[u * units] = 1.0f32 / f32::sqrt(part[u * units] / f32::cast_from(k) + eps);
    }
    sync_cube();
    part
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
    let shared = plain_column_sum(x, w, col, active, k, k_per_slice, rows, slices);
    write_rows(&shared, bias, y, col, active, rows, slices, has_bias);
}

/// [`gemv_single_kernel`] of the RMSNorm of `x` (of `x + update` with `add`) with weight
/// `norm`: each cube first computes every row's statistic over all of `k` (`units`, its size,
/// a power of two), then normalises the input as it reads it.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_normed_kernel<F: Float>(
    x: &CubeArg<F>,
    update: &CubeArg<F>,
    norm: &CubeArg<F>,
    w: &CubeArg<F>,
    bias: &CubeArg<F>,
    y: &mut CubeArg<F>,
    k: u32,
    n: u32,
    k_per_slice: u32,
    eps: f32,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
    #[comptime] has_bias: bool,
    #[comptime] add: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (k, n, k_per_slice) = (k as usize, n as usize, k_per_slice as usize);
    let col = ((CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) * COLS as u32 + UNIT_POS_X) as usize;
    let active = col < n;
    let inv_rms = row_inv_rms::<F>(x, update, k, eps, rows, COLS * slices, add);
    let shared = cube_column_sum(
        x,
        w,
        col,
        active,
        k,
        k_per_slice,
        update,
        norm,
        &inv_rms,
        rows,
        slices,
        true,
        add,
    );
    write_rows(&shared, bias, y, col, active, rows, slices, has_bias);
}

/// The single forms' last step: unit `(lane, s)` writes its column of rows `s, s + slices, …`
/// (the sum over the cube's slices, plus the bias), rounded to the output dtype.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_rows<F: Float>(
    shared: &SharedMemory<f32>,
    bias: &CubeArg<F>,
    y: &mut CubeArg<F>,
    col: usize,
    active: bool,
    #[comptime] rows: usize,
    #[comptime] slices: usize,
    #[comptime] has_bias: bool,
) {
    if active {
        let mut b = 0.0f32;
        if comptime!(has_bias) {
            b = f32::cast_from(bias[col * bias.stride(0)]);
        }
        let mut r = UNIT_POS_Y as usize;
        while r < rows {
            y[r * y.stride(0) + col * y.stride(1)] =
                F::cast_from(row_sum(shared, r, rows, slices) + b);
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

/// `x [rows, k] · w [k, n] (+ bias [n])` for `rows <= MAX_ROWS`, f32 accumulation; `x`, `w`
/// and `bias` share one float dtype, which the result `[rows, n]` has too. Any strides. One
/// launch: a cube per 32 columns with up to 32 units per column (as many as the device allows
/// in a cube), each summing a slice of `k`, the slices added in shared memory (the vector
/// form, [`takes_vector_form`], where the operands allow it).
///
/// # Panics
/// If `rows` exceeds [`MAX_ROWS`] or the shapes disagree (the caller checks).
pub fn gemv<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    launch_single(x, None, w, bias)
}

/// The most rows [`gemv_normed`] takes: its statistics hold `rows` floats per unit of a cube
/// in shared memory.
pub const NORMED_MAX_ROWS: usize = 4;

/// An RMSNorm for [`gemv_normed`] to apply to its input as it reads it.
#[derive(Debug, Clone)]
pub struct PreNorm<R: CubeRuntime> {
    /// Added to `x` first (a residual connection not yet stored), the shape and dtype of `x`;
    /// the sum is rounded to that dtype as an addition would store it.
    pub update: Option<CubeTensor<R>>,
    /// The norm's weight, `[k]`, the dtype of `x`.
    pub weight: CubeTensor<R>,
    /// The norm's epsilon.
    pub eps: f64,
}

/// `rms_norm(x (+ update)) · w (+ bias)` in one launch, for `rows <= NORMED_MAX_ROWS`: what
/// [`crate::norm::add_rms_norm`] then [`gemv`] give, without the norm's launch or its
/// output. Each cube computes the rows' statistics over all of `k` itself (a few reads of
/// `k` values from cache per unit), then normalises each input as [`gemv`] reads it.
/// The rounding is the norm kernel's: the sum, the normalised value and its product with the
/// weight each rounded to the dtype.
///
/// # Panics
/// If `rows` exceeds [`NORMED_MAX_ROWS`] or the shapes disagree (the caller checks).
pub fn gemv_normed<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm: PreNorm<R>,
    w: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    launch_single(x, Some(norm), w, bias)
}

fn launch_single<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm: Option<PreNorm<R>>,
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
    if try_launch_vec(&x, norm.as_ref(), &w, bias.as_ref(), &y) {
        return y;
    }
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    // As many slices as the device allows in a cube, up to 32 and to 32 KiB of shared memory
    // (normalised: a power of two, for the statistics' halving sum).
    let mut slices = (max_units / COLS)
        .min(SHARED_FLOATS / (COLS * rows.max(1)))
        .clamp(1, 32);
    if norm.is_some() {
        assert!(
            rows <= NORMED_MAX_ROWS,
            "gemv_normed takes at most {NORMED_MAX_ROWS} rows, got {rows}"
        );
        slices = 1 << slices.ilog2();
    }
    let k_per_slice = k.div_ceil(slices).max(1);
    let col_cubes = n.div_ceil(COLS);
    let count = CubeCount::Static(
        col_cubes.min(MAX_CUBES_X) as u32,
        1,
        col_cubes.div_ceil(MAX_CUBES_X) as u32,
    );
    let dim = CubeDim::new_2d(COLS as u32, slices as u32);
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| y.clone());
    let Some(norm) = norm else {
        // SAFETY: units whose column is past `n` read nothing and write nothing; the others
        // read rows below `rows` of `x` and `k` indices below `k` (each slice's range is
        // clamped), and unit `(lane, s)` writes that column of rows `s, s + slices, …` below
        // `rows` of `y`. Shared memory holds `slices · COLS · rows` values (at most
        // `SHARED_FLOATS`), written once per unit before the barrier.
        unsafe {
            gemv_single_kernel::launch_unchecked::<R>(
                &client,
                count,
                dim,
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
        return y;
    };
    assert_eq!(
        norm.weight.meta.shape()[0],
        k,
        "gemv_normed: the norm's weight"
    );
    let add = norm.update.is_some();
    if let Some(update) = &norm.update {
        assert_eq!(
            update.meta.shape(),
            x.meta.shape(),
            "gemv_normed: x and update"
        );
    }
    // Without an update the kernel reads none: `x` stands in.
    let update = norm.update.unwrap_or_else(|| x.clone());
    // SAFETY: as `gemv_single_kernel`; besides, every unit reads elements of its rows below
    // `k` of `x` and `update` (the shape of `x`) and of the norm's `[k]` weight. The
    // statistics take `rows · COLS · slices` floats of shared memory (at most 4 · 1024), the
    // cube's units being `COLS · slices`, a power of two as the halving sum needs.
    unsafe {
        gemv_normed_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            update.into_tensor_arg(),
            norm.weight.into_tensor_arg(),
            w.into_tensor_arg(),
            bias.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            k as u32,
            n as u32,
            k_per_slice as u32,
            norm.eps as f32,
            rows,
            slices,
            has_bias,
            add,
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

/// Bytes of weight each unit of the vector form loads at once.
const VEC_BYTES: usize = 16;
/// Floats of shared memory the vector form's cross-slice sum may use (`units · width`): with
/// [`VEC_STAGE_FLOATS`] (normalised forms), 32 KiB in all, which wgpu's devices give a cube
/// too; without a stage, [`VEC_SUM_FLOATS_ALONE`].
pub(crate) const VEC_SUM_FLOATS: usize = 2048;
/// The same for the forms that stage nothing (32 KiB).
pub(crate) const VEC_SUM_FLOATS_ALONE: usize = 8192;
/// Units per cube of the vector forms at most. On the H200 a b1 bf16 step of bench-jamba-1b
/// ran at 777.7 tokens/s with 512, 761.2 with 256 and 695.4 / 728.2 with 1,024 (the expert
/// gate/up kernel's 1,024-unit cubes took 37 µs for two experts; `jamba-bench/RESULTS.md`,
/// session 17).
const VEC_MAX_UNITS: usize = 512;
/// Floats of shared memory the vector form may stage its normalised input rows in.
pub(crate) const VEC_STAGE_FLOATS: usize = 6144;

/// The vector form of [`gemv`] and [`gemv_normed`], for `rows <= NORMED_MAX_ROWS`: each
/// unit loads `width` consecutive columns of a weight row at once (16 bytes), `unroll` rows of
/// the weight before it uses any, so that enough loads are in flight to stream the weight.
/// Unit `(lane, s)` of cube `c` owns column vector `c · lanes + lane` and the `k` indices
/// `s, s + slices, …`; a warp's loads of one step cover `lanes · 16` contiguous bytes of
/// several weight rows. The slices' sums meet in shared memory (`[width, units]`, one row of
/// the output at a time).
///
/// With `normed`, the cube first stages the RMSNorm of `x` (of `x + update` with `add`) as f32
/// in shared memory, `stage` floats per row (rounded as [`crate::norm::add_rms_norm`] stores
/// it), and the inner loop reads it there: the norm costs one pass over the input per cube
/// instead of three loads per weight row. Without it the input is read from `x`.
///
/// The buffers are `Array`s and their strides scalars: a `Tensor` argument's shape and strides
/// are launch metadata that CUDA uploads at every launch through the memory pool.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_vec_kernel<F: Float, N: Size>(
    x: &Array<F>,
    update: &Array<F>,
    norm: &Array<F>,
    w: &Array<Vector<F, N>>,
    w1: &Array<Vector<F, N>>,
    w2: &Array<Vector<F, N>>,
    bias: &Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    y1: &mut Array<Vector<F, N>>,
    y2: &mut Array<Vector<F, N>>,
    x0: u32,
    x1: u32,
    u0: u32,
    u1: u32,
    norm_stride: u32,
    w_stride: u32,
    k: u32,
    n_vec: u32,
    eps: f32,
    seg_cubes0: u32,
    seg_cubes1: u32,
    n_vec1: u32,
    n_vec2: u32,
    w_stride1: u32,
    w_stride2: u32,
    #[comptime] rows: usize,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] slices: usize,
    #[comptime] unroll: usize,
    #[comptime] stage: usize,
    #[comptime] normed: bool,
    #[comptime] add: bool,
    #[comptime] has_bias: bool,
    #[comptime] segments: usize,
    #[define(F)] _dtype: StorageType,
) {
    let k = k as usize;
    let (x0, x1) = (x0 as usize, x1 as usize);
    let units = comptime!(lanes * slices);
    let lane = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let u = UNIT_POS as usize;
    let grid_cube = (CUBE_POS_Z * CUBE_COUNT_X + CUBE_POS_X) as usize;
    // Several products of one input (segments): the first `seg_cubes0` cubes own `w`'s
    // columns, the next `seg_cubes1` `w1`'s, the rest `w2`'s. The segment is the same for a
    // whole cube, so its branches below hold no barrier in divergent flow.
    let (c0, c1) = (seg_cubes0 as usize, seg_cubes1 as usize);
    let in1 = comptime!(segments > 1) && grid_cube >= c0;
    let in2 = comptime!(segments > 2) && grid_cube >= c0 + c1;
    let seg = select(in2, 2usize, select(in1, 1usize, 0usize));
    let cube = select(
        in2,
        grid_cube - c0 - c1,
        select(in1, grid_cube - c0, grid_cube),
    );
    let n_vec = select(
        in2,
        n_vec2 as usize,
        select(in1, n_vec1 as usize, n_vec as usize),
    );
    let w_stride = select(
        in2,
        w_stride2 as usize,
        select(in1, w_stride1 as usize, w_stride as usize),
    );
    let cv = cube * lanes + lane;
    let active = cv < n_vec;
    let mut red = SharedMemory::<f32>::new(comptime!(units * width));
    let mut xs = SharedMemory::<f32>::new(comptime!(rows * stage));

    if comptime!(normed) {
        let (u0, u1) = (u0 as usize, u1 as usize);
        // The residual sums (rounded) into the stage, their squares into the sum buffer.
        #[unroll]
        for r in 0..rows {
            let mut sq = 0.0f32;
            let mut j = u;
            while j < k {
                let mut v = f32::cast_from(x[r * x0 + j * x1]);
                if comptime!(add) {
                    v = f32::cast_from(F::cast_from(v + f32::cast_from(update[r * u0 + j * u1])));
                }
                xs[r * stage + j] = v;
                sq += v * v;
                j += units;
            }
            red[r * units + u] = sq;
        }
        normalise_staged(
            &mut xs,
            &mut red,
            norm,
            norm_stride as usize,
            eps,
            k,
            rows,
            units,
            stage,
        );
    }

    let mut acc = Array::<f32>::new(comptime!(rows * width));
    #[unroll]
    for i in 0..rows * width {
        acc[i] = 0.0;
    }
    if active {
        let mut wv = Array::<Vector<F, N>>::new(unroll);
        let mut kk = s;
        while kk < k {
            if comptime!(segments > 1) {
                if seg == 0 {
                    load_weight_rows(w, 0, w_stride, cv, kk, k, &mut wv, slices, unroll);
                } else if seg == 1 {
                    load_weight_rows(w1, 0, w_stride, cv, kk, k, &mut wv, slices, unroll);
                } else {
                    load_weight_rows(w2, 0, w_stride, cv, kk, k, &mut wv, slices, unroll);
                }
            } else {
                load_weight_rows(w, 0, w_stride, cv, kk, k, &mut wv, slices, unroll);
            }
            #[unroll]
            for q in 0..unroll {
                let kq = kk + q * slices;
                if kq < k {
                    let wq = wv[q];
                    #[unroll]
                    for r in 0..rows {
                        let xv = if comptime!(normed) {
                            xs[r * stage + kq]
                        } else {
                            f32::cast_from(x[r * x0 + kq * x1])
                        };
                        #[unroll]
                        for l in 0..width {
                            acc[r * width + l] += xv * f32::cast_from(wq[l]);
                        }
                    }
                }
            }
            kk += unroll * slices;
        }
    }

    // One output row at a time; slice 0 writes the row's vector.
    let mut total = Array::<f32>::new(width);
    #[unroll]
    for r in 0..rows {
        slice_totals(&mut red, &acc, r * width, &mut total, width, lanes, units);
        if s == 0 && active {
            let mut out = Vector::<F, N>::empty();
            if comptime!(has_bias) {
                let b = bias[cv];
                #[unroll]
                for l in 0..width {
                    out[l] = F::cast_from(total[l] + f32::cast_from(b[l]));
                }
            } else {
                #[unroll]
                for l in 0..width {
                    out[l] = F::cast_from(total[l]);
                }
            }
            if comptime!(segments > 1) {
                if seg == 0 {
                    y[r * n_vec + cv] = out;
                } else if seg == 1 {
                    y1[r * n_vec + cv] = out;
                } else {
                    y2[r * n_vec + cv] = out;
                }
            } else {
                y[r * n_vec + cv] = out;
            }
        }
    }
}

/// The second half of an RMSNorm staged in shared memory: with each row's residual sums in
/// `xs` (`stage` floats a row, this unit's entries `u, u + units, …`) and this unit's sums of
/// their squares at `red[r · units + u]`, turns the staged values into the normalised input
/// (the value times the row's `1 / sqrt(mean + eps)`, rounded, times the norm's weight,
/// rounded, as [`crate::norm::add_rms_norm`] stores it). Starts and ends with a barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalise_staged<F: Float>(
    xs: &mut SharedMemory<f32>,
    red: &mut SharedMemory<f32>,
    norm: &Array<F>,
    norm_stride: usize,
    eps: f32,
    k: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] stage: usize,
) {
    let u = UNIT_POS as usize;
    sync_cube();
    halve_row_sums(red, rows, units);
    let mut inv = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        inv[r] = 1.0f32 / f32::sqrt(red[r * units] / f32::cast_from(k) + eps);
    }
    // Each unit normalises the entries it staged; the barrier also ends the reads of `red`.
    #[unroll]
    for r in 0..rows {
        let mut j = u;
        while j < k {
            let scaled = F::cast_from(xs[r * stage + j] * inv[r]);
            xs[r * stage + j] = f32::cast_from(F::cast_from(
                f32::cast_from(scaled) * f32::cast_from(norm[j * norm_stride]),
            ));
            j += units;
        }
    }
    sync_cube();
}

/// The vector forms' weight loads of one step: the vectors at column vector `cv` of weight
/// rows `kk, kk + slices, …` (`unroll` of them, those below `k`) into `wv`, all issued before
/// any is used; the rows start every `row_stride` vectors from `base`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_weight_rows<F: Float, N: Size>(
    w: &Array<Vector<F, N>>,
    base: usize,
    row_stride: usize,
    cv: usize,
    kk: usize,
    k: usize,
    wv: &mut Array<Vector<F, N>>,
    #[comptime] slices: usize,
    #[comptime] unroll: usize,
) {
    #[unroll]
    for q in 0..unroll {
        let kq = kk + q * slices;
        if kq < k {
            wv[q] = w[base + kq * row_stride + cv];
        }
    }
}

/// The vector forms' sum over a cube's slices: each unit's `width` partial sums
/// `acc[base..base + width]` halved in shared memory `red` (`[width, units]`: consecutive
/// units in consecutive banks), the totals of its lane given to slice 0's units in `total`
/// (the other units get partial values). Ends with a barrier: `red` is free again.
#[cube]
pub(crate) fn slice_totals(
    red: &mut SharedMemory<f32>,
    acc: &Array<f32>,
    #[comptime] base: usize,
    total: &mut Array<f32>,
    #[comptime] width: usize,
    #[comptime] lanes: usize,
    #[comptime] units: usize,
) {
    let u = UNIT_POS as usize;
    let s = UNIT_POS_Y as usize;
    #[unroll]
    for l in 0..width {
        red[l * units + u] = acc[base + l];
    }
    sync_cube();
    let mut half = CUBE_DIM_Y as usize / 2;
    while half > 0 {
        if s < half {
            #[unroll]
            for l in 0..width {
                red[l * units + u] = red[l * units + u] + red[l * units + u + half * lanes];
            }
        }
        sync_cube();
        half /= 2;
    }
    let lane = UNIT_POS_X as usize;
    #[unroll]
    for l in 0..width {
        total[l] = red[l * units + lane];
    }
    sync_cube();
}

/// The vector forms' weight rows in flight per unit.
pub(crate) const VEC_UNROLL: usize = 4;

/// The elements of `dtype` in one 16-byte vector, or `None` where the vector forms do not run
/// (not a float dtype).
pub(crate) fn vec_width(dtype: DType) -> Option<usize> {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        .then(|| VEC_BYTES / dtype.size())
}

/// A buffer's first byte is 16-byte aligned (the vector loads need it).
pub(crate) fn aligned<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    t.handle.offset_start.unwrap_or(0) % VEC_BYTES as u64 == 0
}

/// The rows of staged input the vector form's shared memory holds for this `k` (normalised
/// forms stage `k` rounded up to a multiple of 1,024 floats per row).
pub(crate) fn vec_stage(k: usize) -> usize {
    k.next_multiple_of(1024)
}

/// Whether [`gemv`] / [`gemv_normed`] take the vector form for these operands: at most
/// [`NORMED_MAX_ROWS`] rows of a float dtype, the weight's rows contiguous, `n` and the row
/// stride multiples of the 16-byte vector's width and the weight's start aligned, a contiguous
/// bias, and (normalised) the rows fitting the shared-memory stage.
pub fn takes_vector_form<R: CubeRuntime>(
    x: &CubeTensor<R>,
    norm: Option<&PreNorm<R>>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
) -> bool {
    let (rows, k, n) = (x.meta.shape()[0], x.meta.shape()[1], w.meta.shape()[1]);
    let Some(width) = vec_width(x.dtype) else {
        return false;
    };
    let w_strides = w.meta.strides();
    let stage = if norm.is_some() { vec_stage(k) } else { 1 };
    (1..=NORMED_MAX_ROWS).contains(&rows)
        && (1..u32::MAX as usize).contains(&k)
        && n % width == 0
        && w_strides[1] == 1
        && w_strides[0] % width == 0
        && aligned(w)
        && bias.is_none_or(|b| b.meta.strides()[0] == 1 && aligned(b))
        && rows * stage <= VEC_STAGE_FLOATS
        && norm.is_none_or(|p| {
            p.weight.meta.shape()[0] == k
                && p.update
                    .as_ref()
                    .is_none_or(|u| u.meta.shape() == x.meta.shape())
        })
}

/// The cube of a vector form over `n_vec` column vectors and `k` weight rows: `(lanes,
/// slices)`. Two lanes (32 contiguous bytes, a memory sector) where the columns are few, for
/// more cubes, four otherwise; as many slices as the device allows in a cube and the
/// cross-slice sum's `sum_floats` hold (`lanes · slices · width`), a power of two, no more
/// than `k` needs, and at most [`VEC_MAX_UNITS`].
pub(crate) fn vec_cube<R: CubeRuntime>(
    client: &ComputeClient<R>,
    n_vec: usize,
    k: usize,
    width: usize,
    sum_floats: usize,
) -> (usize, usize) {
    let max_units = (client.properties().hardware.max_units_per_cube as usize)
        .min(sum_floats / width)
        .min(VEC_MAX_UNITS)
        .max(2);
    let lanes = if n_vec >= 512 { 4 } else { 2 };
    let slices = (1usize << (max_units / lanes).ilog2()).min(k.next_power_of_two());
    (lanes, slices)
}

/// Runs the vector form where [`takes_vector_form`] says so; returns `false`, having launched
/// nothing, otherwise.
fn try_launch_vec<R: CubeRuntime>(
    x: &CubeTensor<R>,
    norm: Option<&PreNorm<R>>,
    w: &CubeTensor<R>,
    bias: Option<&CubeTensor<R>>,
    y: &CubeTensor<R>,
) -> bool {
    if !takes_vector_form(x, norm, w, bias) {
        return false;
    }
    launch_vec(
        x,
        norm,
        std::slice::from_ref(w),
        bias,
        std::slice::from_ref(y),
    );
    true
}

/// Launches the vector form over one to three weights of the same input (segments of one
/// grid: the cubes of each weight's columns in turn), each writing its own output; a bias only
/// with one weight. The caller checked [`takes_vector_form`] for each weight.
fn launch_vec<R: CubeRuntime>(
    x: &CubeTensor<R>,
    norm: Option<&PreNorm<R>>,
    ws: &[CubeTensor<R>],
    bias: Option<&CubeTensor<R>>,
    ys: &[CubeTensor<R>],
) {
    let segments = ws.len();
    assert!(
        (1..=3).contains(&segments) && ys.len() == segments && (bias.is_none() || segments == 1),
        "launch_vec: {segments} weights, {} outputs",
        ys.len()
    );
    let width = vec_width(x.dtype).expect("takes_vector_form checked the dtype");
    let unroll = VEC_UNROLL;
    let (rows, k) = (x.meta.shape()[0], x.meta.shape()[1]);
    let dtype = x.dtype;
    let stage = if norm.is_some() { vec_stage(k) } else { 1 };
    let client = x.client.clone();
    let n_vecs: Vec<usize> = ws.iter().map(|w| w.meta.shape()[1] / width).collect();
    let w_strides: Vec<u32> = ws
        .iter()
        .map(|w| (w.meta.strides()[0] / width) as u32)
        .collect();
    let sum_floats = if norm.is_some() {
        VEC_SUM_FLOATS
    } else {
        VEC_SUM_FLOATS_ALONE
    };
    let (lanes, slices) = vec_cube(&client, n_vecs.iter().sum(), k, width, sum_floats);
    let seg_cubes: Vec<usize> = n_vecs.iter().map(|n| n.div_ceil(lanes)).collect();
    let cubes: usize = seg_cubes.iter().sum();
    let count = CubeCount::Static(
        cubes.min(MAX_CUBES_X) as u32,
        1,
        cubes.div_ceil(MAX_CUBES_X) as u32,
    );
    let dim = CubeDim::new_2d(lanes as u32, slices as u32);
    let strides = |t: &CubeTensor<R>| (t.meta.strides()[0] as u32, t.meta.strides()[1] as u32);
    let (update, norm_weight, eps, add) = match norm {
        Some(p) => (
            p.update.clone().unwrap_or_else(|| x.clone()),
            p.weight.clone(),
            p.eps as f32,
            p.update.is_some(),
        ),
        None => (x.clone(), x.clone(), 0.0, false),
    };
    let norm_stride = if norm.is_some() {
        norm_weight.meta.strides()[0] as u32
    } else {
        0
    };
    let has_bias = bias.is_some();
    let bias = bias.cloned().unwrap_or_else(|| ys[0].clone());
    // Segments past the given weights are never reached: the first weight stands in.
    let seg = |i: usize| i.min(segments - 1);
    // SAFETY: units whose column vector is past their weight's `n / width` read no weight and
    // write nothing. The others read weight rows below `k` (the loop's bound) at vector `cv` of
    // a row whose `n / width` vectors are contiguous and aligned (checked by the caller), rows
    // below `rows` of `x` and `update` at indices below `k` through their strides, `k` entries
    // of the norm's weight, and vector `cv` of a contiguous bias; slice 0 writes vector `cv` of
    // each row of its segment's output (`[rows, n]`, contiguous). A cube's segment follows
    // from its position: the first `seg_cubes[0]` cubes, the next `seg_cubes[1]`, the rest,
    // each segment's cubes covering its columns. Shared memory: `units · width` floats (at
    // most VEC_SUM_FLOATS, also holding `rows · units` statistics as rows <= width) and
    // `rows · stage` (at most VEC_STAGE_FLOATS); `units` is `lanes · slices`, a power of two,
    // as the halving sums need.
    unsafe {
        gemv_vec_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            x.clone().into_array_arg(),
            update.clone().into_array_arg(),
            norm_weight.into_array_arg(),
            ws[0].clone().into_array_arg(),
            ws[seg(1)].clone().into_array_arg(),
            ws[seg(2)].clone().into_array_arg(),
            bias.into_array_arg(),
            ys[0].clone().into_array_arg(),
            ys[seg(1)].clone().into_array_arg(),
            ys[seg(2)].clone().into_array_arg(),
            strides(x).0,
            strides(x).1,
            strides(&update).0,
            strides(&update).1,
            norm_stride,
            w_strides[0],
            k as u32,
            n_vecs[0] as u32,
            eps,
            seg_cubes[0] as u32,
            seg_cubes[seg(1)] as u32,
            n_vecs[seg(1)] as u32,
            n_vecs[seg(2)] as u32,
            w_strides[seg(1)],
            w_strides[seg(2)],
            rows,
            width,
            lanes,
            slices,
            unroll,
            stage,
            norm.is_some(),
            add,
            has_bias,
            segments,
            dtype.into(),
        );
    }
}

/// Several normalised projections of one input in one launch: `rms_norm(x (+ update)) · wᵢ`
/// for up to three bias-free weights (an attention layer's `q_proj`, `k_proj` and `v_proj`),
/// each cube owning columns of one weight, where [`gemv_normed`] takes a launch per weight.
/// Each output as [`gemv_normed`]'s. Returns `None`, having launched nothing, unless every
/// weight takes the vector form ([`takes_vector_form`]).
///
/// # Panics
/// If no weight or more than three are given, or the shapes disagree (the caller checks).
pub fn gemv_normed_many<R: CubeRuntime>(
    x: CubeTensor<R>,
    norm: PreNorm<R>,
    ws: Vec<CubeTensor<R>>,
) -> Option<Vec<CubeTensor<R>>> {
    assert!(
        (1..=3).contains(&ws.len()),
        "gemv_normed_many: {} weights",
        ws.len()
    );
    let rows = x.meta.shape()[0];
    for w in &ws {
        check_shapes(&x, w);
    }
    assert_eq!(
        norm.weight.meta.shape()[0],
        x.meta.shape()[1],
        "gemv_normed_many: the norm's weight"
    );
    if rows == 0
        || ws.iter().any(|w| w.meta.shape()[1] == 0)
        || !ws
            .iter()
            .all(|w| takes_vector_form(&x, Some(&norm), w, None))
    {
        return None;
    }
    let specs: Vec<([usize; 2], DType)> = ws
        .iter()
        .map(|w| ([rows, w.meta.shape()[1]], x.dtype))
        .collect();
    let specs: Vec<(&[usize], DType)> = specs.iter().map(|(s, d)| (&s[..], *d)).collect();
    let ys = crate::empty_many(&x.client, &x.device, &specs);
    launch_vec(&x, Some(&norm), &ws, None, &ys);
    Some(ys)
}
