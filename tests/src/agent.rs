//! A real `xlb run` process, started inside a namespace and stopped (by its PID) on drop.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
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

/// How to start `xlb run`, for [`Agent::start`]: the namespace and the interfaces, and
/// what differs from the defaults. The defaults: a pin path of the agent's own under
/// /sys/fs/bpf (removed when the agent is dropped), XDP mode `auto`, no config, metrics
/// on the agent's default address (the namespace's own loopback), `RUST_LOG=info`,
/// this build's xlb ([`xlb_bin`]) run directly.
pub struct Start<'a> {
    ns: &'a Netns,
    args: Vec<String>,
    pin_path: Option<PathBuf>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    bin: Option<PathBuf>,
}

impl<'a> Start<'a> {
    /// `xlb run --iface IFACE` (IFACE: one or more, comma separated) in `ns`.
    pub fn new(ns: &'a Netns, iface: &str) -> Self {
        Self {
            ns,
            args: vec!["--iface".into(), iface.into()],
            pin_path: None,
            env: Vec::new(),
            wrapper: Vec::new(),
            bin: None,
        }
    }

    /// `--config PATH`.
    pub fn config(self, path: impl AsRef<Path>) -> Self {
        let path = path
            .as_ref()
            .to_str()
            .expect("a UTF-8 config path")
            .to_owned();
        self.args(&["--config", &path])
    }

    /// `--xdp-mode MODE` (`native`, `generic`).
    pub fn xdp_mode(self, mode: &str) -> Self {
        self.args(&["--xdp-mode", mode])
    }

    /// `--metrics-addr ADDR` (or `off`).
    pub fn metrics_addr(self, addr: &str) -> Self {
        self.args(&["--metrics-addr", addr])
    }

    /// More arguments, after the others.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// This pin path, which the caller owns and cleans up (to start another agent on
    /// the same pins, or to look at them after this one has gone).
    pub fn pin_path(mut self, path: &Path) -> Self {
        self.pin_path = Some(path.to_owned());
        self
    }

    /// An environment variable (`RUST_LOG` overrides the default).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Run through `wrapper`, a program that execs its last arguments (such as
    /// setpriv): `wrapper... xlb run ...`.
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        self
    }

    /// Another build of xlb (an older one, for upgrades).
    pub fn bin(mut self, bin: &Path) -> Self {
        self.bin = Some(bin.to_owned());
        self
    }

    /// [`Agent::start`].
    pub fn start(self) -> Result<Agent> {
        Agent::start(self)
    }
}

impl Agent {
    /// Starts `xlb run` as `start` says and waits until it says it runs.
    pub fn start(start: Start) -> Result<Self> {
        let Some(pin_path) = start.pin_path.clone() else {
            let pin_path = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlba")));
            // If xlb fails to start there is no Agent to drop: remove what it pinned.
            let mut agent = Self::spawn(&start, &pin_path).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&pin_path);
            })?;
            agent.owns_pin_path = true;
            return Ok(agent);
        };
        Self::spawn(&start, &pin_path)
    }

    /// The agent's process id (the wrapper's, which exec'd into xlb).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(start: &Start, pin_path: &Path) -> Result<Self> {
        let bin = match &start.bin {
            Some(b) => b.clone(),
            None => xlb_bin()?,
        };
        let bin = bin.to_str().context("utf-8 path")?;
        let mut cmd = match start.wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = start.ns.command(prog);
                c.args(rest).arg(bin);
                c
            }
            None => start.ns.command(bin),
        };
        cmd.arg("run")
            .arg("--pin-path")
            .arg(pin_path)
            .args(&start.args)
            .env("RUST_LOG", "info")
            .envs(start.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning xlb")?;
        let log = capture_stderr(&mut child)?;
        let mut agent = Self {
            child,
            pin_path: pin_path.to_owned(),
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
    status_json_of(&xlb_bin()?, pin_path)
}

/// `status_json`, as the xlb binary `bin` (another build's) reads the pins.
pub fn status_json_of(
    bin: &std::path::Path,
    pin_path: &std::path::Path,
) -> Result<serde_json::Value> {
    let out = std::process::Command::new(bin)
        .args(["status", "--json", "--pin-path"])
        .arg(pin_path)
        .output()?;
    if !out.status.success() {
        bail!(
            "xlb status failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
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

/// Each service's (name, packets, new flows) from an `xlb status --json` document.
pub fn service_totals(status: &serde_json::Value) -> Vec<(String, u64, u64)> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let n = |k: &str| s["stats"][k].as_u64().unwrap();
            (
                s["name"].as_str().unwrap().to_owned(),
                n("packets"),
                n("new_flows"),
            )
        })
        .collect()
}

/// Seconds since the epoch of a log line's leading RFC 3339 UTC timestamp.
pub fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_time_reads_the_agents_timestamps() {
        let t = super::log_time("2026-12-06T08:24:13.852491Z  INFO xlb: x").unwrap();
        // 2026-12-06T00:00:00Z is 1,796,515,200 s after the epoch.
        assert!((t - (1_796_515_200.0 + 8.0 * 3600.0 + 24.0 * 60.0 + 13.852491)).abs() < 1e-6);
    }
}
