//! `jamba-bench matmul`: half-precision products of a prefill's shapes (2-D) with every cubek
//! strategy `jamba_kernels::matmul::strategy` names, against Burn's own matmul (autotuned when
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
use jamba::kernels::matmul::{STRATEGIES, matmul_with, strategy};

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
