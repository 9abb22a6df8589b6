//! `xlb run` attached to a real veth in native and generic mode: real TCP and UDP
//! between two namespaces gets through unchanged, and every packet is counted exactly.
//! The cross-check is an nftables counter on the same interface's netdev ingress hook,
//! which sees exactly the packets that XDP passed.

use std::{net::SocketAddr, time::Duration};

use xlb_tests::{
    agent::{Agent, Start},
    netns::{veth_pair, Netns},
    privileged,
    traffic::{parse_reply, tcp_echo, tcp_request, udp_echo, udp_request},
};

const TCP_CONNS: usize = 20;
const UDP_DATAGRAMS: usize = 50;

fn nft_counts(ns: &Netns) -> (u64, u64) {
    let out = ns
        .exec("nft", &["list", "table", "netdev", "xlbcount"])
        .expect("nft list");
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |proto: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("meta l4proto {proto}")))
            .unwrap_or_else(|| panic!("no {proto} rule in:\n{text}"));
        let after = line.split("packets ").nth(1).expect("packets field");
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    (count("tcp"), count("udp"))
}

fn xlb_counts(agent: &Agent, family: &str) -> (u64, u64) {
    let st = agent.status().expect("xlb status --json");
    let get = |k: &str| {
        st["counters"][k]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {k}"))
    };
    (
        get(&format!("seen_{family}_tcp")),
        get(&format!("seen_{family}_udp")),
    )
}

fn traffic_is_counted_exactly(mode: &str) {
    let client = Netns::new("xc").unwrap();
    let server = Netns::new("xs").unwrap();
    let (_c, s) = veth_pair(
        &client,
        &["10.77.0.1/24", "fd77::1/64"],
        &server,
        &["10.77.0.2/24", "fd77::2/64"],
    )
    .unwrap();
    let chain = format!(
        "{{ type filter hook ingress device {} priority 0; }}",
        s.name
    );
    server
        .exec("nft", &["add", "table", "netdev", "xlbcount"])
        .unwrap();
    server
        .exec("nft", &["add", "chain", "netdev", "xlbcount", "in", &chain])
        .unwrap();
    for proto in ["tcp", "udp"] {
        server
            .exec(
                "nft",
                &[
                    "add", "rule", "netdev", "xlbcount", "in", "meta", "l4proto", proto, "counter",
                ],
            )
            .unwrap();
    }
    let empty = xlb_tests::empty_config();
    let agent = Start::new(&server, &s.name)
        .xdp_mode(mode)
        .config(empty.path())
        .start()
        .unwrap();
    assert!(
        agent.logs().contains(&format!("mode=\"{mode}\"")),
        "attach mode: {}",
        agent.logs()
    );

    for (family, srv) in [("ipv4", "10.77.0.2"), ("ipv6", "[fd77::2]")] {
        let tcp_addr: SocketAddr = format!("{srv}:7000").parse().unwrap();
        let udp_addr: SocketAddr = format!("{srv}:7001").parse().unwrap();
        let tcp_srv = tcp_echo(&server, tcp_addr, "srv", Duration::from_secs(15)).unwrap();
        let udp_srv = udp_echo(&server, udp_addr, "srv", Duration::from_secs(15)).unwrap();
        let nft_before = nft_counts(&server);
        let xlb_before = xlb_counts(&agent, family);

        for i in 0..TCP_CONNS {
            let msg = format!("tcp-{family}-{i}").into_bytes();
            let (name, echoed) =
                parse_reply(&tcp_request(&client, tcp_addr, &msg).unwrap()).unwrap();
            assert_eq!(
                (name.as_str(), echoed),
                ("srv", msg),
                "TCP echo must be intact"
            );
        }
        for i in 0..UDP_DATAGRAMS {
            let msg = format!("udp-{family}-{i}").into_bytes();
            let (name, echoed) =
                parse_reply(&udp_request(&client, udp_addr, &msg).unwrap()).unwrap();
            assert_eq!(
                (name.as_str(), echoed),
                ("srv", msg),
                "UDP echo must be intact"
            );
        }

        // The last FIN/ACKs may still be in flight: read until both sides are stable.
        let mut last = None;
        let mut result = None;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let n = nft_counts(&server);
            let x = xlb_counts(&agent, family);
            let now = (
                (n.0 - nft_before.0, n.1 - nft_before.1),
                (x.0 - xlb_before.0, x.1 - xlb_before.1),
            );
            if last == Some(now) {
                result = Some(now);
                break;
            }
            last = Some(now);
        }
        let (nft, xlb) = result.expect("counters never settled");
        assert_eq!(
            xlb.1, UDP_DATAGRAMS as u64,
            "{family}: UDP datagrams counted by xlb"
        );
        assert_eq!(
            nft.1, UDP_DATAGRAMS as u64,
            "{family}: UDP datagrams seen by nftables"
        );
        // At least SYN, data, FIN and the final ACK per connection.
        assert!(
            xlb.0 >= 3 * TCP_CONNS as u64,
            "{family}: too few TCP packets counted: {}",
            xlb.0
        );
        assert_eq!(
            xlb.0, nft.0,
            "{family}: xlb and nftables disagree on TCP packets"
        );
        drop((tcp_srv, udp_srv));
    }
}

#[test]
fn privileged_native_mode_counts_real_traffic_exactly() {
    if !privileged() {
        return;
    }
    traffic_is_counted_exactly("native");
}

#[test]
fn privileged_generic_mode_counts_real_traffic_exactly() {
    if !privileged() {
        return;
    }
    traffic_is_counted_exactly("generic");
}

/// SIGINT detaches and removes every pin, maps included (no program uses them, and
/// conntrack alone holds ~94 MB at the defaults). SIGTERM leaves the datapath attached
/// and pinned (for a restart or upgrade) unless --detach-on-exit; `xlb detach` then
/// removes links, maps and the dir.
#[test]
fn privileged_stopping_is_explicit() {
    if !privileged() {
        return;
    }
    let a = Netns::new("xd").unwrap();
    let b = Netns::new("xd").unwrap();
    let (va, _) = veth_pair(&a, &["10.78.0.1/24"], &b, &["10.78.0.2/24"]).unwrap();
    let xdp_shown = || {
        String::from_utf8_lossy(&a.ip(&["link", "show", &va.name]).unwrap().stdout).contains("xdp")
    };
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", xlb_tests::unique_name("xlbs")));
    let pin_s = pin.to_str().unwrap().to_owned();
    let _c = xlb_tests::RemoveOnDrop(pin.clone());
    for (sig, extra, stays) in [
        (libc::SIGINT, None, false),
        (libc::SIGTERM, Some("--detach-on-exit"), false),
        (libc::SIGTERM, None, true),
    ] {
        let empty = xlb_tests::empty_config();
        let mut agent = Start::new(&a, &va.name)
            .xdp_mode("generic")
            .config(empty.path())
            .args(extra.as_slice())
            .pin_path(&pin)
            .start()
            .unwrap();
        assert!(xdp_shown(), "attached");
        let status = agent.stop_with(sig).unwrap();
        assert!(
            status.success(),
            "exit after signal {sig}: {status}\n{}",
            agent.logs()
        );
        assert_eq!(
            xdp_shown(),
            stays,
            "after signal {sig} {extra:?}:\n{}",
            agent.logs()
        );
        assert_eq!(pin.join(format!("link_{}", va.name)).exists(), stays);
        // Detached: nothing of xlb's is left pinned (the maps neither), and it says so.
        assert_eq!(
            pin.join("XLB_CONNTRACK").exists(),
            stays,
            "after signal {sig} {extra:?}:\n{}",
            agent.logs()
        );
        assert_eq!(pin.exists(), stays, "after signal {sig} {extra:?}");
        if !stays {
            assert!(
                agent.logs().contains("detached, and removed xlb's pins"),
                "{}",
                agent.logs()
            );
        }
    }
    // Still attached from the last round: xlb detach removes everything.
    let out = xlb_tests::agent::xlb_cmd(&["detach", "--pin-path", &pin_s]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("link_{}", va.name)) && said.contains("XLB_CONNTRACK"),
        "{said}"
    );
    assert!(!xdp_shown(), "xlb detach detached");
    assert!(!pin.exists(), "xlb detach removed the pin directory");
}
