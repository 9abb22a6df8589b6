//! Test support for xlb: network namespaces, a BPF_PROG_TEST_RUN runner, a packet
//! builder, and a handle on a running `xlb` process.

pub mod agent;
pub mod bird;
pub mod cfg;
pub mod container;
pub mod fakeapi;
pub mod fragment;
pub mod frr;
pub mod natlab;
pub mod netns;
pub mod packet;
pub mod peer;
pub mod rows;
pub mod segment;
pub mod testrun;
pub mod topology;
pub mod traffic;

use std::sync::atomic::{AtomicU32, Ordering};

/// Privileged tests (BPF, netns) need root. Outside CI they skip loudly; with
/// `CI=true` a missing privilege is a failure, never a skip.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged test needs root, and CI=true forbids skipping it");
    }
    eprintln!("\n!!!! SKIPPED: privileged test needs root (BPF, netns). Run as root to test the datapath. !!!!\n");
    false
}

/// A name unique across parallel tests and processes, short enough for an interface
/// name (15 bytes): `{prefix}{pid % 100000}{n}`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Appends one line of counts for the test run's reliability summary
/// (`target/reliability.jsonl`, printed by scripts/test.sh).
pub fn report(test: &str, counts: serde_json::Value) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/reliability.jsonl");
    let line = serde_json::json!({"test": test, "counts": counts}).to_string() + "\n";
    // One write of one line with O_APPEND: lines from parallel tests do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A config file with no services, for an agent that only attaches (a peer program
/// for native XDP_TX, or a parser under test): `xlb run` needs a config or
/// `--kubernetes`. Removed on drop.
pub struct EmptyConfig(std::path::PathBuf);

impl EmptyConfig {
    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for EmptyConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn empty_config() -> EmptyConfig {
    let p = std::env::temp_dir().join(format!("{}.yaml", unique_name("xe")));
    std::fs::write(&p, "services: []\n").expect("writing the empty config");
    EmptyConfig(p)
}

/// A directory of the test's own (a pin path, a scratch directory), removed with
/// everything in it on drop, even after a panic.
pub struct RemoveOnDrop(pub std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
