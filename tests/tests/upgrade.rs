//! An upgrade as a DaemonSet rollout does it, end to end: the xlb of an older commit,
//! built from this repository's own history (`scripts/upgrade_base.sh`, once, into
//! target/upgrade-base/bin/), runs with nat, dnat and dsr services and long-lived TCP
//! flows; it is stopped with SIGTERM (the datapath stays pinned) and this build starts
//! on the same pins. Every flow keeps its backend: 0 broken, and 0 re-created
//! (`event_flow_recreated`). Once from each older commit the script builds: one with
//! the kernel's LRU maps under the flows, one with xlb's own table bucketed by the
//! earlier flow hash.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use xlb_tests::{
    agent::{status_json, status_json_of},
    cfg::{Cfg, Svc},
    peer::{parse, serve},
    privileged, report,
    segment::SegmentLab,
    topology::VIP4,
    unique_name, RemoveOnDrop,
};

const MODES: [(&str, u16); 3] = [("nat", 80), ("dnat", 81), ("dsr", 82)];
const FLOWS: usize = 8;

/// The commits scripts/upgrade_base.sh builds by default.
const BASES: usize = 2;

/// The older builds there are: (commit, binary).
fn old_xlbs() -> Vec<(String, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/upgrade-base/bin");
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let commit = path.file_name()?.to_str()?.strip_prefix("xlb-")?.to_owned();
            (!commit.ends_with(".tmp")).then_some((commit, path))
        })
        .collect();
    out.sort();
    out
}

fn exchange(s: &mut TcpStream, msg: &str) -> Option<usize> {
    s.write_all(msg.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    let (b, _, echoed) = parse(&buf[..n])?;
    (echoed == msg).then_some(b)
}

#[test]
fn privileged_upgrade_from_an_older_commit_keeps_every_flow() {
    if !privileged() {
        return;
    }
    let olds = old_xlbs();
    if olds.len() < BASES {
        assert!(
            std::env::var("CI").is_err(),
            "target/upgrade-base/bin has {} older xlb builds of {BASES}: scripts/test.sh builds them (scripts/upgrade_base.sh)",
            olds.len()
        );
        if olds.is_empty() {
            eprintln!("SKIPPED: no older xlb built; run scripts/upgrade_base.sh");
            return;
        }
    }
    for (commit, old) in &olds {
        upgrade_from(commit, old);
    }
}

fn upgrade_from(commit: &str, old: &std::path::Path) {
    let lab = SegmentLab::new(1, 2).unwrap();
    lab.backends_return_via(0).unwrap();
    lab.vips_on_backends().unwrap();
    let life = Duration::from_secs(120);
    let _servers: Vec<_> = lab
        .backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            MODES
                .iter()
                .flat_map(move |(_, port)| serve(&b.ns, i, *port, &[], life))
        })
        .collect();
    let _decap = lab.decap_agents();
    let services = MODES.iter().map(|(mode, port)| {
        Svc::tcp(*mode, VIP4, *port)
            .mode(xlb_tests::cfg::mode(mode))
            .backends(lab.backends.iter().map(|b| SocketAddr::new(b.addr4, *port)))
    });
    let cfg = std::env::temp_dir().join(format!("{}.yaml", unique_name("xup")));
    let _cfg_guard = RemoveOnDrop(cfg.clone());
    Cfg::new().services(services).write(&cfg).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xup")));
    let _pin_guard = RemoveOnDrop(pin.clone());
    let lb = &lab.lbs[0];
    // Both on the same pins, with the same arguments.
    let agent = || lb.agent().config(&cfg).pin_path(&pin);
    let mut older = agent().bin(old).start().unwrap();

    // Long-lived flows through the older agent, each on its backend.
    let vip: IpAddr = VIP4.parse().unwrap();
    let mut flows = Vec::new();
    for (mode, port) in MODES {
        for i in 0..FLOWS {
            let mut s = lab
                .client
                .run(move || {
                    TcpStream::connect_timeout(&SocketAddr::new(vip, port), Duration::from_secs(5))
                })
                .unwrap()
                .unwrap_or_else(|e| {
                    panic!("from {commit}: {mode} flow {i}: {e}\n{}", older.logs())
                });
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let b = exchange(&mut s, &format!("{mode}{i}"))
                .unwrap_or_else(|| panic!("from {commit}: {mode} flow {i} before"));
            flows.push((mode, s, b));
        }
    }
    // Each service's (packets, new flows), as `bin`'s `xlb status` reads the pins (this
    // build's cannot read the oldest's layouts).
    let totals = |bin: &std::path::Path| {
        xlb_tests::agent::service_totals(&status_json_of(bin, &pin).unwrap())
    };
    let before = totals(old);
    // The rollout: the old pod goes (SIGTERM keeps the datapath), the new one adopts it.
    assert!(older.stop_with(libc::SIGTERM).unwrap().success());
    let newer = agent().start().unwrap();
    let mut broken = Vec::new();
    for (k, (mode, s, b)) in flows.iter_mut().enumerate() {
        if exchange(s, &format!("after{k}")) != Some(*b) {
            broken.push(format!("{mode} flow {k}"));
        }
    }
    // The counters carry on: this datapath counts a service's traffic on its backends
    // alone, and the agent converts the older one's per-service counts. Unless the
    // counter maps had another layout (the oldest base's had no `denied`): then they
    // were replaced, with a warning, and start again from zero.
    let after = totals(&xlb_tests::agent::xlb_bin().unwrap());
    let logs = newer.logs();
    let replaced = ["XLB_SERVICE_STATS", "XLB_BACKEND_STATS"]
        .iter()
        .any(|m| logs.contains(&format!("map={m}")) && logs.contains("another layout"));
    assert_eq!(
        after.len(),
        before.len(),
        "services before {before:?}, after {after:?}"
    );
    for ((name, packets, new_flows), (_, packets_after, new_flows_after)) in
        before.iter().zip(&after)
    {
        if replaced {
            assert_eq!(
                *new_flows_after, 0,
                "{name}: new flows in replaced counters, from {commit}"
            );
            continue;
        }
        assert_eq!(
            new_flows_after, new_flows,
            "{name}: new flows across the upgrade from {commit}"
        );
        assert!(
            packets_after > packets,
            "{name}: {packets} packets before the upgrade from {commit}, {packets_after} after"
        );
    }
    let st = status_json(&pin).unwrap();
    let recreated = st["counters"]["event_flow_recreated"]["packets"]
        .as_u64()
        .unwrap();
    assert!(
        broken.is_empty(),
        "broken by the upgrade from {commit}: {broken:?}\n{}",
        newer.logs()
    );
    assert_eq!(
        recreated, 0,
        "flows re-created after the upgrade from {commit}"
    );
    report(
        "upgrade",
        serde_json::json!({"from": commit,
                           "flows": flows.len(), "broken": broken.len(), "recreated": recreated,
                           "counters_carried_on": !replaced}),
    );
}
