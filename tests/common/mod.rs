//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod scan_problem;

use std::path::PathBuf;

/// `../shared/fixtures` relative to the project root, or `$JAMBA_FIXTURES` (for test binaries
/// run on another machine, such as the GPU runner).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("JAMBA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

/// `../shared/configs` relative to the project root.
pub fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/configs")
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

/// A seed that differs from run to run (printed, so a failure can be replayed with
/// `JAMBA_TEST_SEED`).
pub fn fresh_seed() -> u64 {
    let seed = std::env::var("JAMBA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random seed: {seed} (set JAMBA_TEST_SEED={seed} to replay)");
    seed
}
