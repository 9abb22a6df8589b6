//! Developer and CI commands: `cargo xtask build-ebpf | demo | bench | image`.

mod bench;
mod demo;
mod image;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP object (release, bpfel-unknown-none) and copy it to target/bpf/xlb.o.
    BuildEbpf,
    /// Run the demo: a netns topology with xlb and live traffic (needs root).
    Demo(demo::DemoArgs),
    /// Per-packet cost against an XDP_PASS baseline, side by side (needs root).
    Bench(bench::BenchArgs),
    /// Build the container image offline (buildah, FROM scratch) and export xlb-image.tar.
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf => {
            let obj = build_ebpf()?;
            println!("{}", obj.display());
            Ok(())
        }
        Cmd::Demo(args) => demo::run(args),
        Cmd::Image(args) => image::run(args),
        Cmd::Bench(args) => {
            // Control-plane timings are the agent's code's: measure an optimized build.
            // The --quick smoke run (CI) takes the build it is given.
            if cfg!(debug_assertions) && !args.is_quick() {
                return rerun_release();
            }
            bench::run(args)
        }
    }
}

/// Runs this same command again from a release build of xtask.
fn rerun_release() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let status = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .context("running the release build of xtask")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The eBPF object is built by lb-userspace's build.rs (the single build path); this
/// runs that build and copies the object out of its OUT_DIR.
fn build_ebpf() -> Result<PathBuf> {
    check_ebpf_prerequisites()?;
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "lb-userspace",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build of lb-userspace failed");
    }
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "build-script-executed"
                && m["package_id"]
                    .as_str()
                    .is_some_and(|p| p.contains("lb-userspace"))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .context("no build-script output for lb-userspace")?;
    let target = workspace_root().join("target/bpf");
    std::fs::create_dir_all(&target)?;
    let dst = target.join("xlb.o");
    std::fs::copy(out_dir.join("xlb"), &dst).context("copying the eBPF object")?;
    Ok(dst)
}

/// What the eBPF build needs besides stable Rust: nightly with rust-src (the target is
/// built with -Z build-std=core) and bpf-linker. Checked first, so that a fresh machine
/// is told to run scripts/setup.sh rather than shown rustup's or cargo's raw message.
fn check_ebpf_prerequisites() -> Result<()> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let linker = image::which("bpf-linker").is_some();
    if let Some(missing) = missing_ebpf_prerequisites(sysroot.as_deref(), linker) {
        bail!("the eBPF build needs {missing}: run `bash scripts/setup.sh` (as root), which installs what is missing");
    }
    Ok(())
}

/// What is missing, given nightly's sysroot (None: no nightly) and whether bpf-linker
/// is on PATH.
fn missing_ebpf_prerequisites(sysroot: Option<&std::path::Path>, linker: bool) -> Option<String> {
    let mut missing = Vec::new();
    match sysroot {
        None => missing.push("the nightly toolchain (rustup toolchain install nightly)"),
        Some(root) if !root.join("lib/rustlib/src/rust/library/core").is_dir() => {
            missing.push("nightly's rust-src (rustup component add rust-src --toolchain nightly)")
        }
        Some(_) => {}
    }
    if !linker {
        missing.push("bpf-linker, built against nightly's LLVM");
    }
    (!missing.is_empty()).then(|| missing.join(" and "))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ebpf_prerequisites_are_named() {
        let dir = std::env::temp_dir().join(format!("xtask-sysroot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let no_src = missing_ebpf_prerequisites(Some(&dir), true).unwrap();
        assert!(no_src.contains("rust-src"), "{no_src}");
        std::fs::create_dir_all(dir.join("lib/rustlib/src/rust/library/core")).unwrap();
        assert_eq!(missing_ebpf_prerequisites(Some(&dir), true), None);
        let no_linker = missing_ebpf_prerequisites(Some(&dir), false).unwrap();
        assert!(no_linker.contains("bpf-linker"), "{no_linker}");
        std::fs::remove_dir_all(&dir).unwrap();
        let none = missing_ebpf_prerequisites(None, true).unwrap();
        assert!(none.contains("nightly"), "{none}");
    }
}
