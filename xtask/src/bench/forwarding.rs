//! Part 2: forwarding rate through generator → LB → sink, and TCP connections per
//! second, for xlb and for the datapaths kube-proxy and a userspace proxy would use,
//! on the same topology in the same run.
//!
//! - Generator: `xlb_bench_gen` run with BPF_F_TEST_XDP_LIVE_FRAMES in the client
//!   namespace: real frames sent out of the client's veth (XDP_TX), UDP to VIP:53, the
//!   source port cycling over `FLOWS` flows.
//! - Sink: `xlb_bench_sink` attached natively to the backend's veth, counting frames that
//!   arrive translated as expected (to the backend, from the SNAT address) and dropping
//!   them.
//! - The LB's receive NAPI runs threaded and pinned to the second CPU, the generator to
//!   the first: the NAPI thread's CPU time (schedstat) is the LB namespace's cost, for
//!   XDP and for the kernel stack alike.

use std::{
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{xdp::XdpMode, TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use serde::Serialize;
use xlb::{config::Config, dataplane::XdpAttachMode};
use xlb_tests::{
    netns::Netns,
    packet::Frame,
    testrun::Fixture,
    topology::{LbLab, BACKEND_PORT, VIP4},
};

/// Flows the generator cycles through (distinct UDP source ports).
const FLOWS: u32 = 256;
/// Frames per BPF_PROG_TEST_RUN call of the generator.
const CALL_FRAMES: u32 = 100_000;
/// Live-frames batch size (the kernel's default is 64).
const BATCH: u32 = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Lb {
    XlbNative,
    XlbGeneric,
    Nftables,
    Iptables,
    Haproxy,
}

impl Lb {
    pub fn label(self, iptables_variant: &str) -> String {
        match self {
            Lb::XlbNative => "xlb (native XDP)".into(),
            Lb::XlbGeneric => "xlb (generic XDP)".into(),
            Lb::Nftables => "nftables DNAT+SNAT".into(),
            Lb::Iptables => format!("iptables DNAT+SNAT ({iptables_variant})"),
            Lb::Haproxy => "HAProxy (userspace, TCP)".into(),
        }
    }
}

#[derive(Serialize, Clone)]
pub struct RateRow {
    pub lb: String,
    pub sent: u64,
    pub delivered: u64,
    /// Frames that reached the sink but not translated as expected.
    pub wrong: u64,
    pub seconds: f64,
    pub mpps: f64,
    pub drop_rate: f64,
    /// CPU time of the LB's receive NAPI thread per delivered packet.
    pub lb_cpu_ns_per_packet: f64,
}

#[derive(Serialize, Clone)]
pub struct ConnRow {
    pub lb: String,
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    /// xlb only: new flows dropped for want of a free SNAT port (drop_port_alloc).
    pub snat_port_exhausted: Option<u64>,
    /// From connect() to the answer's first byte, over all connections, microseconds.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
}

pub struct Results {
    pub rates: Vec<RateRow>,
    pub conns: Vec<ConnRow>,
    pub iptables_variant: String,
    pub flows: u32,
    pub seconds: f64,
    pub clients: usize,
    /// Why the forwarding rates were not measured: the kernel refused the generator's
    /// live-frames test runs. The connections per second are measured all the same.
    pub rates_not_measured: Option<String>,
}

fn xdp<'a>(f: &'a mut Fixture, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp =
        f.dp.ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    Ok(prog)
}

fn set_config(f: &mut Fixture, slot: u32, value: u32) -> Result<()> {
    let mut m: Array<&mut MapData, u32> = Array::try_from(
        f.dp.ebpf
            .map_mut("XLB_BENCH_CONFIG")
            .context("bench config")?,
    )?;
    m.set(slot, value, 0)?;
    Ok(())
}

/// (expected, other) frames counted by the sink, summed over CPUs.
fn sink_counts(f: &Fixture) -> Result<(u64, u64)> {
    let m: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(f.dp.ebpf.map("XLB_BENCH_SINK").context("sink map")?)?;
    let sum = |i: u32| -> Result<u64> { Ok(m.get(&i, 0)?.iter().sum()) };
    Ok((sum(0)?, sum(1)?))
}

/// The kernel thread running `dev`'s receive NAPI (threaded mode), by its name.
fn napi_thread(dev: &str) -> Result<u32> {
    // Thread names are cut to 15 characters.
    let want: String = format!("napi/{dev}-").chars().take(15).collect();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&want) {
            return Ok(pid);
        }
    }
    bail!("no NAPI thread for {dev} (threaded NAPI not enabled?)")
}

/// Nanoseconds a thread has run (first field of /proc/PID/schedstat).
fn cpu_ns(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    Ok(s.split_whitespace().next().context("schedstat")?.parse()?)
}

fn pin_to_cpu(pid: u32, cpu: usize) -> Result<()> {
    use nix::{sched::CpuSet, unistd::Pid};
    let mut set = CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(Pid::from_raw(pid as i32), &set)
        .with_context(|| format!("pinning thread {pid} to CPU {cpu}"))?;
    Ok(())
}

struct Topo {
    lab: LbLab,
    client_if: String,
    lb_in: String,
    lb_out: String,
    sink_if: String,
    iptables: &'static str,
}

fn threaded_napi(ns: &Netns, dev: &str) -> Result<()> {
    set_threaded_napi(ns, dev, true)
}

fn set_threaded_napi(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    ns.exec(
        "sh",
        &[
            "-c",
            &format!("echo {} > /sys/class/net/{dev}/threaded", on as u8),
        ],
    )?;
    Ok(())
}

fn nft_rules(lab: &LbLab) -> String {
    let b = lab.backend(0, false).ip();
    format!(
        "table ip xlbbench {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP4} udp dport 53 dnat to {b}:{BACKEND_PORT}
    ip daddr {VIP4} tcp dport 80 dnat to {b}:{BACKEND_PORT}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr {b} snat to {}
  }}
}}
",
        lab.snat4
    )
}

fn iptables_rules(lab: &LbLab) -> Vec<Vec<String>> {
    let b = lab.backend(0, false).ip();
    let to = format!("{b}:{BACKEND_PORT}");
    let mut rules: Vec<Vec<String>> = [("udp", "53"), ("tcp", "80")]
        .iter()
        .map(|(proto, port)| {
            let dnat = [
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                VIP4,
                "-p",
                proto,
                "--dport",
                port,
            ];
            dnat.iter()
                .map(|x| x.to_string())
                .chain([
                    "-j".into(),
                    "DNAT".into(),
                    "--to-destination".into(),
                    to.clone(),
                ])
                .collect()
        })
        .collect();
    let snat = [
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-d",
        &b.to_string(),
        "-j",
        "SNAT",
        "--to-source",
        &lab.snat4.to_string(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    rules.push(snat);
    rules
}

fn haproxy_config(lab: &LbLab) -> String {
    format!(
        "global\n  maxconn 4096\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\n\
         frontend vip\n  bind {VIP4}:80\n  default_backend pool\n\n\
         backend pool\n  server b0 {}\n",
        lab.backend(0, false)
    )
}

/// Runs every LB in turn on one topology. `seconds` is the length of each measurement.
pub fn measure(seconds: f64, clients: usize) -> Result<Results> {
    let lab = LbLab::two_arm(1)?;
    lab.write_config(&[0])?;
    let mut cfg = Config::load(&lab.config_path)?;
    // Every new TCP connection takes a SNAT port until its flow has closed and expired
    // (tcp_closing, 10 s): the default 12,768 ports per backend would run out within
    // the connections-per-second measurement. nftables' SNAT keeps the client's port
    // when it can; give xlb the whole range (nothing else in the LB namespace uses it).
    cfg.snat.port_min = 1024;
    cfg.snat.port_max = 65535;
    let lb_in = lab.lb_ifaces[0].clone();
    let lb_out = lab.lb_ifaces[1].clone();
    // The peers' names, from the namespaces.
    let peer = |ns: &Netns| -> Result<String> {
        let out = ns.ip(&["-o", "link", "show", "type", "veth"])?;
        let s = String::from_utf8_lossy(&out.stdout);
        let name = s
            .split(':')
            .nth(1)
            .and_then(|n| n.trim().split('@').next())
            .context("no veth")?;
        Ok(name.to_owned())
    };
    let client_if = peer(&lab.client)?;
    let sink_if = peer(&lab.backends[0])?;
    threaded_napi(&lab.lb, &lb_in)?;
    threaded_napi(&lab.backends[0], &sink_if)?;
    pin_to_cpu(napi_thread(&lb_in)?, 1)?;
    pin_to_cpu(napi_thread(&sink_if)?, 1)?;
    // kube-proxy's iptables mode uses the host's iptables; the legacy (xtables) one is
    // the datapath distinct from nftables, when this kernel has it.
    let iptables = if lab
        .lb
        .exec("iptables-legacy", &["-t", "nat", "-L", "-n"])
        .is_ok()
    {
        "iptables-legacy"
    } else {
        "iptables"
    };
    lab.lb
        .ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])
        .ok();
    let topo = Topo {
        lab,
        client_if,
        lb_in,
        lb_out,
        sink_if,
        iptables,
    };
    let lab = &topo.lab;

    let mut f = Fixture::new()?;
    // The sink, in the backend's namespace.
    let sink_if = topo.sink_if.clone();
    lab.backends[0].run_scoped(|| -> Result<()> {
        xdp(&mut f, "xlb_bench_sink")?.attach(&sink_if, XdpMode::Driver)?;
        Ok(())
    })??;
    let IpAddr::V4(snat) = lab.snat4 else {
        bail!("SNAT4")
    };
    let IpAddr::V4(b0) = lab.backend(0, false).ip() else {
        bail!("backend")
    };
    set_config(&mut f, 0, FLOWS)?;
    set_config(&mut f, 1, u32::from_ne_bytes(b0.octets()))?;
    set_config(&mut f, 2, u32::from(BACKEND_PORT.to_be()))?;
    set_config(&mut f, 3, u32::from_ne_bytes(snat.octets()))?;

    let mut frame = Frame::udp(&lab.client4.to_string(), 10_000, VIP4, 53);
    frame.src_mac = lab.client.mac(&topo.client_if)?;
    frame.dst_mac = lab.lb.mac(&topo.lb_in)?;
    frame.payload = vec![0x5a; 18];
    let frame = frame.build();
    {
        let mut t: Array<&mut MapData, [u8; 42]> = Array::try_from(
            f.dp.ebpf
                .map_mut("XLB_BENCH_TEMPLATE")
                .context("template map")?,
        )?;
        t.set(0, <[u8; 42]>::try_from(&frame[..42])?, 0)?;
    }
    let client_ifindex = lab.client.ifindex(&topo.client_if)?;
    let mut napi = napi_thread(&topo.lb_in)?;
    let rates_not_measured = live_frames_refused(&lab.client, &mut f, &frame, client_ifindex)?;
    if let Some(why) = &rates_not_measured {
        println!("  forwarding rates not measured: {why}");
    }

    let mut rates = Vec::new();
    let mut conns = Vec::new();
    let order = [
        Lb::Nftables,
        Lb::Iptables,
        Lb::XlbGeneric,
        Lb::XlbNative,
        Lb::Haproxy,
    ];
    for lb in order {
        let label = lb.label(topo.iptables);
        let mut haproxy = None;
        match lb {
            Lb::Nftables => {
                let mut c = lab.lb.command("nft");
                c.args(["-f", "-"]).stdin(std::process::Stdio::piped());
                let mut child = c.spawn().context("nft")?;
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .context("stdin")?
                    .write_all(nft_rules(lab).as_bytes())?;
                if !child.wait()?.success() {
                    bail!("nft rejected the DNAT rules");
                }
            }
            Lb::Iptables => {
                for r in iptables_rules(lab) {
                    let args: Vec<&str> = r.iter().map(String::as_str).collect();
                    lab.lb.exec(topo.iptables, &args)?;
                }
            }
            Lb::XlbNative | Lb::XlbGeneric => {
                let mode = if lb == Lb::XlbNative {
                    XdpAttachMode::Native
                } else {
                    XdpAttachMode::Generic
                };
                let ifs = [&topo.lb_in, &topo.lb_out];
                lab.lb.run_scoped(|| -> Result<()> {
                    f.apply(&cfg)?;
                    for i in ifs {
                        f.dp.attach(i, mode)?;
                    }
                    Ok(())
                })??;
            }
            Lb::Haproxy => {
                let path =
                    std::env::temp_dir().join(format!("{}.cfg", xlb_tests::unique_name("xlbhap")));
                std::fs::write(&path, haproxy_config(lab))?;
                let child = lab
                    .lb
                    .command("haproxy")
                    .args(["-db", "-f"])
                    .arg(&path)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::fs::File::create(path.with_extension("log"))?)
                    .spawn()
                    .context("starting haproxy")?;
                haproxy = Some((child, path));
            }
        }
        let measured = (|| -> Result<()> {
            if lb != Lb::Haproxy && rates_not_measured.is_none() {
                let row = rate(
                    &lab.client,
                    &mut f,
                    &frame,
                    client_ifindex,
                    napi,
                    seconds,
                    &label,
                )?;
                if std::env::var_os("XLB_BENCH_DEBUG").is_some() {
                    for (cmd, args) in [
                        ("ip", &["-s", "-s", "link", "show", topo.lb_in.as_str()][..]),
                        ("ethtool", &["-S", topo.lb_in.as_str()][..]),
                    ] {
                        let o = lab.lb.exec(cmd, args)?;
                        println!("{}", String::from_utf8_lossy(&o.stdout));
                    }
                }
                println!(
                    "  {:<44} {:>7.3} Mpps delivered, drop {:>5.1}%, LB CPU {:>6.0} ns/packet",
                    row.lb,
                    row.mpps,
                    row.drop_rate * 100.0,
                    row.lb_cpu_ns_per_packet
                );
                rates.push(row);
            }
            let drops_before = port_alloc_drops(&f)?;
            // Connections in lock-step are bound by latency: with XLB_BENCH_CONNS_NAPI=softirq
            // the LB's and the backend's receive NAPI run as softirqs for this part (as
            // on a NIC), not as the threads the rate part uses to measure CPU time.
            let softirq = std::env::var("XLB_BENCH_CONNS_NAPI").is_ok_and(|v| v == "softirq");
            if softirq {
                set_threaded_napi(&lab.lb, &topo.lb_in, false)?;
                set_threaded_napi(&lab.backends[0], &topo.sink_if, false)?;
            }
            let row = connections(lab, seconds, clients, &label);
            if softirq {
                threaded_napi(&lab.lb, &topo.lb_in)?;
                threaded_napi(&lab.backends[0], &topo.sink_if)?;
                // The threads are new ones: find them again (they take a moment).
                let find = |dev: &str| -> Result<u32> {
                    for _ in 0..50 {
                        if let Ok(pid) = napi_thread(dev) {
                            return Ok(pid);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    napi_thread(dev)
                };
                napi = find(&topo.lb_in)?;
                pin_to_cpu(napi, 1)?;
                pin_to_cpu(find(&topo.sink_if)?, 1)?;
            }
            let mut row = row?;
            if matches!(lb, Lb::XlbNative | Lb::XlbGeneric) {
                row.snat_port_exhausted = Some(port_alloc_drops(&f)? - drops_before);
            }
            println!(
                "  {:<44} {:>7.0} TCP connections/s ({} errors), first byte p50 {} µs, p99 {} µs",
                row.lb, row.per_second, row.errors, row.latency_p50_us, row.latency_p99_us
            );
            conns.push(row);
            Ok(())
        })();
        // Undo, whatever happened.
        match lb {
            Lb::Nftables => {
                lab.lb
                    .exec("nft", &["delete", "table", "ip", "xlbbench"])
                    .ok();
            }
            Lb::Iptables => {
                lab.lb.exec(topo.iptables, &["-t", "nat", "-F"]).ok();
            }
            Lb::XlbNative | Lb::XlbGeneric => {
                f.dp.detach()?;
            }
            Lb::Haproxy => {
                if let Some((mut child, path)) = haproxy.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                    if measured.is_err() {
                        let log =
                            std::fs::read_to_string(path.with_extension("log")).unwrap_or_default();
                        eprintln!("haproxy's output:\n{log}");
                    }
                    let _ = std::fs::remove_file(path.with_extension("log"));
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        measured.with_context(|| format!("measuring {label}"))?;
    }
    Ok(Results {
        rates,
        conns,
        iptables_variant: topo.iptables.into(),
        flows: FLOWS,
        seconds,
        clients,
        rates_not_measured,
    })
}

/// Why the generator cannot run here, if it cannot: some kernels refuse live-frames test
/// runs with EPERM (seen on a 6.18 VM kernel, even for a two-instruction XDP_PASS
/// program on lo). Any other failure is an error of the bench's own.
fn live_frames_refused(
    client: &Netns,
    f: &mut Fixture,
    frame: &[u8],
    ifindex: u32,
) -> Result<Option<String>> {
    client.run_scoped(|| -> Result<Option<String>> {
        match send_live(f, frame, ifindex, 1) {
            Ok(()) => Ok(None),
            Err(e) if e.chain().any(is_eperm) => Ok(Some(
                "this kernel refuses live-frames test runs (BPF_F_TEST_XDP_LIVE_FRAMES: EPERM), the generator's way of sending".into(),
            )),
            Err(e) => Err(e.context("probing live-frames test runs")),
        }
    })?
}

/// `n` live frames from the generator, sent out of interface `ifindex`.
fn send_live(f: &mut Fixture, frame: &[u8], ifindex: u32, n: u32) -> Result<()> {
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let prog = xdp(f, "xlb_bench_gen")?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = n;
    opts.attrs = TestRunAttrs::new().xdp_live_frames(BATCH);
    prog.test_run(opts).context("live-frames test run")?;
    Ok(())
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
}

/// Sends live frames for `seconds` and counts what the sink received.
fn rate(
    client: &Netns,
    f: &mut Fixture,
    frame: &[u8],
    ifindex: u32,
    napi: u32,
    seconds: f64,
    label: &str,
) -> Result<RateRow> {
    client.run_scoped(|| {
        pin_to_cpu(0, 0)?;
        let send = |f: &mut Fixture, n: u32| send_live(f, frame, ifindex, n);
        // Warm-up (flows created, caches warm), not counted.
        send(f, 20_000)?;
        std::thread::sleep(Duration::from_millis(100));
        let (ok0, other0) = sink_counts(f)?;
        let cpu0 = cpu_ns(napi)?;
        let start = Instant::now();
        let mut sent = 0u64;
        // Bounded by time and by count.
        while start.elapsed().as_secs_f64() < seconds && sent < 500_000_000 {
            send(f, CALL_FRAMES)?;
            sent += u64::from(CALL_FRAMES);
        }
        let elapsed = start.elapsed().as_secs_f64();
        // Let the rings drain before counting.
        std::thread::sleep(Duration::from_millis(100));
        let cpu = cpu_ns(napi)? - cpu0;
        let (ok1, other1) = sink_counts(f)?;
        let delivered = ok1 - ok0;
        let wrong = other1 - other0;
        Ok(RateRow {
            lb: label.to_owned(),
            sent,
            delivered,
            wrong,
            seconds: elapsed,
            mpps: delivered as f64 / elapsed / 1e6,
            drop_rate: 1.0 - delivered as f64 / sent.max(1) as f64,
            lb_cpu_ns_per_packet: cpu as f64 / delivered.max(1) as f64,
        })
    })?
}

/// `clients` threads in the client namespace open TCP connections to VIP:80 one after
/// another for `seconds`: connect, send a byte, read the backend's answer to the end.
fn connections(lab: &LbLab, seconds: f64, clients: usize, label: &str) -> Result<ConnRow> {
    let backend = lab.backend(0, false);
    let stop = Arc::new(AtomicBool::new(false));
    // The backend: two threads accepting on one socket; each answers and closes.
    let listener = lab.backends[0].run(move || -> Result<TcpListener> {
        let l = TcpListener::bind(backend)?;
        // Non-blocking, so the servers see `stop` (accepted sockets are blocking).
        l.set_nonblocking(true)?;
        Ok(l)
    })??;
    let mut servers = Vec::new();
    for _ in 0..2 {
        let l = listener.try_clone()?;
        let stop = stop.clone();
        servers.push(std::thread::spawn(move || {
            use std::io::{Read, Write};
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut b = [0u8; 16];
                        let _ = s.read(&mut b);
                        let _ = s.write_all(b"ok\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
            }
        }));
    }
    let vip = SocketAddr::from((VIP4.parse::<Ipv4Addr>()?, 80));
    // Wait until the path answers (HAProxy takes a moment to bind), at most 5 s.
    let ready = lab.client.run(move || -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if one_connection(vip).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })?;
    // Threads started inside the namespace thread inherit its namespace.
    let (ok, errors, mut latencies) = lab.client.run(move || {
        let (ok, errors) = (AtomicU64::new(0), AtomicU64::new(0));
        let latencies = std::sync::Mutex::new(Vec::new());
        if ready {
            std::thread::scope(|s| {
                for _ in 0..clients {
                    s.spawn(|| {
                        let start = Instant::now();
                        let mut n = 0u32;
                        let mut mine = Vec::new();
                        while start.elapsed().as_secs_f64() < seconds && n < 1_000_000 {
                            n += 1;
                            match one_connection(vip) {
                                Ok(first_byte) => {
                                    mine.push(first_byte.as_micros() as u64);
                                    ok.fetch_add(1, Ordering::Relaxed)
                                }
                                Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                        latencies.lock().unwrap().extend(mine);
                    });
                }
            });
        }
        (
            ok.into_inner(),
            errors.into_inner(),
            latencies.into_inner().unwrap(),
        )
    })?;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    if !ready {
        bail!("{label}: no TCP connection through the LB within 5 s");
    }
    Ok(ConnRow {
        lb: label.to_owned(),
        connections: ok,
        errors,
        seconds,
        per_second: ok as f64 / seconds,
        snat_port_exhausted: None,
        latency_p50_us: pct(0.50),
        latency_p99_us: pct(0.99),
    })
}

fn port_alloc_drops(f: &Fixture) -> Result<u64> {
    Ok(xlb::counters::read_global_counters(f.pin_path())?
        .get("drop_port_alloc")
        .map_or(0, |c| c.packets))
}

/// One connection; returns the time from connect() to the answer's first byte.
fn one_connection(vip: SocketAddr) -> std::io::Result<Duration> {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"x")?;
    let mut buf = vec![0u8; 8];
    let n = s.read(&mut buf)?;
    let first_byte = t0.elapsed();
    buf.truncate(n);
    s.read_to_end(&mut buf)?;
    let _ = s.shutdown(Shutdown::Both);
    if buf != b"ok\n" {
        return Err(std::io::Error::other("wrong answer"));
    }
    Ok(first_byte)
}
