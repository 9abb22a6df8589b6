//! Source ranges (`allow:`) on a network as deployed: untuned veths, no static
//! neighbours, default sysctls apart from forwarding, `xlb run` with its default flags.
//! Two clients (two source addresses of the client namespace), one inside the ranges
//! and one outside, TCP and UDP, IPv4 and IPv6: the inside one is answered 100 of 100
//! times, the outside one 0 of 100 and counted as denied. Then a config reload swaps
//! the ranges, and the two swap places.

use std::{net::IpAddr, time::Duration};

use xlb_tests::{
    agent::Agent,
    cfg::{Cfg, Protocol, Svc},
    privileged, report,
    topology::{LbLab, Network, VIP4, VIP6},
    traffic::{burst, Burst},
};

const N: usize = 100;

fn config(lab: &LbLab, allow4: &str, allow6: &str) -> Cfg {
    let mut c = Cfg::new();
    for (fam, vip, v6, allow) in [("v4", VIP4, false, allow4), ("v6", VIP6, true, allow6)] {
        for (proto, port) in [(Protocol::Tcp, 80), (Protocol::Udp, 53)] {
            c = c.service(
                Svc::new(format!("{}-{fam}", proto.name()), vip, port, proto)
                    .allow([allow])
                    .backends((0..3).map(|i| lab.backend(i, v6))),
            );
        }
    }
    c
}

fn denied(agent: &Agent) -> u64 {
    agent.status().unwrap()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stats"]["denied"].as_u64().unwrap())
        .sum()
}

#[test]
fn privileged_source_ranges_as_deployed_and_across_a_reload() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(120)).unwrap();
    // The second client: another address on the client's own link.
    lab.add_client_addresses(&["10.30.0.3/24", "fd30::3/64"])
        .unwrap();
    let clients: [(IpAddr, IpAddr); 2] = [
        ("10.30.0.2".parse().unwrap(), "fd30::2".parse().unwrap()),
        ("10.30.0.3".parse().unwrap(), "fd30::3".parse().unwrap()),
    ];

    lab.write(&config(&lab, "10.30.0.2/32", "fd30::2/128"))
        .unwrap();
    let mut agent = lab.agent().start().unwrap();

    let mut results = serde_json::Map::new();
    let mut phase = |name: &str, inside: usize, agent: &Agent| {
        let before = denied(agent);
        for (vip, v6) in [(VIP4, false), (VIP6, true)] {
            let vip: IpAddr = vip.parse().unwrap();
            let pick = |c: &(IpAddr, IpAddr)| if v6 { c.1 } else { c.0 };
            let ok = burst(
                &lab.client,
                pick(&clients[inside]),
                vip,
                (80, 53),
                N,
                Duration::from_secs(5),
            )
            .unwrap();
            let refused = burst(
                &lab.client,
                pick(&clients[1 - inside]),
                vip,
                (80, 53),
                N,
                Duration::from_millis(1500),
            )
            .unwrap();
            assert_eq!(
                ok,
                Burst {
                    tcp_answered: N,
                    udp_answered: N
                },
                "{name} {vip}: the client inside the ranges\n{}",
                agent.logs()
            );
            assert_eq!(
                refused,
                Burst::default(),
                "{name} {vip}: the client outside the ranges"
            );
            results.insert(
                format!("{name}_{vip}"),
                serde_json::json!({"inside": [ok.tcp_answered, ok.udp_answered], "outside": [refused.tcp_answered, refused.udp_answered], "of": N}),
            );
        }
        // Each refused query and SYN is counted against its service (SYNs are
        // retransmitted: at least one each).
        let now = denied(agent);
        assert!(
            now - before >= 4 * N as u64,
            "{name}: {} denied, want ≥ {}",
            now - before,
            4 * N
        );
    };
    phase("first ranges", 0, &agent);
    let st = agent.status().unwrap();
    let allow: Vec<&str> = st["services"][0]["allow"]
        .as_array()
        .expect("status shows the ranges")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        allow == ["10.30.0.2/32"] || allow == ["fd30::2/128"],
        "{allow:?}"
    );

    lab.write(&config(&lab, "10.30.0.3/32", "fd30::3/128"))
        .unwrap();
    agent.reload().unwrap();
    phase("after the reload", 1, &agent);
    report("allow_as_deployed", serde_json::Value::Object(results));
}
