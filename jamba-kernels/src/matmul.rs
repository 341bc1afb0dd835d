//! f32 matrix products at f32 precision.
//!
//! cubek's tensor-core matmuls run f32 inputs as TF32 (a 10-bit mantissa), and Burn's autotuner
//! picks them for f32 on CUDA. That is 1e-3 relative error per product: enough to flip a
//! mixture-of-experts router's top-k choice where two experts' probabilities are within 2e-4 of
//! each other (token 94 of the `tiny-jamba-long` fixture, measured), after which that token's
//! output is simply a different function. PyTorch, the reference, keeps TF32 off for matmuls
//! by default. This runs the unit (CUDA-core) kernel instead, falling back to the naive one.

use burn_cubecl::{CubeRuntime, ops::numeric::empty_device_dtype, tensor::CubeTensor};
use cubecl::prelude::*;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{Strategy, launch_ref};
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
    let out = empty_device_dtype(client.clone(), lhs.device.clone(), shape, lhs.dtype);
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
