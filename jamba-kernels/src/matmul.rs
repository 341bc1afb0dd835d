//! f32 matrix products at f32 precision.
//!
//! cubek's tensor-core matmuls run f32 inputs as TF32 (a 10-bit mantissa), and Burn's autotuner
//! picks them for f32 on CUDA. That is 1e-3 relative error per product: enough to flip a
//! mixture-of-experts router's top-k choice where two experts' probabilities are within 2e-4 of
//! each other (token 94 of the `tiny-jamba-long` fixture, measured), after which that token's
//! output is simply a different function. PyTorch, the reference, keeps TF32 off for matmuls
//! by default. This runs the unit (CUDA-core) kernel instead, falling back to the naive one.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::prelude::*;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
pub use cubek::matmul::launch::Strategy;
use cubek::matmul::launch::launch_ref;
use cubek::matmul::routines::{
    BlueprintStrategy, TileSizeSelection, simple_unit::SimpleUnitSelectionArgs,
};
use cubek::std::InputBinding;

/// `lhs [.., m, k] · rhs [.., k, n]` in f32 (same leading dimensions; any strides), without
/// tensor cores. Returns `[.., m, n]`, f32. Panics if neither kernel accepts the problem (the
/// naive kernel takes any shape).
pub fn matmul_f32<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
    let mut shape = lhs.meta.shape().clone();
    let rank = shape.len();
    shape[rank - 1] = rhs.meta.shape()[rank - 1];
    let client = lhs.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), lhs.device.clone(), shape, lhs.dtype);
    let f32_type = f32::as_type_native_unchecked().storage_type();
    let strategies = [
        Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs {
            tile_size: TileSizeSelection::MaxTileSize,
        })),
        Strategy::Naive,
    ];
    let mut last_error = None;
    for strategy in &strategies {
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: f32_type,
            rhs: f32_type,
            out: f32_type,
        });
        match launch_ref(
            strategy,
            &client,
            InputBinding::new(lhs.clone().binding(), f32_type),
            InputBinding::new(rhs.clone().binding(), f32_type),
            out.clone().binding(),
            &mut dtypes,
        ) {
            Ok(()) => return out,
            Err(e) => last_error = Some(format!("{strategy}: {e:?}")),
        }
    }
    panic!("no f32 matmul kernel accepts this problem: {last_error:?}")
}

/// `lhs [.., m, k] · rhs [.., k, n]` with the given cubek strategy, the output in `lhs`'s
/// dtype (f32 accumulation for half types). An error when the strategy does not take the
/// problem (shape, layout or the device's features).
pub fn matmul_with<R: CubeRuntime>(
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
    strategy: &Strategy,
) -> Result<CubeTensor<R>, String> {
    let mut shape = lhs.meta.shape().clone();
    let rank = shape.len();
    shape[rank - 1] = rhs.meta.shape()[rank - 1];
    let client = lhs.client.clone();
    let out = empty_device_contiguous_dtype(client.clone(), lhs.device.clone(), shape, lhs.dtype);
    let (lt, rt) = (lhs.dtype.into(), rhs.dtype.into());
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: lt,
        rhs: rt,
        out: lt,
    });
    launch_ref(
        strategy,
        &client,
        InputBinding::new(lhs.binding(), lt),
        InputBinding::new(rhs.binding(), rt),
        out.clone().binding(),
        &mut dtypes,
    )
    .map(|()| out)
    .map_err(|e| format!("{strategy}: {e:?}"))
}

/// The fewest rows for which [`matmul_tma`] takes a product: below it cubek's TMA kernel tiles
/// too few rows to beat the default one (H200, bf16: 52 vs 55 TFLOP/s for Burn's tuned choice
/// at 256 × 1024 × 4096, 149-151 vs ~70-110 at 2048 rows; `jamba-bench matmul`).
pub const TMA_MIN_ROWS: usize = 128;

/// `lhs [.., m, k] · rhs [.., k, n]` in half precision with cubek's warp-specialised TMA kernel
/// (`specialized_tma_mma`: among the fastest on the H200 at every prefill shape measured, and
/// a fixed choice, so no autotuning), f32 accumulation, the output in `lhs`'s dtype. `None`
/// where it does not apply, for the caller's own product: a device without the tensor memory
/// accelerator (before sm_90, wgpu), f32 operands, fewer than [`TMA_MIN_ROWS`] rows,
/// non-contiguous operands, rows not a multiple of 16 bytes (TMA's alignment), or a setup the
/// kernel refuses.
pub fn matmul_tma<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> Option<CubeTensor<R>> {
    use cubecl::ir::features::Tma;
    let half = matches!(lhs.dtype, burn_std::DType::BF16 | burn_std::DType::F16);
    let shape = lhs.meta.shape();
    let rank = shape.len();
    let (m, k, n) = (shape[rank - 2], shape[rank - 1], rhs.meta.shape()[rank - 1]);
    let aligned = k % 8 == 0 && n % 8 == 0;
    if !half
        || rhs.dtype != lhs.dtype
        || m < TMA_MIN_ROWS
        || !aligned
        || !lhs.is_contiguous()
        || !rhs.is_contiguous()
        || !lhs.client.properties().features.tma.contains(Tma::Base)
    {
        return None;
    }
    let strategy = Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into()));
    matmul_with(lhs, rhs, &strategy).ok()
}
