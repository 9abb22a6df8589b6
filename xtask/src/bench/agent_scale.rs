//! Part 6: the real agent at scale, as a new user runs it. 1,000 services × 100
//! backends, `snat: auto`, every backend reached through one gateway, the agent's
//! default flags but the maps' sizes (`--max-services 1024 --max-backends 131072`):
//! - `xlb run` to its "xlb running" line;
//! - one backend of one service changed in the file, SIGHUP to "config reloaded";
//! - the same change by EndpointSlice, from the fake API server, to "Kubernetes
//!   services applied" (logged once the maps are written);
//! - the agent's peak RSS, and its CPU while nothing changes.
//!
//! `XLB_BENCH_AGENT=PATH` measures another build of the agent instead of this one's.
//! `XLB_BENCH_AGENT_LOG=DIR` runs the agent with `RUST_LOG=xlb=debug` (its phase
//! timings) and leaves its logs in DIR (`file.log`, `kubernetes.log`), for profiling.
//!
//! Latencies are read from the agent's own log timestamps against the time the change
//! was made (both the system clock), not from polling its output.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;
use xlb_tests::{
    agent::{log_time, Agent, Start},
    fakeapi::{FakeApi, Kind},
    topology::{LbLab, Network},
};

#[derive(Serialize, Clone, Default)]
pub struct Results {
    pub services: usize,
    pub backends_per_service: usize,
    /// From spawning `xlb run` to its "xlb running" line.
    pub file_start_ms: f64,
    pub file_reload_ms_p50: f64,
    pub file_reload_ms_p99: f64,
    pub file_reloads: usize,
    pub file_peak_rss_mib: f64,
    /// The peak by "xlb running", before any reload.
    pub file_start_peak_rss_mib: f64,
    pub file_rss_mib: f64,
    /// CPU time over wall time while nothing changes, in percent of one core.
    pub idle_cpu_percent: f64,
    pub idle_seconds: f64,
    pub k8s_start_ms: f64,
    pub k8s_change_ms_p50: f64,
    pub k8s_change_ms_p99: f64,
    pub k8s_changes: usize,
    pub k8s_peak_rss_mib: f64,
}

fn backend(k: usize) -> std::net::Ipv4Addr {
    // 172.16.0.0/12, routed through one gateway.
    std::net::Ipv4Addr::from(0xac10_0000u32 + k as u32)
}

fn vip(s: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0ac8_0000u32 + s as u32)
}

/// The file: `snat: auto` (left out), `changed` maps a service to the backend index
/// its first backend is replaced with.
fn config_text(services: usize, per: usize, changed: &[(usize, usize)]) -> String {
    let mut t = String::from("services:\n");
    for s in 0..services {
        t.push_str(&format!(
            "  - {{name: s{s}, vip: \"{}\", port: 80, protocol: tcp, backends: [",
            vip(s)
        ));
        for b in 0..per {
            let k = changed
                .iter()
                .rev()
                .find(|(cs, _)| *cs == s && b == 0)
                .map_or(s * per + b, |(_, k)| *k);
            if b > 0 {
                t.push_str(", ");
            }
            t.push_str(&format!("{{address: \"{}:8080\"}}", backend(k)));
        }
        t.push_str("]}\n");
    }
    t
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Milliseconds from `since` to the `n`-th log line (1-based) containing `needle`.
fn waited_ms(agent: &mut Agent, needle: &str, n: usize, since: f64) -> Result<f64> {
    agent.wait_for_log_count(needle, n, Duration::from_secs(120))?;
    let logs = agent.logs();
    let line = logs
        .lines()
        .filter(|l| l.contains(needle))
        .nth(n - 1)
        .context("the line just waited for")?;
    let t = log_time(line).with_context(|| format!("no timestamp in {line:?}"))?;
    Ok((t - since) * 1e3)
}

/// `XLB_BENCH_AGENT_LOG`: the agent logs its phases (debug), kept in that directory.
fn log_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("XLB_BENCH_AGENT_LOG").map(Into::into)
}

fn with_log(start: Start) -> Start {
    match log_dir() {
        Some(_) => start.env("RUST_LOG", "info,xlb=debug"),
        None => start,
    }
}

fn keep_log(agent: &Agent, name: &str) -> Result<()> {
    if let Some(dir) = log_dir() {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), agent.logs())?;
    }
    Ok(())
}

fn kib(pid: u32, field: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let v: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))?;
    Ok(v / 1024.0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

/// The lab: the LB's namespace reaches 172.16.0.0/12 through the backend namespace's
/// address, resolved by ARP as on a real network.
fn lab() -> Result<LbLab> {
    let lab = LbLab::two_arm_on(1, Network::AsDeployed)?;
    lab.lb
        .ip(&["route", "add", "172.16.0.0/12", "via", "10.40.0.2"])?;
    Ok(lab)
}

pub fn measure(services: usize, per: usize, changes: usize, idle: Duration) -> Result<Results> {
    // Another build to compare with, in the same run (e.g. the one before a change).
    let bin = match std::env::var_os("XLB_BENCH_AGENT") {
        Some(b) => std::path::PathBuf::from(b),
        None => super::build_agent()?,
    };
    println!("  agent: {}", bin.display());
    std::env::set_var("XLB_BIN", &bin);
    let mut r = Results {
        services,
        backends_per_service: per,
        ..Default::default()
    };
    // The config file, SIGHUP.
    {
        let lab = lab()?;
        let path = &lab.config_path;
        std::fs::write(path, config_text(services, per, &[]))?;
        let started = Instant::now();
        let mut agent = with_log(
            Start::new(&lab.lb, &lab.iface_arg())
                .config(path)
                .metrics_addr("off")
                .args(&["--max-services", "1024", "--max-backends", "131072"]),
        )
        .start()?;
        r.file_start_ms = started.elapsed().as_secs_f64() * 1e3;
        r.file_start_peak_rss_mib = kib(agent.pid(), "VmHWM:")?;
        println!(
            "  file: xlb run to \"xlb running\": {:.0} ms; peak RSS by then {:.1} MiB",
            r.file_start_ms, r.file_start_peak_rss_mib
        );
        let mut changed = Vec::new();
        let mut lat = Vec::new();
        for u in 0..changes {
            changed.push(((u * 7919) % services, services * per + u));
            lab.replace_config(&config_text(services, per, &changed))?;
            let since = now_s();
            // SAFETY: a signal to the agent this bench started.
            unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
            lat.push(waited_ms(&mut agent, "config reloaded", u + 1, since)?);
        }
        r.file_reloads = changes;
        r.file_reload_ms_p50 = percentile(lat.clone(), 0.5);
        r.file_reload_ms_p99 = percentile(lat, 0.99);
        println!(
            "  file: one backend changed, SIGHUP to \"config reloaded\" ({changes}): p50 {:.0} ms, p99 {:.0} ms",
            r.file_reload_ms_p50, r.file_reload_ms_p99
        );
        std::thread::sleep(Duration::from_secs(1));
        let cpu0 = cpu_seconds(agent.pid())?;
        let t0 = Instant::now();
        std::thread::sleep(idle);
        let cpu = cpu_seconds(agent.pid())? - cpu0;
        r.idle_seconds = t0.elapsed().as_secs_f64();
        r.idle_cpu_percent = cpu / r.idle_seconds * 100.0;
        r.file_rss_mib = kib(agent.pid(), "VmRSS:")?;
        r.file_peak_rss_mib = kib(agent.pid(), "VmHWM:")?;
        println!(
            "  file: idle CPU {:.2}% of a core over {:.0} s; RSS {:.1} MiB, peak {:.1} MiB",
            r.idle_cpu_percent, r.idle_seconds, r.file_rss_mib, r.file_peak_rss_mib
        );
        keep_log(&agent, "file.log")?;
        drop(agent);
    }
    // Kubernetes: the same services as Services and EndpointSlices.
    {
        let lab = lab()?;
        let api = FakeApi::start(&[&lab.lb])?;
        let dir = std::env::temp_dir().join(xlb_tests::unique_name("xs"));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = api.kubeconfig(&dir)?;
        let slice = |s: usize, first: usize| {
            let eps: Vec<_> = (0..per)
                .map(|b| {
                    let k = if b == 0 { first } else { s * per + b };
                    json!({"addresses": [backend(k).to_string()], "nodeName": "node-a",
                           "conditions": {"ready": true, "serving": true, "terminating": false}})
                })
                .collect();
            json!({
                "metadata": {"name": format!("s{s}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": format!("s{s}")}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps,
            })
        };
        for s in 0..services {
            api.apply(
                Kind::Service,
                &json!({
                    "metadata": {"name": format!("s{s}"), "namespace": "default"},
                    "spec": {"type": "LoadBalancer", "loadBalancerClass": "xlb.dev/xdp",
                             "ipFamilies": ["IPv4"],
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
                    // As an agent already wrote it: the first sync writes no status.
                    "status": {"loadBalancer": {"ingress": [{"ip": vip(s).to_string(), "ipMode": "VIP"}]}},
                }),
            );
            api.apply(Kind::EndpointSlice, &slice(s, s * per));
        }
        let kc = kubeconfig.to_str().context("path")?.to_owned();
        let started = Instant::now();
        let mut agent = with_log(Start::new(&lab.lb, &lab.iface_arg()))
            .metrics_addr("off")
            .args(&[
                "--kubernetes",
                "--node-name",
                "node-a",
                "--max-services",
                "1024",
                "--max-backends",
                "131072",
            ])
            .env("KUBECONFIG", &kc)
            .start()?;
        agent.wait_for_log("Kubernetes services applied", Duration::from_secs(120))?;
        r.k8s_start_ms = started.elapsed().as_secs_f64() * 1e3;
        println!(
            "  Kubernetes: xlb run to the first \"Kubernetes services applied\": {:.0} ms",
            r.k8s_start_ms
        );
        let mut lat = Vec::new();
        for u in 0..changes {
            let s = (u * 7919) % services;
            let since = now_s();
            api.apply(Kind::EndpointSlice, &slice(s, services * per + u));
            lat.push(waited_ms(
                &mut agent,
                "Kubernetes services applied",
                u + 2,
                since,
            )?);
        }
        r.k8s_changes = changes;
        r.k8s_change_ms_p50 = percentile(lat.clone(), 0.5);
        r.k8s_change_ms_p99 = percentile(lat, 0.99);
        r.k8s_peak_rss_mib = kib(agent.pid(), "VmHWM:")?;
        println!(
            "  Kubernetes: one endpoint changed, EndpointSlice to the maps ({changes}): p50 {:.0} ms, p99 {:.0} ms; peak RSS {:.1} MiB",
            r.k8s_change_ms_p50, r.k8s_change_ms_p99, r.k8s_peak_rss_mib
        );
        keep_log(&agent, "kubernetes.log")?;
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(r)
}
