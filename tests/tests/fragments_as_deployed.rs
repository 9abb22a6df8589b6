//! UDP datagrams larger than the path MTU, through xlb on a network as deployed
//! (untuned veths at MTU 1500, no static neighbours, default sysctls apart from
//! forwarding, `xlb run` with its default flags): requests of 1,400 to 60,000 bytes that
//! the client's kernel fragments, and small queries answered with up to 60,000 bytes
//! that the backend's kernel fragments. Through nat, dnat and dsr, IPv4 and IPv6; every
//! datagram must arrive whole (its bytes compared) and answers come from every backend.
//! The same exchange through nftables DNAT + masquerade (kube-proxy's way) in the same
//! lab is the reference; the test reports both.
//!
//! dsr needs headroom for its outer header on the path from the LB to the backends
//! (docs/modes.md): that segment runs at MTU 1600, the backends' route back to the
//! clients at 1500.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xlb_tests::{
    cfg::{Cfg, Mode, Svc},
    netns::Netns,
    privileged, report,
    segment::SegmentLab,
    topology::{LbLab, Network, VIP4, VIP6},
    traffic::{backend_index, pattern, udp_big_echo, udp_big_request},
    unique_name, RemoveOnDrop,
};

const PORT: u16 = 5354;
const REQUESTS: [usize; 4] = [1_400, 3_000, 8_000, 60_000];
const ANSWERS: [usize; 3] = [3_000, 8_000, 60_000];
/// Datagrams per size and direction, each from a fresh socket (a new flow).
const TRIES: usize = 6;

#[derive(Default, Debug)]
struct Tally {
    sent: usize,
    whole: usize,
    first_err: Option<String>,
    by_backend: [usize; 3],
}

impl Tally {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"sent": self.sent, "whole": self.whole, "per_backend": self.by_backend})
    }
}

/// Every size both ways to `vip`, `TRIES` times each.
fn exchange(client: &Netns, vip: IpAddr) -> Tally {
    let to = SocketAddr::new(vip, PORT);
    let mut t = Tally::default();
    let mut record = |what: String, r: anyhow::Result<(String, Vec<u8>)>, want: &[u8]| {
        t.sent += 1;
        match r {
            Ok((name, body)) if body == want => {
                t.whole += 1;
                t.by_backend[backend_index(&name)] += 1;
            }
            Ok((name, body)) => {
                t.first_err.get_or_insert(format!(
                    "{what}: {name} answered {} bytes, not the {} sent",
                    body.len(),
                    want.len()
                ));
            }
            Err(e) => {
                t.first_err.get_or_insert(format!("{what}: {e:#}"));
            }
        }
    };
    for size in REQUESTS {
        for k in 0..TRIES {
            let body = pattern(size, k as u8);
            let r = udp_big_request(client, to, body.clone());
            record(format!("request of {size} bytes #{k}"), r, &body);
        }
    }
    for size in ANSWERS {
        for k in 0..TRIES {
            let r = udp_big_request(client, to, format!("Q{size}").into_bytes());
            record(format!("answer of {size} bytes #{k}"), r, &pattern(size, 7));
        }
    }
    t
}

/// Servers on every backend, bound to each of `binds` (dsr binds the VIPs: a socket
/// on the wildcard address would answer from the backend's own address).
fn servers(backends: &[&Netns], binds: &[IpAddr]) -> Vec<std::thread::JoinHandle<usize>> {
    let mut out = Vec::new();
    for (i, ns) in backends.iter().enumerate() {
        for ip in binds {
            out.push(
                udp_big_echo(
                    ns,
                    SocketAddr::new(*ip, PORT),
                    &format!("b{i}"),
                    Duration::from_secs(180),
                )
                .unwrap(),
            );
        }
    }
    out
}

fn any() -> Vec<IpAddr> {
    vec![IpAddr::from([0u16; 8])]
}

fn config(mode: Mode, b4: &[IpAddr], b6: &[IpAddr]) -> Cfg {
    let svc = |name: &str, vip: &str, bs: &[IpAddr]| {
        Svc::udp(name, vip, PORT)
            .mode(mode)
            .backends(bs.iter().map(|b| SocketAddr::new(*b, PORT)))
    };
    Cfg::new()
        .service(svc("big4", VIP4, b4))
        .service(svc("big6", VIP6, b6))
}

fn check(label: &str, vip: &str, t: &Tally, agent_logs: &str) {
    assert!(
        t.whole == t.sent,
        "{label} {vip}: {} of {} datagrams arrived whole (first failure: {:?})\n{agent_logs}",
        t.whole,
        t.sent,
        t.first_err
    );
    assert!(
        t.by_backend.iter().all(|&n| n > 0),
        "{label} {vip}: answers came from {:?}, not from every backend",
        t.by_backend
    );
}

/// nat and dnat on the two-arm lab, with the nftables reference on a lab of its own.
#[test]
fn privileged_fragments_through_nat_and_dnat_as_deployed_and_nftables() {
    if !privileged() {
        return;
    }
    let mut results = serde_json::Map::new();
    for mode in ["nat", "dnat"] {
        let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
        let b4: Vec<IpAddr> = (0..3).map(|i| lab.backend(i, false).ip()).collect();
        let b6: Vec<IpAddr> = (0..3).map(|i| lab.backend(i, true).ip()).collect();
        lab.write(&config(xlb_tests::cfg::mode(mode), &b4, &b6))
            .unwrap();
        let _servers = servers(&lab.backends.iter().collect::<Vec<_>>(), &any());
        let agent = lab.agent().start().unwrap();
        for vip in [VIP4, VIP6] {
            let t = exchange(&lab.client, vip.parse().unwrap());
            check(&format!("xlb {mode}"), vip, &t, &agent.logs());
            results.insert(format!("xlb_{mode}_{vip}"), t.json());
        }
        let st = agent.status().unwrap();
        let c = |n: &str| st["counters"][n]["packets"].as_u64().unwrap_or(0);
        assert!(
            c("event_fragment_followed") > 0,
            "{mode}: fragments followed"
        );
        assert!(
            st["fragments"]["max"].as_u64().unwrap() > 0,
            "status shows the fragment map"
        );
    }

    // The reference: the same lab and exchange, nftables DNAT to one backend plus
    // masquerade, no xlb.
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    let _servers = servers(&lab.backends.iter().collect::<Vec<_>>(), &any());
    let b4 = lab.backend(0, false).ip();
    let b6 = lab.backend(0, true).ip();
    let rules = format!(
        "table ip xlbref {{\n chain pre {{ type nat hook prerouting priority -100; ip daddr {VIP4} udp dport {PORT} dnat to {b4}:{PORT}; }}\n chain post {{ type nat hook postrouting priority 100; ip daddr {b4} masquerade; }}\n}}\n\
         table ip6 xlbref {{\n chain pre {{ type nat hook prerouting priority -100; ip6 daddr {VIP6} udp dport {PORT} dnat to [{b6}]:{PORT}; }}\n chain post {{ type nat hook postrouting priority 100; ip6 daddr {b6} masquerade; }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("{}.nft", unique_name("xref")));
    let _rm = RemoveOnDrop(path.clone());
    std::fs::write(&path, rules).unwrap();
    let out = lab.lb.exec("nft", &["-f", path.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for vip in [VIP4, VIP6] {
        let t = exchange(&lab.client, vip.parse().unwrap());
        // The reference must deliver too, or the comparison means nothing.
        assert_eq!(t.whole, t.sent, "nftables {vip}: {:?}", t.first_err);
        results.insert(format!("nftables_{vip}"), t.json());
    }
    println!(
        "fragments as deployed: {}",
        serde_json::Value::Object(results.clone())
    );
    report("fragments_as_deployed", serde_json::Value::Object(results));
}

/// dsr on the shared segment: backends decapsulate with `xlb run --decap` and answer
/// the client directly.
#[test]
fn privileged_fragments_through_dsr_as_deployed() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(1, 3).unwrap();
    // Headroom for the outer header between the LB and the backends: the segment at
    // 1600; the backends' route back to the clients at the clients' 1500.
    let ports = lab
        .router
        .ip(&["-o", "link", "show", "master", "br0"])
        .unwrap();
    for line in String::from_utf8_lossy(&ports.stdout).lines() {
        let name = line.split(": ").nth(1).unwrap().split('@').next().unwrap();
        lab.router
            .ip(&["link", "set", name, "mtu", "1600"])
            .unwrap();
    }
    lab.router
        .ip(&["link", "set", "br0", "mtu", "1600"])
        .unwrap();
    for n in lab.lbs.iter().chain(&lab.backends) {
        n.ns.ip(&["link", "set", &n.iface, "mtu", "1600"]).unwrap();
    }
    for b in &lab.backends {
        b.ns.ip(&[
            "route",
            "replace",
            "default",
            "via",
            "10.61.0.1",
            "mtu",
            "1500",
        ])
        .unwrap();
        b.ns.ip(&[
            "-6", "route", "replace", "default", "via", "fd61::1", "mtu", "1500",
        ])
        .unwrap();
    }
    lab.vips_on_backends().unwrap();
    let vips = [VIP4.parse().unwrap(), VIP6.parse().unwrap()];
    let _servers = servers(
        &lab.backends.iter().map(|b| &b.ns).collect::<Vec<_>>(),
        &vips,
    );
    let decap = lab.decap_agents();
    let b4: Vec<IpAddr> = lab.backends.iter().map(|b| b.addr4).collect();
    let b6: Vec<IpAddr> = lab.backends.iter().map(|b| b.addr6).collect();
    let cfg = std::env::temp_dir().join(format!("{}.yaml", unique_name("xfd")));
    let _rm = RemoveOnDrop(cfg.clone());
    config(Mode::Dsr, &b4, &b6).write(&cfg).unwrap();
    let agent = lab.lbs[0].agent().config(&cfg).start().unwrap();
    let mut results = serde_json::Map::new();
    for vip in [VIP4, VIP6] {
        let t = exchange(&lab.client, vip.parse().unwrap());
        check("xlb dsr", vip, &t, &agent.logs());
        results.insert(format!("xlb_dsr_{vip}"), t.json());
    }
    drop(decap);
    report(
        "fragments_as_deployed_dsr",
        serde_json::Value::Object(results),
    );
}
