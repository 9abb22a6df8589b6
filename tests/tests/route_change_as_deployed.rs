//! `snat: auto` follows the routes, as deployed: no static neighbours, default sysctls
//! apart from forwarding, untuned veths, `xlb run` with its default flags. The SNAT
//! source of a backend is its route's preferred source. When an operator changes that
//! route's source (`ip route replace ... src`), the agent hears the route event, looks
//! up the backends inside the route's prefix again, and new flows leave from the new
//! source; established flows keep the source they were translated with. A route that
//! covers no backend looks nothing up and changes nothing.

use std::{collections::BTreeSet, net::IpAddr, net::SocketAddr, time::Duration};

use xlb_tests::{
    agent::{status_json, Agent},
    netns::Netns,
    privileged,
    topology::{LbLab, Network, BACKEND_PORT, VIP4, VIP6},
    traffic::connect,
    unique_name,
};

/// The SNAT source `xlb status` shows for backend `addr`.
fn snat_of(pin: &std::path::Path, addr: IpAddr) -> Option<String> {
    let st = status_json(pin).ok()?;
    st["services"].as_array()?.iter().find_map(|svc| {
        svc["backends"].as_array()?.iter().find_map(|b| {
            let a: SocketAddr = b["address"].as_str()?.parse().ok()?;
            (a.ip() == addr).then(|| b["snat"].as_str().unwrap_or("none").to_owned())
        })
    })
}

/// Waits (at most 5 s, 50 ms apart) until backend `addr`'s SNAT source is `want`.
fn wait_snat(pin: &std::path::Path, addr: IpAddr, want: &str, agent: &Agent) {
    for _ in 0..100 {
        if snat_of(pin, addr).as_deref() == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "backend {addr}: SNAT source {:?}, not {want}, 5 s after the route changed\n{}",
        snat_of(pin, addr),
        agent.logs()
    );
}

/// The peers of the backend's established TCP connections on BACKEND_PORT, as it sees
/// them (its listener is dual-stack: IPv4 peers come v4-mapped).
fn peers(backend: &Netns) -> BTreeSet<IpAddr> {
    let out = backend
        .exec("ss", &["-Htn", "state", "established"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (local, peer) = (cols.get(cols.len().checked_sub(2)?)?, cols.last()?);
            if !local.ends_with(&format!(":{BACKEND_PORT}")) {
                return None;
            }
            let host = peer.rsplit_once(':')?.0.trim_matches(['[', ']']);
            let ip: IpAddr = host.parse().ok()?;
            Some(match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            })
        })
        .collect()
}

#[test]
fn privileged_snat_source_follows_a_route_change_as_deployed() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(1, Network::AsDeployed).unwrap();
    lab.write_config(&[0]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(120)).unwrap();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbr")));
    let _cleanup = xlb_tests::RemoveOnDrop(pin.clone());
    let agent = lab
        .agent()
        .pin_path(&pin)
        .env("RUST_LOG", "info,xlb::nexthop=debug")
        .start()
        .unwrap();
    let backend_side = lab.lb_ifaces[1].clone();
    let backend = &lab.backends[0];
    let cases = [
        (
            VIP4,
            lab.backend(0, false).ip(),
            "10.40.0.1",
            "10.40.0.100",
            "10.40.0.0/24",
        ),
        (
            VIP6,
            lab.backend(0, true).ip(),
            "fd40:0::1",
            "fd40:0::100",
            "fd40:0::/64",
        ),
    ];
    // Before: each backend's source is the address its connected route prefers.
    for (_, b, first, _, _) in &cases {
        let first: IpAddr = first.parse().unwrap();
        wait_snat(&pin, *b, &first.to_string(), &agent);
    }
    let mut long = Vec::new();
    for (vip, _, first, _, _) in &cases {
        let mut c = connect(&lab.client, SocketAddr::new(vip.parse().unwrap(), 80));
        c.exchange("before").unwrap();
        let first: IpAddr = first.parse().unwrap();
        assert!(
            peers(backend).contains(&first),
            "the backend sees {first}: {:?}",
            peers(backend)
        );
        long.push(c);
    }

    // A route that covers no backend: nothing is looked up again, nothing changes.
    let changed = "routes to backends changed";
    let before = agent.count_log(changed);
    lab.lb
        .ip(&["route", "add", "198.51.100.0/24", "via", "10.30.0.2"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.count_log(changed),
        before,
        "a route to no backend changed nothing:\n{}",
        agent.logs()
    );

    // The operator gives the backends' network another source address.
    for (_, b, first, second, prefix) in &cases {
        let v6 = b.is_ipv6();
        let fam = if v6 { "-6" } else { "-4" };
        let len = if v6 { "64" } else { "24" };
        let mut add = vec![
            fam,
            "addr",
            "add",
            &format!("{second}/{len}"),
            "dev",
            &backend_side,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        if v6 {
            add.push("nodad".into());
        }
        let add: Vec<&str> = add.iter().map(String::as_str).collect();
        lab.lb.ip(&add).unwrap();
        lab.lb
            .ip(&[
                fam,
                "route",
                "replace",
                prefix,
                "dev",
                &backend_side,
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                second,
            ])
            .unwrap();
        let second: IpAddr = second.parse().unwrap();
        wait_snat(&pin, *b, &second.to_string(), &agent);
        let first: IpAddr = first.parse().unwrap();
        assert_ne!(first, second);
    }
    assert!(agent.count_log(changed) > before, "{}", agent.logs());

    // New flows leave from the new source; the established ones keep theirs.
    for ((vip, _, first, second, _), c) in cases.iter().zip(long.iter_mut()) {
        let (first, second): (IpAddr, IpAddr) = (first.parse().unwrap(), second.parse().unwrap());
        let seen = peers(backend);
        let mut fresh = connect(&lab.client, SocketAddr::new(vip.parse().unwrap(), 80));
        fresh.exchange("after").unwrap();
        let now = peers(backend);
        assert!(
            !seen.contains(&second) && now.contains(&second),
            "{vip}: a new flow reaches the backend from {second}: before {seen:?}, now {now:?}"
        );
        assert_eq!(
            c.exchange("established").unwrap(),
            0,
            "{vip}: the established flow still answers"
        );
        assert!(
            peers(backend).contains(&first),
            "{vip}: the established flow keeps {first}"
        );
    }
}
