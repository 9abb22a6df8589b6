//! xlb on a network as a user's is: nothing resolved ahead. No static neighbour
//! entries, veths with their default offloads, default sysctls apart from forwarding,
//! `snat: auto`, and `xlb run` with its default flags (only `--iface`, `--config`, and a
//! pin path of the test's own). Real TCP and UDP, IPv4 and IPv6, from a client namespace
//! through xlb to three backends: with cold neighbours, after a storm of malformed
//! frames, and across an agent restart.
//!
//! Every connect and every UDP query gets one try with a 900 ms limit, below the first
//! retransmission (TCP's initial RTO is 1 s): a flow whose first packet was lost fails.

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use xlb_tests::{
    agent::{status_json, Agent},
    netns::Netns,
    privileged, report,
    topology::{LbLab, Network, VIP4, VIP6},
    traffic::{backend_index, connect, parse_reply},
    unique_name,
};

const TRY: Duration = Duration::from_millis(900);

/// `n` TCP request/replies and `n` UDP queries to `vip`, each on a fresh socket with
/// one try. Returns (TCP failures, UDP failures, backends seen), and the first error.
fn one_try_each(
    client: &Netns,
    vip: IpAddr,
    n: usize,
) -> (usize, usize, [usize; 3], Option<String>) {
    client
        .run(move || {
            let (mut tcp_fail, mut udp_fail, mut seen) = (0, 0, [0usize; 3]);
            let mut first_err = None;
            for i in 0..n {
                // Enough to fail the test; the rest would only take 900 ms each.
                if tcp_fail + udp_fail >= 5 {
                    break;
                }
                let msg = format!("m{i}");
                let tcp = (|| -> std::io::Result<usize> {
                    let mut s = TcpStream::connect_timeout(&SocketAddr::new(vip, 80), TRY)?;
                    s.set_read_timeout(Some(TRY))?;
                    s.write_all(msg.as_bytes())?;
                    s.shutdown(Shutdown::Write)?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out)?;
                    let (name, echoed) =
                        parse_reply(&out).ok_or(std::io::ErrorKind::InvalidData)?;
                    assert_eq!(echoed, msg.as_bytes());
                    Ok(backend_index(&name))
                })();
                match tcp {
                    Ok(b) => seen[b] += 1,
                    Err(e) => {
                        tcp_fail += 1;
                        first_err.get_or_insert(format!("TCP #{i} to {vip}: {e}"));
                    }
                }
                let udp = (|| -> std::io::Result<usize> {
                    let bind: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                        .parse()
                        .unwrap();
                    let s = UdpSocket::bind(bind)?;
                    s.set_read_timeout(Some(TRY))?;
                    let to = SocketAddr::new(vip, 53);
                    s.send_to(msg.as_bytes(), to)?;
                    let mut buf = [0u8; 256];
                    let (len, from) = s.recv_from(&mut buf)?;
                    assert_eq!(from, to, "the answer comes from the VIP");
                    let (name, _) =
                        parse_reply(&buf[..len]).ok_or(std::io::ErrorKind::InvalidData)?;
                    Ok(backend_index(&name))
                })();
                match udp {
                    Ok(b) => seen[b] += 1,
                    Err(e) => {
                        udp_fail += 1;
                        first_err.get_or_insert(format!("UDP #{i} to {vip}: {e}"));
                    }
                }
            }
            (tcp_fail, udp_fail, seen, first_err)
        })
        .unwrap()
}

fn counter(pin: &std::path::Path, name: &str) -> u64 {
    let st = status_json(pin).unwrap();
    st["counters"][name]["packets"].as_u64().unwrap_or(0)
}

/// Frames that are wrong in every way the parser checks, sent to the LB's MAC from the
/// client's interface through a packet socket.
fn malformed_storm(client: &Netns, iface: &str, lb_mac: [u8; 6], n: usize) -> usize {
    let iface = iface.to_owned();
    client
        .run(move || {
            // SAFETY: plain socket calls on a descriptor this closure owns and closes.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(
                    fd >= 0,
                    "packet socket: {}",
                    std::io::Error::last_os_error()
                );
                let name = std::ffi::CString::new(iface).unwrap();
                let ifindex = libc::if_nametoindex(name.as_ptr());
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                addr.sll_halen = 6;
                addr.sll_addr[..6].copy_from_slice(&lb_mac);
                let mut rng = 0x2545_f491_4f6c_dd1du64;
                let mut sent = 0;
                for i in 0..n {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let mut f = vec![0u8; 14 + (rng % 120) as usize];
                    f[..6].copy_from_slice(&lb_mac);
                    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
                    // IPv4, IPv6, VLAN, ARP in turn; the rest is noise aimed at the VIPs.
                    let ethertype: u16 = [0x0800, 0x86dd, 0x8100, 0x0806][i % 4];
                    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                    for (j, b) in f[14..].iter_mut().enumerate() {
                        *b = (rng >> (j % 8 * 8)) as u8 ^ j as u8;
                    }
                    if f.len() > 34 && ethertype == 0x0800 {
                        // Version 4 with any IHL, towards the VIP, TCP or UDP.
                        f[14] = 0x40 | (rng as u8 & 0x0f);
                        f[23] = if i % 8 < 4 { 6 } else { 17 };
                        f[30..34].copy_from_slice(&[10, 100, 0, 10]);
                    }
                    let r = libc::sendto(
                        fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if r > 0 {
                        sent += 1;
                    }
                }
                libc::close(fd);
                sent
            }
        })
        .unwrap()
}

#[test]
fn privileged_as_deployed_cold_neighbours_storm_and_restart() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(120)).unwrap();
    // Nothing is resolved before xlb starts: the LB has never talked to a backend.
    let neigh = String::from_utf8(lab.lb.ip(&["neigh", "show"]).unwrap().stdout).unwrap();
    assert!(
        !neigh.contains("10.40.") && !neigh.contains("fd40:"),
        "the LB knows a backend's neighbour before xlb runs:\n{neigh}"
    );
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbd")));
    let _cleanup = xlb_tests::RemoveOnDrop(pin.clone());
    let mut agent = lab
        .agent()
        .pin_path(&pin)
        .env("RUST_LOG", "info,xlb::agent=debug,xlb::nexthop=debug")
        .start()
        .unwrap();

    let mut totals = serde_json::Map::new();
    let mut check = |phase: &str, n: usize, agent: &Agent| {
        for vip in [VIP4, VIP6] {
            let vip: IpAddr = vip.parse().unwrap();
            let (tcp_fail, udp_fail, seen, err) = one_try_each(&lab.client, vip, n);
            let fam = if vip.is_ipv4() { "v4" } else { "v6" };
            totals.insert(
                format!("{phase}_{fam}"),
                serde_json::json!({"tcp_lost": tcp_fail, "udp_lost": udp_fail, "of": n, "per_backend": seen}),
            );
            assert!(
                tcp_fail == 0 && udp_fail == 0,
                "{phase} {fam}: {tcp_fail} of {n} TCP and {udp_fail} of {n} UDP flows lost their first packet \
                 (first: {err:?}); drop_neighbour_unknown={} pass_neighbour_unknown={} drop_no_snat_address={}\n{}\nLB neighbours:\n{}",
                counter(&pin, "drop_neighbour_unknown"),
                counter(&pin, "pass_neighbour_unknown"),
                counter(&pin, "drop_no_snat_address"),
                agent.logs(),
                String::from_utf8_lossy(&lab.lb.ip(&["neigh", "show"]).unwrap().stdout),
            );
            assert!(
                seen.iter().all(|&c| c > 0),
                "{phase} {fam}: every backend takes flows: {seen:?}"
            );
        }
    };
    // 1. Cold neighbours, default flags.
    check("cold", 300, &agent);
    // The SNAT source came from the routes: the backends saw the LB's own address on
    // their link, which no config named.
    let st = status_json(&pin).unwrap();
    for svc in st["services"].as_array().unwrap() {
        for b in svc["backends"].as_array().unwrap() {
            let addr: SocketAddr = b["address"].as_str().unwrap().parse().unwrap();
            let i = match addr.ip() {
                IpAddr::V4(a) => a.octets()[2],
                IpAddr::V6(a) => a.segments()[1] as u8,
            };
            let want: IpAddr = if addr.is_ipv4() {
                format!("10.40.{i}.1").parse().unwrap()
            } else {
                format!("fd40:{i}::1").parse().unwrap()
            };
            let want = want.to_string();
            assert_eq!(
                b["snat"].as_str(),
                Some(want.as_str()),
                "SNAT source of {addr} from its route: {st:#}"
            );
        }
    }
    // `auto` chose generic XDP on veth, and `xlb status` (run where the interfaces
    // are) says so for every interface.
    let out = lab
        .lb
        .command(xlb_tests::agent::xlb_bin().unwrap().to_str().unwrap())
        .args(["status", "--json", "--pin-path", pin.to_str().unwrap()])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let attached: Vec<(String, String)> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["iface"].as_str().unwrap().to_owned(),
                a["xdp_mode"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want: Vec<(String, String)> = lab
        .lb_ifaces
        .iter()
        .map(|i| (i.clone(), "generic".to_owned()))
        .collect();
    want.sort();
    assert_eq!(attached, want, "{st:#}");
    assert!(agent.logs().contains("choosing generic XDP"));
    // The next hops are managed neighbour entries, resolved by the kernel.
    let neigh = String::from_utf8(lab.lb.ip(&["neigh", "show"]).unwrap().stdout).unwrap();
    for i in 0..3 {
        for a in [format!("10.40.{i}.2"), format!("fd40:{i}::2")] {
            let a: IpAddr = a.parse().unwrap();
            let first = |l: &str| l.split(' ').next().and_then(|w| w.parse::<IpAddr>().ok());
            let line = neigh
                .lines()
                .find(|l| first(l) == Some(a))
                .unwrap_or_else(|| {
                    panic!("no neighbour entry for backend {a}:\n{neigh}");
                });
            assert!(line.contains("managed"), "{line}");
        }
    }

    // 2. A storm of malformed frames at the LB, then the same traffic.
    let client_if = String::from_utf8(lab.client.ip(&["-o", "link", "show"]).unwrap().stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .find(|n| n != "lo")
        .unwrap();
    let lb_mac = lab.lb.mac(&lab.lb_ifaces[0]).unwrap();
    let sent = malformed_storm(&lab.client, &client_if, lb_mac, 20_000);
    assert!(sent > 19_000, "the storm was sent: {sent}");
    check("after_storm", 100, &agent);

    // 3. Restart: established flows survive, new ones work at once.
    let mut long4 = connect(&lab.client, SocketAddr::new(VIP4.parse().unwrap(), 80));
    let mut long6 = connect(&lab.client, SocketAddr::new(VIP6.parse().unwrap(), 80));
    let b4 = long4.exchange("before").unwrap();
    let b6 = long6.exchange("before").unwrap();
    agent.stop_with(libc::SIGTERM).unwrap();
    assert_eq!(long4.exchange("agentless").unwrap(), b4);
    let agent = lab.agent().pin_path(&pin).start().unwrap();
    assert_eq!(
        long4.exchange("after").unwrap(),
        b4,
        "v4 flow kept its backend"
    );
    assert_eq!(
        long6.exchange("after").unwrap(),
        b6,
        "v6 flow kept its backend"
    );
    check("after_restart", 100, &agent);

    // 4. A backend removed: its traffic stays in its services' totals (the agent sums a
    // service's from its backends' counters, and a removed one's move to its service).
    let backend_1 = [lab.backend(1, false), lab.backend(1, true)].map(|b| b.ip().to_string());
    let services = |st: &serde_json::Value| -> Vec<(String, u64, u64, u64)> {
        let gone = st["services"].as_array().unwrap().iter().map(|s| {
            s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| {
                    let addr = b["address"].as_str().unwrap();
                    backend_1.iter().any(|ip| addr.contains(ip.as_str()))
                })
                .map(|b| b["stats"]["new_flows"].as_u64().unwrap())
                .sum::<u64>()
        });
        xlb_tests::agent::service_totals(st)
            .into_iter()
            .zip(gone)
            .map(|((name, packets, new_flows), gone)| (name, packets, new_flows, gone))
            .collect()
    };
    let before = services(&agent.status().unwrap());
    assert!(
        before.iter().any(|(_, _, _, gone)| *gone > 0),
        "backend 1 had no flows to keep: {before:?}"
    );
    let mut agent = agent;
    lab.write_config(&[0, 2]).unwrap();
    agent.reload().unwrap();
    let after = services(&agent.status().unwrap());
    assert_eq!(after.len(), before.len());
    for ((name, packets, new_flows, _), (_, packets_after, new_flows_after, gone_after)) in
        before.iter().zip(&after)
    {
        assert!(
            packets_after >= packets && new_flows_after >= new_flows,
            "{name}: (packets, new flows) {packets}, {new_flows} before backend 1's removal, {packets_after}, {new_flows_after} after"
        );
        assert_eq!(*gone_after, 0, "{name}: backend 1 still listed");
    }

    // Generic mode delivered what it forwarded.
    assert_eq!(counter(&pin, "event_redirect_failed"), 0);
    let drops = counter(&pin, "drop_neighbour_unknown");
    let passes = counter(&pin, "pass_neighbour_unknown");
    totals.insert("storm_frames".into(), sent.into());
    totals.insert("drop_neighbour_unknown".into(), drops.into());
    totals.insert("pass_neighbour_unknown".into(), passes.into());
    report("as_deployed", serde_json::Value::Object(totals));
}

/// Native XDP forced on an untuned veth: the peer has no NAPI, so the kernel drops
/// every redirected frame after xlb counted it as forwarded. Those frames are counted
/// again, as `event_redirect_failed`: forwarded minus failed is what was delivered.
/// (Generic mode, auto's choice on veth, delivers them: see the test above.)
#[test]
fn privileged_native_on_untuned_veth_counts_every_lost_redirect() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(3, Network::AsDeployed).unwrap();
    lab.write_config(&[0, 1, 2]).unwrap();
    let _servers = lab.start_backends(Duration::from_secs(60)).unwrap();
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbr")));
    let _cleanup = xlb_tests::RemoveOnDrop(pin.clone());
    let agent = lab
        .agent()
        .xdp_mode("native")
        .pin_path(&pin)
        .start()
        .unwrap();
    const N: usize = 40;
    let answered = lab
        .client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut answered = 0;
            for i in 0..N {
                s.send_to(format!("q{i}").as_bytes(), (VIP4, 53)).unwrap();
                let mut buf = [0u8; 256];
                answered += s.recv_from(&mut buf).is_ok() as usize;
            }
            answered
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let forwarded = counter(&pin, "fwd_forward");
    let failed = counter(&pin, "event_redirect_failed");
    report(
        "redirect_failures_native_veth",
        serde_json::json!({"sent": N, "answered": answered, "fwd_forward": forwarded, "event_redirect_failed": failed}),
    );
    assert_eq!(
        answered, 0,
        "native XDP on an untuned veth delivered frames"
    );
    assert!(forwarded >= N as u64, "forwarded {forwarded} of {N}");
    assert_eq!(
        failed,
        forwarded,
        "every forwarded frame was lost, and counted as a failed redirect\n{}",
        agent.logs()
    );
}
