//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod scan_problem;

use std::path::PathBuf;

/// `../shared/fixtures` relative to the project root, or `$JAMBA_FIXTURES` (for test binaries
/// run on another machine, such as the GPU runner).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("JAMBA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    }
}

/// `../shared/configs` relative to the project root.
pub fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/configs")
}

/// The fixtures every parity test must cover; a missing one fails loudly.
pub const FIXTURES: [&str; 5] = [
    "tiny-jamba",
    "tiny-jamba-v01-pattern",
    "tiny-mamba-dense-tied",
    "tiny-jamba-bf16",
    "tiny-jamba-long",
];

/// The folder of fixture `name`, or a panic that says where it was looked for.
pub fn fixture(name: &str) -> PathBuf {
    let dir = fixtures_dir().join(name);
    assert!(
        dir.join("config.json").exists(),
        "fixture {name} is missing: looked for {} (the tests read ../shared/fixtures relative to the project root)",
        dir.display()
    );
    dir
}

/// Every fixture folder present, which must include [`FIXTURES`].
pub fn all_fixtures() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", fixtures_dir().display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.safetensors").exists())
        .collect();
    dirs.sort();
    for name in FIXTURES {
        fixture(name);
    }
    dirs
}

/// A fresh, empty temporary folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("jamba-test-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a fixture's files into a fresh temporary folder.
pub fn copy_fixture(name: &str) -> PathBuf {
    let src = fixture(name);
    let dst = temp_dir(name);
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
        let mut perms = std::fs::metadata(dst.join(path.file_name().unwrap()))
            .unwrap()
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(dst.join(path.file_name().unwrap()), perms).unwrap();
    }
    dst
}

/// A mixture of experts' operands on the host (`[in, out]` weights stacked over the experts),
/// and its definition in f64: softmax over the router's logits, each token's `top_k` most
/// probable experts (lowest index among equals), `Σⱼ pⱼ · down(silu(gate·x) · up·x)`.
#[allow(dead_code)]
pub struct MoeProblem {
    pub tokens: usize,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inner: usize,
    /// `[tokens, hidden]`.
    pub x: Vec<f32>,
    /// `[tokens, experts]`.
    pub logits: Vec<f32>,
    /// `[experts, hidden, inner]`.
    pub gate: Vec<f32>,
    /// `[experts, hidden, inner]`.
    pub up: Vec<f32>,
    /// `[experts, inner, hidden]`.
    pub down: Vec<f32>,
}

#[allow(dead_code)]
impl MoeProblem {
    /// Normal draws: `x` with unit deviation, logits with deviation 2, weights `1/√fan_in`.
    pub fn random(
        rng: &mut scan_problem::Rng,
        [tokens, experts, top_k, hidden, inner]: [usize; 5],
    ) -> Self {
        let scale = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        Self {
            tokens,
            experts,
            top_k,
            hidden,
            inner,
            x: rng.normal(tokens * hidden, 0.0, 1.0),
            logits: rng.normal(tokens * experts, 0.0, 2.0),
            gate: rng.normal(experts * hidden * inner, 0.0, scale(hidden)),
            up: rng.normal(experts * hidden * inner, 0.0, scale(hidden)),
            down: rng.normal(experts * inner * hidden, 0.0, scale(inner)),
        }
    }

    /// The output, `[tokens, hidden]`, in f64 from these (f32) values.
    pub fn expected(&self) -> Vec<f32> {
        let (experts, hidden, inner) = (self.experts, self.hidden, self.inner);
        let mut out = vec![0f32; self.tokens * hidden];
        for t in 0..self.tokens {
            let row = &self.logits[t * experts..(t + 1) * experts];
            let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let xt = &self.x[t * hidden..(t + 1) * hidden];
            for &e in &order[..self.top_k] {
                let p = (row[e] as f64 - max).exp() / sum;
                let act: Vec<f64> = (0..inner)
                    .map(|o| {
                        let (mut a, mut b) = (0f64, 0f64);
                        for (i, &xv) in xt.iter().enumerate() {
                            a += xv as f64 * self.gate[(e * hidden + i) * inner + o] as f64;
                            b += xv as f64 * self.up[(e * hidden + i) * inner + o] as f64;
                        }
                        a / (1.0 + (-a).exp()) * b
                    })
                    .collect();
                for o in 0..hidden {
                    let y: f64 = (0..inner)
                        .map(|i| act[i] * self.down[(e * inner + i) * hidden + o] as f64)
                        .sum();
                    out[t * hidden + o] += (p * y) as f32;
                }
            }
        }
        out
    }
}
