//! A real `xlb run` process, started inside a namespace and stopped (by its PID) on drop.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::Netns, unique_name};

/// The xlb binary next to the test executable (target/<profile>/xlb), or $XLB_BIN.
pub fn xlb_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("XLB_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("xlb"))
        .context("locating target dir")?;
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --bins) or set XLB_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

pub struct Agent {
    child: Child,
    pub pin_path: PathBuf,
    /// Whether dropping the agent removes the pin directory (not when the caller gave
    /// the path, e.g. to restart an agent on the same pins).
    owns_pin_path: bool,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `xlb run --pin-path <unique> ARGS...` in `ns` and waits until it says it runs.
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Self> {
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlba")));
        // If xlb fails to start there is no Agent to drop: remove what it pinned.
        let mut agent = Self::start_at(ns, &pin_path, args).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&pin_path);
        })?;
        agent.owns_pin_path = true;
        Ok(agent)
    }

    /// Like `start`, with its tracing filter set to `rust_log`.
    pub fn start_logging(ns: &Netns, args: &[&str], rust_log: &str) -> Result<Self> {
        Self::start_with_env(ns, args, &[("RUST_LOG", rust_log)])
    }

    /// Like `start`, with these environment variables set too.
    pub fn start_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlba")));
        let mut agent = Self::spawn(ns, &pin_path, args, env).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&pin_path);
        })?;
        agent.owns_pin_path = true;
        Ok(agent)
    }

    /// Like `start`, on a pin path the caller owns (and cleans up).
    pub fn start_at(ns: &Netns, pin_path: &std::path::Path, args: &[&str]) -> Result<Self> {
        Self::spawn(ns, pin_path, args, &[])
    }

    /// Like `start_at`, with these environment variables set too.
    pub fn start_at_with_env(
        ns: &Netns,
        pin_path: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn(ns, pin_path, args, env)
    }

    /// Like `start`, run through `wrapper` (a program that execs its last arguments,
    /// such as setpriv): `wrapper... xlb run ...`.
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlba")));
        let mut agent = Self::spawn_with(ns, &pin_path, wrapper, args, &[]).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&pin_path);
        })?;
        agent.owns_pin_path = true;
        Ok(agent)
    }

    /// The agent's process id (the wrapper's, which exec'd into xlb).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(
        ns: &Netns,
        pin_path: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_with(ns, pin_path, &[], args, env)
    }

    /// Like `start_at`, with another build of xlb (an older one, for upgrades).
    pub fn start_at_with_bin(
        ns: &Netns,
        bin: &std::path::Path,
        pin_path: &std::path::Path,
        args: &[&str],
    ) -> Result<Self> {
        Self::spawn_bin(ns, bin, pin_path, &[], args, &[])
    }

    fn spawn_with(
        ns: &Netns,
        pin_path: &std::path::Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_bin(ns, &xlb_bin()?, pin_path, wrapper, args, env)
    }

    fn spawn_bin(
        ns: &Netns,
        bin: &std::path::Path,
        pin_path: &std::path::Path,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let pin_path = pin_path.to_owned();
        let bin = bin.to_str().context("utf-8 path")?;
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = ns.command(prog);
                c.args(rest).arg(bin);
                c
            }
            None => ns.command(bin),
        };
        cmd.arg("run")
            .arg("--pin-path")
            .arg(&pin_path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning xlb")?;
        let log = capture_stderr(&mut child)?;
        let mut agent = Self {
            child,
            pin_path,
            owns_pin_path: false,
            log,
        };
        agent.wait_for_log("xlb running", Duration::from_secs(30))?;
        Ok(agent)
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a log line containing `needle`; fails early if xlb exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits (bounded) until `n` log lines contain `needle`; fails early if xlb exits.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count_log(needle) >= n {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "xlb exited with {status} before logging {needle:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "timed out waiting for {needle:?} from xlb:\n{}",
            self.logs()
        )
    }

    /// How many log lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGHUP, then waits (bounded) for the reload's outcome: Ok if it was applied,
    /// Err with the log if it was rejected.
    pub fn reload(&mut self) -> Result<()> {
        let (ok, bad) = (
            self.count_log("config reloaded"),
            self.count_log("config reload rejected"),
        );
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.count_log("config reloaded") > ok {
                return Ok(());
            }
            if self.count_log("config reload rejected") > bad {
                bail!("reload rejected:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("no reload outcome within 10s:\n{}", self.logs())
    }

    /// Sends `sig` and waits (bounded) for the process to exit.
    pub fn stop_with(&mut self, sig: i32) -> Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        bail!(
            "xlb did not exit within 10s of signal {sig}:\n{}",
            self.logs()
        )
    }

    /// `xlb status --json` for this agent's pin path.
    pub fn status(&self) -> Result<serde_json::Value> {
        status_json(&self.pin_path)
    }
}

/// Collects a child's stderr, line by line, on a thread of its own (until it closes).
pub fn capture_stderr(child: &mut Child) -> Result<Arc<Mutex<Vec<String>>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().context("stderr not piped")?;
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Ok(log)
}

/// Runs `xlb ARGS...` to completion and returns its output (status checked by caller).
pub fn xlb_cmd(args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(xlb_bin()?).args(args).output()?)
}

pub fn status_json(pin_path: &std::path::Path) -> Result<serde_json::Value> {
    let out = std::process::Command::new(xlb_bin()?)
        .args(["status", "--json", "--pin-path"])
        .arg(pin_path)
        .output()?;
    if !out.status.success() {
        bail!(
            "xlb status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop_with(libc::SIGTERM);
        }
        if self.owns_pin_path {
            // Unlinking the pinned links detaches the program; then the maps go.
            let _ = std::fs::remove_dir_all(&self.pin_path);
        }
    }
}
