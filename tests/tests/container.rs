//! The image (`cargo xtask image`) under a real container runtime, with exactly the
//! DaemonSet's privileges: podman, all capabilities dropped but BPF, NET_ADMIN and
//! PERFMON, not privileged, no privilege escalation, a read-only root filesystem, the
//! host's /sys/fs/bpf mounted, and the DaemonSet's flags. The container joins the LB
//! namespace of a topology built as a user's network is (no static neighbours, untuned
//! veths, `snat: auto`).
//!
//! Shown: real TCP and UDP (IPv4 and IPv6) through the containerised xlb; metrics on
//! the node's address with service names; a stopped container (no detach) and a new
//! one keep every established connection; without any one capability the container
//! stops, naming it, and pins nothing; under podman's default seccomp profile it stops
//! naming the filter.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use xlb_tests::{
    container::{Container, RunSpec, DAEMONSET_CAPS},
    privileged, report,
    topology::{LbLab, Network, VIP4, VIP6},
    traffic::{backend_index, connect, parse_reply, Conn},
    unique_name, RemoveOnDrop,
};

const CONFIG_IN_CONTAINER: &str = "/etc/xlb/config.yaml";

fn run_args<'a>(iface: &'a str, pin: &'a str) -> Vec<&'a str> {
    // The DaemonSet's flags (deploy/kubernetes/xlb.yaml), with a file instead of
    // Kubernetes and a pin path of the test's own.
    vec![
        "run",
        "--iface",
        iface,
        "--config",
        CONFIG_IN_CONTAINER,
        "--pin-path",
        pin,
        "--metrics-addr=0.0.0.0:9464",
    ]
}

/// GET /metrics from `from`, at `addr`.
fn scrape(lab: &LbLab, addr: SocketAddr) -> String {
    lab.client
        .run(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"))
}

/// The value of the first sample of `metric` whose labels contain `label`.
fn sample(text: &str, metric: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The effective capabilities of the container's xlb, from /proc on the host.
fn effective_caps(name: &str) -> u64 {
    let out = std::process::Command::new("podman")
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    u64::from_str_radix(eff.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn privileged_container_with_daemonset_caps_carries_traffic_and_restarts_hitless() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(120)).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbk")));
    let _pins = RemoveOnDrop(pin.clone());
    let iface = lab.iface_arg();
    let pin_s = pin.to_str().unwrap().to_owned();
    let cfg = lab.config_path.to_str().unwrap().to_owned();
    let files = [(cfg.as_str(), CONFIG_IN_CONTAINER)];
    let args = run_args(&iface, &pin_s);
    let spec = RunSpec {
        netns: &lab.lb,
        caps: &DAEMONSET_CAPS,
        files: &files,
        args: &args,
        seccomp_unconfined: true,
    };

    let mut first = Container::spawn(&spec).unwrap();
    first
        .wait_for_log("xlb running", Duration::from_secs(60))
        .unwrap();
    // Exactly the three capabilities, nothing more.
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let want = (1u64 << CAP_NET_ADMIN) | (1 << CAP_PERFMON) | (1 << CAP_BPF);
    assert_eq!(effective_caps(&first.name), want);

    // Real TCP and UDP, both families, one try each, from a client with cold
    // neighbour caches everywhere.
    let mut exchanges = serde_json::Map::new();
    for (fam, vip) in [
        ("v4", VIP4.parse::<IpAddr>().unwrap()),
        ("v6", VIP6.parse().unwrap()),
    ] {
        let o = one_try_each(&lab, vip);
        assert_eq!(o.0, 0, "{fam}: lost {}: {:?}\n{}", o.0, o.2, first.logs());
        assert!(
            o.1.iter().filter(|&&n| n > 0).count() >= 2,
            "{fam}: spread over the backends: {:?}",
            o.1
        );
        exchanges.insert(
            fam.to_owned(),
            serde_json::json!({"ok": o.1.iter().sum::<usize>(), "lost": o.0}),
        );
    }

    // Metrics on the node's address (the LB's client-side address here), by service.
    let metrics = scrape(&lab, SocketAddr::new(lab.snat4, 9464));
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let tcp_v4 = sample(&metrics, "xlb_service_packets_total", "service=\"tcp-v4\"")
        .unwrap_or_else(|| panic!("no xlb_service_packets_total for tcp-v4:\n{metrics}"));
    assert!(tcp_v4 > 0.0, "tcp-v4 counted no packets");

    // Established connections, then the container stopped (SIGTERM, no detach).
    let tcp_vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let tcp_vip6: SocketAddr = format!("[{VIP6}]:80").parse().unwrap();
    let mut conns: Vec<Conn> = (0..8)
        .map(|i| connect(&lab.client, if i % 2 == 0 { tcp_vip } else { tcp_vip6 }))
        .collect();
    let backends: Vec<usize> = conns
        .iter_mut()
        .map(|c| c.exchange("before").unwrap())
        .collect();
    let st = first.stop().unwrap();
    assert!(st.success(), "xlb exits 0 on SIGTERM:\n{}", first.logs());
    assert!(pin.exists(), "the datapath stays pinned");
    for (c, b) in conns.iter_mut().zip(&backends) {
        assert_eq!(c.exchange("between").unwrap(), *b, "with no container");
    }

    // A new container adopts the pinned datapath; every connection kept its backend.
    let mut second = Container::spawn(&spec).unwrap();
    second
        .wait_for_log("xlb running", Duration::from_secs(60))
        .unwrap();
    assert!(
        second.logs().contains("adopted the existing attachment"),
        "{}",
        second.logs()
    );
    let mut kept = 0;
    for (c, b) in conns.iter_mut().zip(&backends) {
        assert_eq!(c.exchange("after").unwrap(), *b, "a connection moved");
        kept += 1;
    }
    let after = one_try_each(&lab, VIP4.parse().unwrap());
    assert_eq!(after.0, 0, "new flows after the restart: {:?}", after.2);
    second.stop().unwrap();
    report(
        "container",
        serde_json::json!({
            "runtime": xlb_tests::container::runtime().unwrap(),
            "exchanges": exchanges,
            "connections_kept_across_restart": format!("{kept}/{}", conns.len()),
        }),
    );
}

/// One try, below TCP's first retransmission: a lost first packet fails the exchange.
const TRY: Duration = Duration::from_millis(900);

/// (lost, per backend, first error) of 50 TCP + 50 UDP exchanges to `vip`, each on a
/// fresh socket with one try.
fn one_try_each(lab: &LbLab, vip: IpAddr) -> (usize, Vec<usize>, Option<String>) {
    lab.client
        .run(move || {
            let (mut lost, mut per, mut err) = (0, vec![0usize; 3], None);
            for i in 0..50 {
                if lost >= 5 {
                    break;
                }
                let msg = format!("m{i}");
                for (what, r) in [
                    ("tcp", tcp_once(SocketAddr::new(vip, 80), &msg)),
                    ("udp", udp_once(SocketAddr::new(vip, 53), &msg)),
                ] {
                    match r {
                        Ok(b) => per[b] += 1,
                        Err(e) => {
                            lost += 1;
                            err.get_or_insert(format!("{what} #{i} to {vip}: {e}"));
                        }
                    }
                }
            }
            (lost, per, err)
        })
        .unwrap()
}

fn tcp_once(to: SocketAddr, msg: &str) -> std::io::Result<usize> {
    let mut s = TcpStream::connect_timeout(&to, TRY)?;
    s.set_read_timeout(Some(TRY))?;
    s.write_all(msg.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    answered_by(&out, msg)
}

fn udp_once(to: SocketAddr, msg: &str) -> std::io::Result<usize> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(TRY))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    if from != to {
        return Err(std::io::Error::other(format!("answer from {from}")));
    }
    answered_by(&buf[..n], msg)
}

/// The backend that echoed `msg`.
fn answered_by(reply: &[u8], msg: &str) -> std::io::Result<usize> {
    match parse_reply(reply) {
        Some((name, echoed)) if echoed == msg.as_bytes() => Ok(backend_index(&name)),
        other => Err(std::io::Error::other(format!("reply {other:?}"))),
    }
}

#[test]
fn privileged_container_without_one_capability_stops_naming_it() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(1, Network::AsDeployed).unwrap();
    lab.write_config(&[0]).unwrap();
    let iface = lab.iface_arg();
    let cfg = lab.config_path.to_str().unwrap().to_owned();
    let files = [(cfg.as_str(), CONFIG_IN_CONTAINER)];
    for missing in DAEMONSET_CAPS {
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbk")));
        let _pins = RemoveOnDrop(pin.clone());
        let pin_s = pin.to_str().unwrap().to_owned();
        let args = run_args(&iface, &pin_s);
        let caps: Vec<&str> = DAEMONSET_CAPS
            .iter()
            .copied()
            .filter(|c| *c != missing)
            .collect();
        let mut c = Container::spawn(&RunSpec {
            netns: &lab.lb,
            caps: &caps,
            files: &files,
            args: &args,
            seccomp_unconfined: true,
        })
        .unwrap();
        let (status, log) = c.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(!status.success(), "started without CAP_{missing}:\n{log}");
        assert!(
            log.contains(&format!("missing capability CAP_{missing} (")),
            "the error names CAP_{missing}:\n{log}"
        );
        assert!(!pin.exists(), "nothing pinned without CAP_{missing}");
        eprintln!(
            "without CAP_{missing}: {}",
            log.lines().last().unwrap_or("")
        );
    }
    // All three, under podman's default seccomp profile, which refuses bpf(2) without
    // CAP_SYS_ADMIN: the error says so instead of blaming a capability.
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbk")));
    let _pins = RemoveOnDrop(pin.clone());
    let pin_s = pin.to_str().unwrap().to_owned();
    let args = run_args(&iface, &pin_s);
    let mut c = Container::spawn(&RunSpec {
        netns: &lab.lb,
        caps: &DAEMONSET_CAPS,
        files: &files,
        args: &args,
        seccomp_unconfined: false,
    })
    .unwrap();
    let (status, log) = c.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !status.success(),
        "started under the default seccomp filter:\n{log}"
    );
    assert!(
        log.contains("a seccomp filter blocks it"),
        "the error names the seccomp filter:\n{log}"
    );
    assert!(!pin.exists(), "nothing pinned under the seccomp filter");
}
