//! The xlb image run under podman, as the DaemonSet runs it: all capabilities dropped
//! but BPF, NET_ADMIN and PERFMON, not privileged, no privilege escalation, no seccomp
//! filter, a read-only root filesystem, the host's /sys/fs/bpf mounted, and the container in a network
//! namespace of the test's own (`--network ns:/run/netns/NAME`). Removed on drop.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::Netns, unique_name};

/// The image under test: $XLB_IMAGE, or what `cargo xtask image` builds.
pub fn image() -> String {
    std::env::var("XLB_IMAGE").unwrap_or_else(|_| "localhost/xlb:dev".to_owned())
}

/// The DaemonSet's added capabilities (deploy/kubernetes/xlb.yaml; a manifest test
/// keeps the two equal).
pub const DAEMONSET_CAPS: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];

/// The OCI runtime: crun where it can run a container on this host, else runc. crun
/// refuses a hybrid cgroup layout with a controller on the v2 hierarchy ("cgroups in
/// hybrid mode not supported"), which some hosts have; both apply the same capability
/// sets, seccomp profile and mounts from podman's spec.
pub fn runtime() -> Result<&'static str> {
    static RUNTIME: OnceLock<Result<&'static str, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let mut why = Vec::new();
            for rt in ["crun", "runc"] {
                let out = podman(rt)
                    .args(["run", "--rm"])
                    .args(limits())
                    .args([&image(), "--version"])
                    .output()
                    .map_err(|e| format!("running podman: {e}"))?;
                if out.status.success() {
                    if !why.is_empty() {
                        eprintln!("podman runtime {rt} (not {})", why.join("; "));
                    }
                    return Ok(rt);
                }
                why.push(format!(
                    "{rt}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Err(format!(
                "podman runs no container here: {} (is the image built? cargo xtask image)",
                why.join("; ")
            ))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `podman --runtime RT`.
fn podman(runtime: &str) -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", runtime]);
    c
}

/// The resource limits this host allows: podman asks the runtime for RLIMIT_NOFILE and
/// RLIMIT_NPROC above this process's hard limits by default, which fails where the
/// host's own bounding set lacks CAP_SYS_RESOURCE (as here).
fn limits() -> [String; 4] {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    [
        "--ulimit".to_owned(),
        format!("nofile={}:{}", rl.rlim_cur, rl.rlim_max),
        // Root is exempt from RLIMIT_NPROC; any value the runtime may set will do.
        "--ulimit".to_owned(),
        "nproc=4096:4096".to_owned(),
    ]
}

pub struct Container {
    pub name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// How a container is started: what it may do and what it sees.
pub struct RunSpec<'a> {
    pub netns: &'a Netns,
    pub caps: &'a [&'a str],
    /// Host file → path in the container, read-only.
    pub files: &'a [(&'a str, &'a str)],
    /// The arguments after the image (the entrypoint is xlb).
    pub args: &'a [&'a str],
    /// As the DaemonSet runs (true), or under podman's default seccomp profile.
    pub seccomp_unconfined: bool,
}

impl Container {
    /// `podman run` in the foreground, its output captured; returns once started.
    pub fn spawn(spec: &RunSpec) -> Result<Self> {
        let name = unique_name("xlbc");
        let mut cmd = podman(runtime()?);
        cmd.args(["run", "--rm", "--name", &name])
            .arg(format!("--network=ns:/run/netns/{}", spec.netns.name))
            .args(["--cap-drop", "ALL"]);
        for cap in spec.caps {
            cmd.args(["--cap-add", cap]);
        }
        // The DaemonSet's securityContext: not privileged, no privilege escalation, no
        // seccomp filter, a read-only root filesystem (and no tmpfs podman would add
        // there by itself).
        if spec.seccomp_unconfined {
            cmd.args(["--security-opt", "seccomp=unconfined"]);
        }
        cmd.args([
            "--security-opt",
            "no-new-privileges",
            "--read-only",
            "--read-only-tmpfs=false",
            "-v",
            "/sys/fs/bpf:/sys/fs/bpf",
        ]);
        for (host, inside) in spec.files {
            cmd.args(["-v", &format!("{host}:{inside}:ro")]);
        }
        cmd.args(limits())
            .args(["-e", "RUST_LOG=info", "-e", "NO_COLOR=1"])
            .arg(image())
            .args(spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning podman")?;
        let log = crate::agent::capture_stderr(&mut child)?;
        Ok(Self { name, child, log })
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line containing `needle`; fails early if it exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the container exited with {status} before logging {needle:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("timed out waiting for {needle:?}:\n{}", self.logs())
    }

    /// Waits (bounded) for the container to exit by itself; its status and log.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                // The reader thread may still hold the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Ok((status, self.logs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("still running after {timeout:?}:\n{}", self.logs())
    }

    /// `podman stop`: SIGTERM to xlb (which leaves the datapath pinned), then waits.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let out = Command::new("podman")
            .args(["stop", "--time", "10", &self.name])
            .output()?;
        if !out.status.success() {
            bail!("podman stop: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.wait_exit(Duration::from_secs(15))?.0)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "5", &self.name])
                .output();
            let _ = self.child.wait();
        }
    }
}
