//! Part 3: the control plane. Maglev table builds, a full sync of many services into
//! the maps, the latency of one incremental change on top of it, and the memory of a
//! real agent holding that config. In-process timings use the agent's own code
//! (`Config::load`, `Dataplane::apply`) in the bench's build (release for a full run).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use xlb::{
    config::Config,
    dataplane::LoadOptions,
    maglev::{self, WeightedBackend},
};
use xlb_tests::{
    agent::{Agent, Start},
    testrun::Fixture,
    topology::LbLab,
};

use super::per_packet::median;

#[derive(Serialize, Clone)]
pub struct MaglevRow {
    pub table_size: u32,
    pub backends: usize,
    pub ms: f64,
}

#[derive(Serialize, Clone)]
pub struct Results {
    pub services: usize,
    pub backends_per_service: usize,
    pub table_size: u32,
    pub maglev: Vec<MaglevRow>,
    /// Reading and validating the YAML file.
    pub config_load_ms: f64,
    /// `Dataplane::apply` into empty maps.
    pub full_sync_ms: f64,
    pub tables_written: usize,
    /// MemAvailable before minus after the full sync: the maps' kernel memory,
    /// approximately (other activity on the machine shows in it too).
    pub kernel_memory_mib: f64,
    /// One backend of one service replaced, applied on top of the full config.
    pub incremental_ms_median: f64,
    pub incremental_ms_max: f64,
    pub incremental_updates: usize,
    /// The same config applied again (nothing to change).
    pub noop_apply_ms: f64,
    /// Half the services removed at once (their backends' ids cleared, their counters
    /// moved to the services' retired traffic), applied on top of the full config.
    pub mass_removal_services: usize,
    pub mass_removal_backends: usize,
    pub mass_removal_apply_ms: f64,
    /// The conntrack sweep after it, which frees the cleared ids (an empty flow table:
    /// the ids' work and the table's scan).
    pub mass_removal_sweep_ms: f64,
    /// A sweep with no id to free, the same table: what the ids add to the one above.
    pub idle_sweep_ms: f64,
    /// The removed half added back, applied.
    pub mass_addition_apply_ms: f64,
    /// A real `xlb run` with this config: from start to "config applied".
    pub agent_start_to_applied_ms: f64,
    pub agent_rss_mib: f64,
    pub agent_peak_rss_mib: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn backend_addr(k: usize) -> String {
    // 172.16.0.0/12 holds a million backends.
    let a = 0xac10_0000u32 + k as u32;
    format!("{}:8080", std::net::Ipv4Addr::from(a))
}

fn config_text(services: usize, per: usize, table_size: u32) -> String {
    let mut t = format!("maglev_table_size: {table_size}\nsnat: {{ipv4: 10.30.0.1}}\nservices:\n");
    for s in 0..services {
        let vip = std::net::Ipv4Addr::from(0x0ac8_0000u32 + s as u32);
        t.push_str(&format!(
            "  - {{name: s{s}, vip: \"{vip}\", port: 80, protocol: tcp, backends: ["
        ));
        for b in 0..per {
            if b > 0 {
                t.push_str(", ");
            }
            t.push_str(&format!("{{address: \"{}\"}}", backend_addr(s * per + b)));
        }
        t.push_str("]}\n");
    }
    t
}

pub fn mem_available_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("MemAvailable")
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

pub fn measure(services: usize, per: usize, updates: usize, builds: usize) -> Result<Results> {
    let table_size = maglev::DEFAULT_TABLE_SIZE;
    let mut rows = Vec::new();
    for (m, n) in [(16381, 10), (16381, 100), (65537, 100), (65537, 1000)] {
        let backends: Vec<WeightedBackend> = (0..n)
            .map(|k| WeightedBackend {
                addr: backend_addr(k).parse().expect("address"),
                weight: 1,
            })
            .collect();
        let mut t = Vec::new();
        for _ in 0..builds.max(1) {
            let start = Instant::now();
            std::hint::black_box(maglev::build(&backends, m)?);
            t.push(start.elapsed().as_micros() as u64);
        }
        let row = MaglevRow {
            table_size: m,
            backends: n,
            ms: median(t) as f64 / 1e3,
        };
        println!("  Maglev build M={m:<6} N={n:<5} {:>8.2} ms", row.ms);
        rows.push(row);
    }

    let path = std::env::temp_dir().join(format!("{}.yaml", xlb_tests::unique_name("xlbcp")));
    std::fs::write(&path, config_text(services, per, table_size))?;
    let result = (|| {
        let start = Instant::now();
        let cfg = Config::load(&path)?;
        let config_load_ms = ms(start.elapsed());
        let opts = LoadOptions {
            max_services: (services as u32).next_power_of_two().max(256),
            max_backends: ((services * per) as u32).next_power_of_two().max(16384),
            ..Default::default()
        };
        let (full_sync_ms, tables_written, kernel_memory_mib, inc, noop_apply_ms, mass) = {
            let mut f = Fixture::with_options(&opts)?;
            let before = mem_available_kib()?;
            let start = Instant::now();
            let summary = f.apply(&cfg)?;
            let full = ms(start.elapsed());
            let kmem = before.saturating_sub(mem_available_kib()?) as f64 / 1024.0;
            let mut inc = Vec::new();
            for u in 0..updates {
                // A fresh address each time, beyond the ones the config uses.
                let next = services * per + u;
                let mut c = cfg.clone();
                let s = (u * 7919) % services;
                c.services[s].backends[0].address = backend_addr(next).parse()?;
                let start = Instant::now();
                f.apply(&c)?;
                inc.push(start.elapsed().as_micros() as u64);
            }
            let start = Instant::now();
            f.apply(&cfg)?;
            f.apply(&cfg)?;
            let noop = ms(start.elapsed()) / 2.0;
            // An operator's mass change: half the services go (a namespace deleted),
            // the sweep frees their backends' ids, then they come back.
            // The incremental updates' replaced backends wait for a sweep: this one frees
            // them, so that the timed one has nothing to free.
            xlb::conntrack::sweep(&mut f.dp, &xlb::model::Timeouts::default())?;
            anyhow::ensure!(f.dp.freed_backends() == 0, "ids left to free");
            let start = Instant::now();
            xlb::conntrack::sweep(&mut f.dp, &xlb::model::Timeouts::default())?;
            let idle_sweep = ms(start.elapsed());
            let mut half = cfg.clone();
            half.services.truncate(services - services / 2);
            let start = Instant::now();
            f.apply(&half)?;
            let removal = ms(start.elapsed());
            let start = Instant::now();
            xlb::conntrack::sweep(&mut f.dp, &xlb::model::Timeouts::default())?;
            let sweep = ms(start.elapsed());
            let start = Instant::now();
            f.apply(&cfg)?;
            let addition = ms(start.elapsed());
            (
                full,
                summary.tables_written,
                kmem,
                inc,
                noop,
                (removal, sweep, idle_sweep, addition),
            )
        };
        let removed = services / 2;
        let (mass_removal_apply_ms, mass_removal_sweep_ms, idle_sweep_ms, mass_addition_apply_ms) =
            mass;
        println!(
            "  config load ({services} services x {per} backends): {config_load_ms:.0} ms; full sync into the maps: {full_sync_ms:.0} ms ({tables_written} tables, ~{kernel_memory_mib:.0} MiB kernel memory)"
        );
        let inc_max = inc.iter().copied().max().unwrap_or(0) as f64 / 1e3;
        let inc_median = median(inc) as f64 / 1e3;
        println!("  incremental update (one backend replaced), {updates} updates: median {inc_median:.1} ms, max {inc_max:.1} ms; no-op apply {noop_apply_ms:.1} ms");
        println!(
            "  {removed} services ({} backends) removed at once: apply {mass_removal_apply_ms:.0} ms, the sweep after it {mass_removal_sweep_ms:.0} ms (one with nothing to free {idle_sweep_ms:.0} ms); added back: apply {mass_addition_apply_ms:.0} ms",
            removed * per
        );

        // The real agent with this config.
        let bin = super::build_agent()?;
        std::env::set_var("XLB_BIN", &bin);
        let lab = LbLab::two_arm(1)?;
        let agent = Start::new(&lab.lb, &lab.iface_arg())
            .config(&path)
            .metrics_addr("off")
            .args(&["--max-services", &opts.max_services.to_string()])
            .args(&["--max-backends", &opts.max_backends.to_string()]);
        let start = Instant::now();
        let mut agent = Agent::start(agent)?;
        agent.wait_for_log("config applied", Duration::from_secs(300))?;
        let applied = ms(start.elapsed());
        // Let the first housekeeping pass run before reading memory.
        std::thread::sleep(Duration::from_millis(500));
        let rss = proc_status_kib(agent.pid(), "VmRSS:")? as f64 / 1024.0;
        let hwm = proc_status_kib(agent.pid(), "VmHWM:")? as f64 / 1024.0;
        println!("  agent: start to config applied {applied:.0} ms; RSS {rss:.1} MiB (peak {hwm:.1} MiB)");
        drop(agent);
        Ok(Results {
            services,
            backends_per_service: per,
            table_size,
            maglev: rows,
            config_load_ms,
            full_sync_ms,
            tables_written,
            kernel_memory_mib,
            incremental_ms_median: inc_median,
            incremental_ms_max: inc_max,
            incremental_updates: updates,
            noop_apply_ms,
            mass_removal_services: removed,
            mass_removal_backends: removed * per,
            mass_removal_apply_ms,
            mass_removal_sweep_ms,
            idle_sweep_ms,
            mass_addition_apply_ms,
            agent_start_to_applied_ms: applied,
            agent_rss_mib: rss,
            agent_peak_rss_mib: hwm,
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}
