//! `jamba-bench plot`: draws the rows of `jamba-bench paper` as PNG and SVG, one figure per
//! question of the paper: prefill throughput against prompt length (and where memory runs out),
//! decode throughput against context and against batch size, and cache bytes against context;
//! and prints the summary tables of `paper` again (throughput ratios, cache ratios).
//!
//! ```text
//! jamba-bench plot results/h200-paper.json --out-dir jamba-bench/plots --prefix h200
//! ```

use std::path::{Path, PathBuf};

use clap::Args;
use jamba::{JambaConfig, JambaError};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::paper::PaperRow;

#[derive(Args, Clone)]
pub struct PlotArgs {
    /// JSON written by `jamba-bench paper --out`.
    input: PathBuf,
    /// Folder for the figures.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Prefix of the file names (e.g. the machine).
    #[arg(long, default_value = "paper")]
    prefix: String,
    /// Config files of the plotted configurations, for the analytic cache curves (matched to
    /// the rows by file name).
    #[arg(long, value_delimiter = ',', default_values = [
        "../shared/configs/bench-jamba-1b.config.json",
        "../shared/configs/bench-transformer-1b.config.json",
        "../shared/configs/bench-mamba-1b.config.json",
    ])]
    configs: Vec<PathBuf>,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

type Res = Result<(), String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

pub fn run(args: &PlotArgs) -> jamba::Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JambaError::Io { path, source }
    };
    let text = std::fs::read_to_string(&args.input).map_err(io(&args.input))?;
    let rows: Vec<PaperRow> = serde_json::from_str(&text)
        .map_err(|e| JambaError::Input(format!("{}: {e}", args.input.display())))?;
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let configs: Vec<(String, JambaConfig)> = args
        .configs
        .iter()
        .filter(|p| p.exists())
        .map(|p| Ok((crate::config_name(p), JambaConfig::from_file(p)?)))
        .collect::<jamba::Result<_>>()?;
    crate::paper::print_summary(&rows);
    std::fs::create_dir_all(&args.out_dir).map_err(io(&args.out_dir))?;
    let figures = [
        ("prefill-throughput", prefill_figure(&rows)),
        (
            "decode-throughput-vs-context",
            decode_panels(
                &rows,
                |r| r.batch,
                |r| r.context,
                "batch",
                "context (tokens)",
            ),
        ),
        (
            "decode-throughput-vs-batch",
            decode_panels(&rows, |r| r.context, |r| r.batch, "context", "batch size"),
        ),
        ("cache-vs-context", cache_figure(&rows, &configs)),
    ];
    for (name, panels) in figures {
        let base = args.out_dir.join(format!("{}-{name}", args.prefix));
        let png = base.with_extension("png");
        let svg = base.with_extension("svg");
        draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &panels)
            .and_then(|_| draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &panels))
            .map_err(|e| JambaError::Input(format!("drawing {}: {e}", base.display())))?;
        eprintln!("wrote {} and {}", png.display(), svg.display());
    }
    Ok(())
}

const SIZE: (u32, u32) = (1200, 520);

/// One log-log chart of a figure; a figure is one or more side by side.
struct Panel {
    title: String,
    x_label: &'static str,
    y_label: &'static str,
    x_ticks: Vec<usize>,
    series: Vec<Series>,
}

/// Draws `panels` side by side on `root` (any plotters backend: PNG and SVG share this code).
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, panels: &[Panel]) -> Res {
    root.fill(&WHITE).map_err(err)?;
    if panels.is_empty() {
        root.titled("no data", ("sans-serif", 18)).map_err(err)?;
    }
    for (panel, area) in panels
        .iter()
        .zip(root.split_evenly((1, panels.len().max(1))))
    {
        chart(&area, panel)?;
    }
    root.present().map_err(err)
}

fn configs_of(rows: &[PaperRow]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in rows {
        if !v.contains(&r.config) {
            v.push(r.config.clone());
        }
    }
    v
}

fn color(i: usize) -> RGBColor {
    [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ][i % 4]
}

fn lighter(c: RGBColor) -> RGBColor {
    let mix = |v: u8| ((v as u16 + 255) / 2) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

fn k_label(v: usize) -> String {
    if v >= 1024 && v % 1024 == 0 {
        format!("{}K", v / 1024)
    } else {
        v.to_string()
    }
}

fn subtitle(rows: &[PaperRow]) -> String {
    rows.first()
        .map(|r| format!("{} {}", r.backend, r.dtype))
        .unwrap_or_default()
}

/// One series of a log-log chart.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    /// Drawn as a line (measured points get markers too).
    markers: bool,
}

/// A log-log line chart in `area`, with x ticks at the given values.
fn chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> Res {
    let Panel {
        title,
        x_label,
        y_label,
        x_ticks,
        series,
    } = panel;
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .collect();
    let (xmin, xmax) = x_ticks.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| {
        (a.min(x as f64), b.max(x as f64))
    });
    let (ymin, ymax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(_, y)| (a.min(y), b.max(y)));
    if all.is_empty() || xmin >= xmax {
        return area
            .titled(&format!("{title}: no data"), ("sans-serif", 18))
            .map(|_| ())
            .map_err(err);
    }
    let (ymin, ymax) = (ymin / 2.0, ymax * 2.0);
    // x is drawn as log2(x) on a linear axis so that the ticks fall on the measured powers of
    // two and read as 1K, 4K, ….
    let (lo, hi) = (xmin.log2() - 0.5, xmax.log2() + 0.5);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, (ymin..ymax).log_scale())
        .map_err(err)?;
    let ticks = x_ticks.to_vec();
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc(*x_label)
        .y_desc(*y_label)
        .x_labels(((hi - lo).ceil() as usize + 1).max(2))
        .x_label_formatter(&move |x| {
            ticks
                .iter()
                .find(|&&t| ((t as f64).log2() - x).abs() < 1e-6)
                .map(|&t| k_label(t))
                .unwrap_or_default()
        })
        .y_label_formatter(&|y| format_si(*y))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .map(|(x, y)| (x.log2(), y))
            .collect();
        let c = s.color;
        let style = ShapeStyle::from(&c).stroke_width(2);
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if s.markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(err)
}

fn format_si(v: f64) -> String {
    let (div, unit) = if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "K")
    } else {
        (1.0, "")
    };
    let x = v / div;
    if x >= 10.0 || x == x.round() {
        format!("{x:.0}{unit}")
    } else {
        format!("{x:.1}{unit}")
    }
}

fn distinct(values: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = values.collect();
    v.sort();
    v.dedup();
    v
}

/// Suffix of a series label naming the points that could not run.
fn failures(rows: &[&PaperRow], what: impl Fn(&PaperRow) -> usize) -> String {
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| format!("{} at {}", r.status, k_label(what(r))))
        .collect();
    if failed.is_empty() {
        String::new()
    } else {
        format!(" ({})", failed.join(", "))
    }
}

/// Tokens/s against `x_of` of `points`, a line per configuration of `rows` (in their order),
/// its label naming the points that could not run.
fn throughput_series(
    rows: &[PaperRow],
    points: &[&PaperRow],
    x_of: fn(&PaperRow) -> usize,
) -> Vec<Series> {
    configs_of(rows)
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mine: Vec<&PaperRow> = points.iter().copied().filter(|r| &r.config == c).collect();
            Series {
                label: format!("{c}{}", failures(&mine, x_of)),
                color: color(i),
                points: mine
                    .iter()
                    .filter(|r| r.status == "ok")
                    .map(|r| (x_of(r) as f64, r.tokens_per_sec))
                    .collect(),
                markers: true,
            }
        })
        .collect()
}

fn prefill_figure(rows: &[PaperRow]) -> Vec<Panel> {
    let prefill: Vec<&PaperRow> = rows.iter().filter(|r| r.phase == "prefill").collect();
    vec![Panel {
        title: format!("Prefill throughput, batch 1 ({})", subtitle(rows)),
        x_label: "prompt length (tokens)",
        y_label: "tokens/s",
        x_ticks: distinct(prefill.iter().map(|r| r.context)),
        series: throughput_series(rows, &prefill, |r| r.context),
    }]
}

/// Small multiples: one panel per value of `panel_of`, x = `x_of`, a line per configuration.
fn decode_panels(
    rows: &[PaperRow],
    panel_of: fn(&PaperRow) -> usize,
    x_of: fn(&PaperRow) -> usize,
    panel_name: &str,
    x_label: &'static str,
) -> Vec<Panel> {
    let decode: Vec<&PaperRow> = rows.iter().filter(|r| r.phase == "decode").collect();
    let panels = distinct(decode.iter().map(|r| panel_of(r)));
    let ticks = distinct(decode.iter().map(|r| x_of(r)));
    panels
        .iter()
        .map(|p| {
            let mine: Vec<&PaperRow> = decode
                .iter()
                .copied()
                .filter(|r| panel_of(r) == *p)
                .collect();
            let series = throughput_series(rows, &mine, x_of);
            Panel {
                title: format!("decode, {panel_name} {} ({})", k_label(*p), subtitle(rows)),
                x_label,
                y_label: "tokens/s",
                x_ticks: ticks.clone(),
                series,
            }
        })
        .collect()
}

fn cache_figure(rows: &[PaperRow], configs: &[(String, JambaConfig)]) -> Vec<Panel> {
    let dtype_bytes = match rows.first().map(|r| r.dtype.as_str()) {
        Some("f32") => 4,
        _ => 2,
    };
    let ticks: Vec<usize> = (10..=18).map(|p| 1usize << p).collect();
    let mut series = Vec::new();
    for (i, name) in configs_of(rows).iter().enumerate() {
        if let Some((_, config)) = configs.iter().find(|(n, _)| n == name) {
            series.push(Series {
                label: format!("{name}, analytic"),
                color: color(i),
                points: ticks
                    .iter()
                    .map(|&t| {
                        (
                            t as f64,
                            config.cache_size(1, t, dtype_bytes).total() as f64,
                        )
                    })
                    .collect(),
                markers: false,
            });
        }
        let measured: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| &r.config == name && r.status == "ok" && r.batch == 1)
            .map(|r| (r.context as f64, r.cache_used_bytes as f64))
            .collect();
        if !measured.is_empty() {
            series.push(Series {
                label: format!("{name}, measured"),
                color: lighter(color(i)),
                points: measured,
                markers: true,
            });
        }
    }
    vec![Panel {
        title: format!(
            "Cache bytes for one sequence ({dtype_bytes}-byte keys and values, f32 SSM state)"
        ),
        x_label: "context (tokens)",
        y_label: "bytes",
        x_ticks: ticks,
        series,
    }]
}
