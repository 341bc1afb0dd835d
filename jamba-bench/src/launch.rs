//! `jamba-bench launch`: what the host pays per kernel launch on a CubeCL backend, by how the
//! kernel takes its buffers (`crate::probe`): `Tensor` arguments (shape and strides in
//! the launch's dynamic metadata, which CUDA uploads through the memory pool at every launch)
//! or `Array` arguments, reusing the output or allocating a fresh one per launch, issued from
//! the caller's thread or run on CubeCL's device thread (`ComputeClient::exclusive`). A Burn
//! element-wise operation is the reference.
//!
//! A decoding step of bench-jamba-1b is ~80 launches, so each microsecond per launch is ~80 µs
//! per step.
//!
//! ```sh
//! ./jamba-bench launch --backend cuda --launches 20000
//! ```

use std::time::Instant;

use burn::tensor::{Distribution, Tensor, TensorPrimitive};
use clap::Args;
use jamba::backends::BackendKind;
use jamba::burn_cubecl::{CubeBackend, CubeRuntime, tensor::CubeTensor};
use crate::probe::{ProbeArgs, UNITS, probe_launch};

#[derive(Args, Clone)]
pub struct LaunchArgs {
    /// wgpu or cuda.
    #[arg(long, default_value = "cuda")]
    pub backend: BackendKind,
    /// Launches per measurement (after 200 untimed ones).
    #[arg(long, default_value_t = 20_000)]
    launches: usize,
    /// Rounds of all the measurements (interleaved, to see the spread).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

type K<R> = CubeBackend<R, f32, i32, u32>;

/// Microseconds per launch: (issued, finished). "Issued" stops when the last launch call
/// returns, "finished" after the device has drained.
fn per_launch<R: CubeRuntime>(
    device: &R::Device,
    n: usize,
    mut launch: impl FnMut(),
) -> jamba::Result<(f64, f64)> {
    for _ in 0..200 {
        launch();
    }
    crate::sync::<K<R>>(device)?;
    let t = Instant::now();
    for _ in 0..n {
        launch();
    }
    let issued = t.elapsed().as_secs_f64();
    crate::sync::<K<R>>(device)?;
    let finished = t.elapsed().as_secs_f64();
    Ok((issued * 1e6 / n as f64, finished * 1e6 / n as f64))
}

pub fn run<R: CubeRuntime>(args: &LaunchArgs, device: &R::Device) -> jamba::Result<()> {
    let buffer = || -> CubeTensor<R> {
        Tensor::<K<R>, 1>::random([UNITS], Distribution::Normal(0.0, 1.0), device)
            .into_primitive()
            .tensor()
    };
    let inputs: [CubeTensor<R>; 7] = std::array::from_fn(|_| buffer());
    let out = buffer();
    let burn_input = Tensor::<K<R>, 1>::from_primitive(TensorPrimitive::Float(buffer()));
    let client = out.client.clone();
    let n = args.launches;
    println!("µs per launch over {n} launches: issued / finished (one cube of {UNITS} units)");
    for round in 1..=args.rounds {
        for (name, probe) in [
            ("tensors, output reused", Some((ProbeArgs::Tensors, false))),
            ("arrays, output reused", Some((ProbeArgs::Arrays, false))),
            ("strided, output reused", Some((ProbeArgs::Strided, false))),
            ("tensors, fresh output", Some((ProbeArgs::Tensors, true))),
            ("arrays, fresh output", Some((ProbeArgs::Arrays, true))),
            ("burn add_scalar", None),
        ] {
            let mut launch = || match probe {
                Some((kind, fresh)) => {
                    let _ = probe_launch(&inputs, &out, kind, fresh);
                }
                None => {
                    let _ = burn_input.clone().add_scalar(1.0);
                }
            };
            let (issued, finished) = per_launch::<R>(device, n, &mut launch)?;
            // The same launches from CubeCL's device thread: no channel hop per operation.
            let (ex_issued, ex_finished) = client
                .exclusive(|| per_launch::<R>(device, n, &mut launch))
                .map_err(|e| jamba::JambaError::Input(format!("exclusive: {e:?}")))??;
            println!(
                "round {round}  {name:24} caller's thread {issued:6.2} / {finished:6.2}   \
                 device thread {ex_issued:6.2} / {ex_finished:6.2}"
            );
        }
    }
    Ok(())
}
