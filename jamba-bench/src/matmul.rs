//! `jamba-bench matmul`: half-precision products of a prefill's shapes (2-D) with every cubek
//! strategy named below, against Burn's own matmul (autotuned when
//! built with the `autotune` feature, cubek's default strategy otherwise), in TFLOP/s. (A fixed
//! strategy is not a model default: launched by hand, cubek compiles a kernel per shape, and the
//! MoE experts' row counts change at every call.)
//!
//! ```sh
//! ./jamba-bench matmul --backend cuda --dtype bf16 --shapes 256x1024x4096,2048x1024x4096
//! ```

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive};
use clap::Args;
use jamba::backends::{BackendKind, parse_dtype};
use jamba::burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use jamba::kernels::matmul::{Strategy, matmul_with};
use cubek::matmul::routines::{
    BlueprintStrategy, TileSizeSelection, simple_unit::SimpleUnitSelectionArgs,
};

#[derive(Args, Clone)]
pub struct MatmulArgs {
    /// wgpu or cuda.
    #[arg(long, default_value = "cuda")]
    pub backend: BackendKind,
    /// bf16 or f16 (f32 runs too, without tensor cores where TF32 is refused).
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Products `m x k x n` (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["256x1024x4096".to_string(), "2048x1024x4096".to_string(), "2048x4096x1024".to_string(), "2048x1024x2048".to_string()])]
    shapes: Vec<String>,
    /// Timed calls per measurement (after two untimed ones).
    #[arg(long, default_value_t = 20)]
    calls: usize,
}

/// Milliseconds per call, the device drained before and after the timed calls.
///
/// (Until session 9 this dropped the future that `client.sync()` returns, so the "times" were
/// how fast the host enqueued launches, ~30-40 µs whatever the product: the TFLOP/s figures of
/// `results/h200-matmul-bf16-session7.txt` are wrong.)
fn time<B: Backend>(
    device: &B::Device,
    calls: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let drain = || crate::sync::<B>(device).map_err(|e| e.to_string());
    f()?;
    f()?;
    drain()?;
    let t = Instant::now();
    for _ in 0..calls {
        f()?;
    }
    drain()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / calls as f64)
}

pub fn run<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    args: &MatmulArgs,
    device: &R::Device,
) -> jamba::Result<()> {
    type T<R, F, I, BT, const D: usize> = Tensor<CubeBackend<R, F, I, BT>, D>;
    println!(
        "shape (m x k x n), kernel, ms per call, TFLOP/s ({:?})",
        args.dtype
    );
    for shape in &args.shapes {
        let dims: Vec<usize> = shape.split('x').filter_map(|s| s.parse().ok()).collect();
        let [m, k, n] = dims[..] else {
            return Err(jamba::JambaError::Input(format!("bad shape {shape}")));
        };
        let flops = 2.0 * (m * k * n) as f64;
        let lhs = T::<R, F, I, BT, 2>::random([m, k], Distribution::Normal(0.0, 1.0), device)
            .cast(args.dtype);
        let rhs = T::<R, F, I, BT, 2>::random([k, n], Distribution::Normal(0.0, 1.0), device)
            .cast(args.dtype);
        let reference = lhs.clone().matmul(rhs.clone()).cast(DType::F32);
        let report = |name: &str, ms: Result<f64, String>| match ms {
            Ok(ms) => println!("{shape}  {name:32} {ms:9.4} {:8.1}", flops / ms / 1e9),
            Err(e) => println!(
                "{shape}  {name:32} not run: {}",
                e.lines().next().unwrap_or("")
            ),
        };
        report(
            if cfg!(feature = "autotune") {
                "burn (autotuned)"
            } else {
                "burn (cubek's default strategy)"
            },
            time::<CubeBackend<R, F, I, BT>>(device, args.calls, || {
                let _ = lhs.clone().matmul(rhs.clone());
                Ok(())
            }),
        );
        for name in STRATEGIES {
            let s = strategy(name).expect("a known name");
            let prim = |t: &T<R, F, I, BT, 2>| t.clone().into_primitive().tensor();
            let check = matmul_with(prim(&lhs), prim(&rhs), &s).and_then(|out| {
                let out: T<R, F, I, BT, 2> = Tensor::from_primitive(TensorPrimitive::Float(out));
                let err = (out.cast(DType::F32) - reference.clone())
                    .abs()
                    .max()
                    .into_scalar();
                let scale = reference.clone().abs().max().into_scalar();
                let rel = burn::tensor::ElementConversion::elem::<f32>(err)
                    / burn::tensor::ElementConversion::elem::<f32>(scale);
                if rel.is_finite() && rel < 5e-2 {
                    Ok(())
                } else {
                    Err(format!("max error {rel:.2e} of the largest output"))
                }
            });
            let ms = check.and_then(|()| {
                time::<CubeBackend<R, F, I, BT>>(device, args.calls, || {
                    matmul_with(prim(&lhs), prim(&rhs), &s).map(drop)
                })
            });
            report(name, ms);
        }
    }
    Ok(())
}

/// cubek's matmul strategies by name, for half-precision products whose kernel is chosen by
/// measurement (`jamba-bench matmul`) rather than by Burn's autotuner. Each takes f32
/// accumulation for bf16/f16 outputs.
fn strategy(name: &str) -> Option<Strategy> {
    use cubek::matmul::components::tile::TileMatmulKind::{Cmma, Mma};
    use cubek::matmul::routines::{
        double_buffering::DoubleBufferingArgs, double_unit::DoubleUnitSelectionArgs,
        ordered_double_buffering::OrderedSelectionArgs, simple::SimpleArgs,
    };
    let simple = |multi_rows, tile_matmul| {
        BlueprintStrategy::Inferred(SimpleArgs {
            multi_rows,
            tile_matmul,
        })
    };
    let ordered = |row_count, tile_matmul| {
        BlueprintStrategy::Inferred(OrderedSelectionArgs {
            partition_k: Some(2),
            row_count: Some(row_count),
            rows_per_plane: Some(2),
            tile_matmul,
        })
    };
    let double = |specialized, tile_matmul| {
        BlueprintStrategy::Inferred(DoubleBufferingArgs {
            specialized,
            tile_matmul,
        })
    };
    Some(match name {
        "simple_cyclic_cmma" => Strategy::SimpleCyclicCmma(simple(false, Cmma)),
        "simple_cyclic_mma" => Strategy::SimpleCyclicMma(simple(false, Mma)),
        "simple_cyclic_cmma_multi" => Strategy::SimpleCyclicCmma(simple(true, Cmma)),
        "simple_cyclic_mma_multi" => Strategy::SimpleCyclicMma(simple(true, Mma)),
        "ordered_double_cmma_4" => Strategy::OrderedDoubleCmma(ordered(4, Cmma)),
        "ordered_double_mma_4" => Strategy::OrderedDoubleMma(ordered(4, Mma)),
        "ordered_double_cmma_8" => Strategy::OrderedDoubleCmma(ordered(8, Cmma)),
        "ordered_double_mma_8" => Strategy::OrderedDoubleMma(ordered(8, Mma)),
        "double_cyclic_cmma" => Strategy::DoubleCyclicCmma(double(false, Cmma)),
        "double_cyclic_mma" => Strategy::DoubleCyclicMma(double(false, Mma)),
        "double_cyclic_mma_specialized" => Strategy::DoubleCyclicMma(double(true, Mma)),
        "specialized_cyclic_mma" => {
            Strategy::SpecializedCyclicMma(BlueprintStrategy::Inferred(().into()))
        }
        "simple_tma_mma" => Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(SimpleArgs {
            multi_rows: false,
            tile_matmul: Mma,
        })),
        "simple_tma_mma_multi" => Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(SimpleArgs {
            multi_rows: true,
            tile_matmul: Mma,
        })),
        "specialized_tma_mma" => {
            Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into()))
        }
        "simple_unit" => {
            Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs {
                tile_size: TileSizeSelection::MaxTileSize,
            }))
        }
        "double_unit" => {
            Strategy::DoubleUnit(BlueprintStrategy::Inferred(DoubleUnitSelectionArgs {
                tile_size: TileSizeSelection::MaxTileSize,
            }))
        }
        _ => return None,
    })
}

/// Every name [`strategy`] knows.
const STRATEGIES: [&str; 17] = [
    "simple_cyclic_cmma",
    "simple_cyclic_mma",
    "simple_cyclic_cmma_multi",
    "simple_cyclic_mma_multi",
    "ordered_double_cmma_4",
    "ordered_double_mma_4",
    "ordered_double_cmma_8",
    "ordered_double_mma_8",
    "double_cyclic_cmma",
    "double_cyclic_mma",
    "double_cyclic_mma_specialized",
    "specialized_cyclic_mma",
    "simple_tma_mma",
    "simple_tma_mma_multi",
    "specialized_tma_mma",
    "simple_unit",
    "double_unit",
];

