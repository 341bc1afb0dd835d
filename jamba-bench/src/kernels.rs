//! `jamba-bench kernels`: the selective scan, the decoding state update and the causal conv1d
//! on one backend, the path `JambaBackend` picks (the fused kernels on CubeCL backends) against
//! the tensor-op path on the same device, with achieved bandwidth against the floor.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Distribution, Tensor};
use clap::Args;
use jamba::JambaBackend;
use jamba::ops::{ConvInput, causal_conv1d_tensor_ops};
use jamba::ops::{ScanInput, selective_scan_tensor_ops};
use serde::Serialize;

use crate::{parse_shape, sync, write_rows};

/// mamba_ssm's `selective_scan_fwd` on the H200 (the table): (b, d, L) → (f32 ms, bf16 ms).
const MAMBA_SSM_H200: [((usize, usize, usize), (f64, f64)); 4] = [
    ((1, 8192, 4096), (1.215, 0.613)),
    ((1, 8192, 32768), (10.21, 5.90)),
    ((8, 4096, 2048), (2.293, 1.162)),
    ((4, 2048, 1024), (0.304, 0.155)),
];

#[derive(Args, Clone)]
pub struct KernelArgs {
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub backend: jamba::backends::BackendKind,
    /// Dtypes of the per-step inputs.
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "bf16".to_string()])]
    pub dtypes: Vec<String>,
    /// Scan shapes `b x d x L` (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["1x8192x4096".to_string(), "1x8192x32768".to_string(), "8x4096x2048".to_string(), "4x2048x1024".to_string()])]
    pub shapes: Vec<String>,
    /// SSM state size.
    #[arg(long, default_value_t = 16)]
    pub d_state: usize,
    /// Decoding state update shape `b x d`.
    #[arg(long, default_value = "64x2048")]
    pub step: String,
    /// Also time the tensor-op path up to this many `b·d·L` elements (it holds several
    /// `[b, L, d, state]` f32 tensors).
    #[arg(long, default_value_t = 70_000_000)]
    pub tensor_ops_max: usize,
    /// Timed repetitions (median reported); each runs enough calls to last `min-ms`.
    #[arg(long, default_value_t = 15)]
    pub reps: usize,
    /// Minimum duration of one timed repetition, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    pub min_ms: f64,
    /// Device-to-device copy bandwidth in GB/s, the ceiling for the bandwidth column (H200:
    /// 4,270 measured).
    #[arg(long, default_value_t = 4270.0)]
    pub peak_gbps: f64,
    /// Which measurements to run: any of scan, conv, update.
    #[arg(long, value_delimiter = ',', default_values_t = ["scan".to_string(), "conv".to_string(), "update".to_string()])]
    pub ops: Vec<String>,
    /// Write rows here as JSON (and CSV beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    op: &'static str,
    path: &'static str,
    dtype: String,
    batch: usize,
    channels: usize,
    seq: usize,
    d_state: usize,
    median_ms: f64,
    floor_bytes: u64,
    achieved_gbps: f64,
    fraction_of_peak: f64,
    reference_ms: Option<f64>,
    reference_over_ours: Option<f64>,
}

/// Median milliseconds per call of `f`, each repetition long enough to hide launch latency.
fn time_ms<B: JambaBackend>(
    device: &B::Device,
    reps: usize,
    min_ms: f64,
    mut f: impl FnMut(),
) -> jamba::Result<f64> {
    f();
    sync::<B>(device)?;
    let start = Instant::now();
    f();
    sync::<B>(device)?;
    let once = start.elapsed().as_secs_f64() * 1e3;
    let inner = ((min_ms / once.max(1e-4)).ceil() as usize).clamp(1, 10_000);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        for _ in 0..inner {
            f();
        }
        sync::<B>(device)?;
        times.push(start.elapsed().as_secs_f64() * 1e3 / inner as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn scan_input<B: JambaBackend>(
    [batch, channels, seq]: [usize; 3],
    state: usize,
    dtype: DType,
    device: &B::Device,
) -> ScanInput<B> {
    let normal = |shape: [usize; 3]| {
        Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    ScanInput {
        u: normal([batch, seq, channels]),
        delta: normal([batch, seq, channels]),
        a: Tensor::<B, 2>::random([channels, state], Distribution::Uniform(0.0, 2.0), device)
            .exp()
            .neg(),
        b: normal([batch, seq, state]),
        c: normal([batch, seq, state]),
        d: Some(Tensor::random(
            [channels],
            Distribution::Normal(1.0, 0.1),
            device,
        )),
        z: Some(normal([batch, seq, channels])),
        delta_bias: Some(Tensor::random(
            [channels],
            Distribution::Uniform(-4.0, -2.0),
            device,
        )),
        delta_softplus: true,
        initial_state: Some(Tensor::random(
            [batch, channels, state],
            Distribution::Normal(0.0, 1.0),
            device,
        )),
    }
}

pub fn run<B: JambaBackend>(args: &KernelArgs, device: &B::Device) -> jamba::Result<()> {
    let mut rows = Vec::new();
    let backend = format!("{:?}", args.backend);
    let mut push = |row: KernelRow| {
        eprintln!(
            "{:<12} {:<10} {:<5} b{:<3} d{:<5} L{:<6} {:>9.4} ms {:>8.1} GB/s ({:>5.1}% of peak){}",
            row.op,
            row.path,
            row.dtype,
            row.batch,
            row.channels,
            row.seq,
            row.median_ms,
            row.achieved_gbps,
            100.0 * row.fraction_of_peak,
            row.reference_over_ours
                .map(|r| format!("  mamba_ssm/ours {r:.2}x"))
                .unwrap_or_default()
        );
        rows.push(row);
    };
    for name in &args.dtypes {
        let dtype = jamba::backends::parse_dtype(name).map_err(jamba::JambaError::Input)?;
        if !B::supports_dtype(device, dtype) {
            eprintln!("{backend} does not support {name}: skipped");
            continue;
        }
        let size = dtype.size();
        for shape in &args.shapes {
            let [batch, channels, seq] = parse_shape::<3>(shape)?;
            let input = scan_input::<B>([batch, channels, seq], args.d_state, dtype, device);
            let floor = (4 * size * batch * channels * seq) as u64;
            let reference = MAMBA_SSM_H200
                .iter()
                .find(|(s, _)| *s == (batch, channels, seq))
                .map(|(_, (f32_ms, bf16_ms))| {
                    if dtype == DType::F32 {
                        *f32_ms
                    } else {
                        *bf16_ms
                    }
                });
            let mut paths: Vec<(&'static str, Box<dyn Fn()>)> = Vec::new();
            if args.ops.iter().any(|o| o == "scan") {
                let input = input.clone();
                paths.push((
                    "backend",
                    Box::new(move || {
                        let _ = B::selective_scan(input.clone());
                    }),
                ));
            }
            if args.ops.iter().any(|o| o == "scan") && batch * channels * seq <= args.tensor_ops_max
            {
                let input = input.clone();
                paths.push((
                    "tensor-ops",
                    Box::new(move || {
                        let _ = selective_scan_tensor_ops(input.clone());
                    }),
                ));
            }
            for (path, f) in paths {
                let ms = time_ms::<B>(device, args.reps, args.min_ms, f)?;
                let gbps = floor as f64 / ms / 1e6;
                push(KernelRow {
                    op: "scan",
                    path,
                    dtype: name.clone(),
                    batch,
                    channels,
                    seq,
                    d_state: args.d_state,
                    median_ms: ms,
                    floor_bytes: floor,
                    achieved_gbps: gbps,
                    fraction_of_peak: gbps / args.peak_gbps,
                    reference_ms: reference,
                    reference_over_ours: reference.map(|r| r / ms),
                });
            }

            // The conv over the same sequence (k = 4, SiLU), as the mixer runs it.
            let x = input.u.clone();
            let weight =
                Tensor::<B, 2>::random([channels, 4], Distribution::Normal(0.0, 0.5), device);
            let conv = |x: Tensor<B, 3>| ConvInput {
                x,
                weight: weight.clone(),
                bias: Some(Tensor::zeros([channels], device)),
                prefix: None,
                silu: true,
            };
            let conv_floor = (2 * size * batch * channels * seq) as u64;
            let conv_paths = if args.ops.iter().any(|o| o == "conv") {
                &[("backend", false), ("tensor-ops", true)][..]
            } else {
                &[]
            };
            for &(path, tensor_ops) in conv_paths {
                let ms = time_ms::<B>(device, args.reps, args.min_ms, || {
                    let input = conv(x.clone());
                    let _ = if tensor_ops {
                        causal_conv1d_tensor_ops(input)
                    } else {
                        B::causal_conv1d(input)
                    };
                })?;
                let gbps = conv_floor as f64 / ms / 1e6;
                push(KernelRow {
                    op: "conv1d",
                    path,
                    dtype: name.clone(),
                    batch,
                    channels,
                    seq,
                    d_state: 0,
                    median_ms: ms,
                    floor_bytes: conv_floor,
                    achieved_gbps: gbps,
                    fraction_of_peak: gbps / args.peak_gbps,
                    reference_ms: None,
                    reference_over_ours: None,
                });
            }
        }

        // One decoding step: the state update (state read and written in f32).
        if !args.ops.iter().any(|o| o == "update") {
            continue;
        }
        let [batch, channels] = parse_shape::<2>(&args.step)?;
        let input = scan_input::<B>([batch, channels, 1], args.d_state, dtype, device);
        let floor = (2 * 4 * batch * channels * args.d_state + 4 * size * batch * channels) as u64;
        for (path, tensor_ops) in [("backend", false), ("tensor-ops", true)] {
            let ms = time_ms::<B>(device, args.reps, args.min_ms, || {
                let _ = if tensor_ops {
                    selective_scan_tensor_ops(input.clone())
                } else {
                    B::selective_scan(input.clone())
                };
            })?;
            let gbps = floor as f64 / ms / 1e6;
            push(KernelRow {
                op: "state-update",
                path,
                dtype: name.clone(),
                batch,
                channels,
                seq: 1,
                d_state: args.d_state,
                median_ms: ms,
                floor_bytes: floor,
                achieved_gbps: gbps,
                fraction_of_peak: gbps / args.peak_gbps,
                reference_ms: None,
                reference_over_ours: None,
            });
        }
    }
    write_rows(args.out.as_deref(), &rows)
}
