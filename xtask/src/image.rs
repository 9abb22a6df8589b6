//! `cargo xtask image`: the container image, built with no registry at all.
//!
//! The image starts from `scratch` and holds `xlb` (built with the `image` profile) and exactly the shared
//! libraries its ELF header asks for (the loader included), copied from this host. It
//! is assembled with buildah from Debian, so nothing is pulled, and exported as a
//! docker-archive tarball that both `podman load` and `k3s ctr images import` take.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::workspace_root;

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The image's name in local container storage (and in the archive).
    #[arg(long, default_value = "localhost/xlb:dev")]
    pub tag: String,
    /// The archive written (docker-archive format).
    #[arg(long, default_value = "xlb-image.tar")]
    pub output: PathBuf,
    /// Package this xlb binary instead of building one with the `image` profile.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Only assemble the image's root filesystem in target/oci/rootfs (what
    /// deploy/Dockerfile copies into its `FROM scratch` stage); no buildah.
    #[arg(long)]
    pub rootfs_only: bool,
}

const WORKING_CONTAINER: &str = "xlb-image-build";

pub fn run(args: ImageArgs) -> Result<()> {
    let root = workspace_root();
    for tool in ["buildah", "ldd", "strip"] {
        if args.rootfs_only && tool == "buildah" {
            continue;
        }
        if which(tool).is_none() {
            bail!("{tool} not found: scripts/setup.sh installs it (Debian packages buildah, libc-bin, binutils)");
        }
    }
    let binary = match args.binary {
        Some(b) => b,
        None => build_image_profile(&root)?,
    };
    let stage = root.join("target/oci");
    let rootfs = stage.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs).context("clearing target/oci/rootfs")?;
    }
    let bin_dst = rootfs.join("usr/local/bin/xlb");
    std::fs::create_dir_all(bin_dst.parent().unwrap())?;
    std::fs::copy(&binary, &bin_dst).with_context(|| format!("copying {}", binary.display()))?;
    // Symbols only; the XDP object (with its BTF) is data inside the binary and stays.
    cmd("strip", &[bin_dst.to_str().unwrap()])?;
    let libs = shared_libraries(&binary)?;
    for lib in &libs {
        let dst = rootfs.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap())?;
        // fs::copy follows symlinks: the image holds the file under the name asked for.
        std::fs::copy(lib, &dst).with_context(|| format!("copying {}", lib.display()))?;
    }
    // Host names (a kubeconfig's server) resolve by files then DNS, as on a host.
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    if args.rootfs_only {
        println!("{}", rootfs.display());
        return Ok(());
    }

    // A working container left by an interrupted run would block the name.
    let _ = Command::new("buildah")
        .args(["rm", WORKING_CONTAINER])
        .output();
    cmd("buildah", &["from", "--name", WORKING_CONTAINER, "scratch"])?;
    let built = (|| -> Result<()> {
        cmd(
            "buildah",
            &["copy", WORKING_CONTAINER, rootfs.to_str().unwrap(), "/"],
        )?;
        // xtask shares the workspace version with xlb.
        let version = format!(
            "org.opencontainers.image.version={}",
            env!("CARGO_PKG_VERSION")
        );
        let revision = format!("org.opencontainers.image.revision={}", git_revision(&root));
        cmd(
            "buildah",
            &[
                "config",
                "--entrypoint",
                r#"["/usr/local/bin/xlb"]"#,
                "--cmd",
                r#"["run","--kubernetes"]"#,
                "--label",
                "org.opencontainers.image.title=xlb",
                "--label",
                &version,
                "--label",
                &revision,
                WORKING_CONTAINER,
            ],
        )?;
        // --timestamp 0: the same binary gives the same image, whenever it is built.
        cmd(
            "buildah",
            &[
                "commit",
                "--quiet",
                "--timestamp",
                "0",
                WORKING_CONTAINER,
                &args.tag,
            ],
        )?;
        Ok(())
    })();
    let _ = Command::new("buildah")
        .args(["rm", WORKING_CONTAINER])
        .output();
    built?;

    let output = if args.output.is_absolute() {
        args.output.clone()
    } else {
        root.join(&args.output)
    };
    let _ = std::fs::remove_file(&output);
    let dest = format!("docker-archive:{}:{}", output.display(), args.tag);
    cmd("buildah", &["push", "--quiet", &args.tag, &dest])?;

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let lib_bytes: u64 = libs.iter().map(|l| size(l)).sum();
    println!(
        "image {}: xlb {:.1} MB + {} libraries {:.1} MB",
        args.tag,
        mb(size(&bin_dst)),
        libs.len(),
        mb(lib_bytes)
    );
    for lib in &libs {
        println!("  {}", lib.display());
    }
    println!(
        "{}: {:.1} MB (podman load -i {0}, or k3s ctr images import {0})",
        output.display(),
        mb(size(&output))
    );
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn build_image_profile(root: &Path) -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            // Cargo.toml's `image` profile: release with fat LTO, one codegen unit and
            // opt-level "s" (10.9 MB against 18.2 MB for plain release, stripped).
            "--profile",
            "image",
            "--locked",
            "--package",
            "lb-userspace",
            "--bin",
            "xlb",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --profile image of xlb failed");
    }
    Ok(root.join("target/image/xlb"))
}

/// The shared objects `ldd` resolves for `binary`, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing beside it.
        if text.contains("not a dynamic")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => bail!("ldd {}: {line}", binary.display()),
            _ => {} // linux-vdso: provided by the kernel
        }
    }
    Ok(libs)
}

fn git_revision(root: &Path) -> String {
    Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn cmd(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
