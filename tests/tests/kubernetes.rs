//! Kubernetes mode end to end: the real `xlb` binary, in the LB namespace, against the
//! in-process fake API server (list/watch with resourceVersion, bookmarks, 410 Gone,
//! status patches, Events), with real TCP and UDP through the namespaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use xlb_tests::{
    agent::{Agent, Start},
    cfg::{Cfg, Svc},
    fakeapi::{FakeApi, Kind},
    netns::{veth_pair, Netns},
    privileged,
    topology::{LbLab, BACKEND_PORT, VIP4, VIP6},
    traffic::{connect, parse_reply, udp_request},
    unique_name,
};

const NODE: &str = "node-a";

fn service(name: &str, spec: serde_json::Value, status_ips: &[&str]) -> Service {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "xlb.dev/xdp",
            "ipFamilies": ["IPv4"],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "http"},
            ],
        },
    });
    for (k, val) in spec.as_object().unwrap() {
        v["spec"][k] = val.clone();
    }
    if !status_ips.is_empty() {
        let ingress: Vec<_> = status_ips.iter().map(|ip| json!({"ip": ip})).collect();
        v["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    serde_json::from_value(v).unwrap()
}

/// (address, ready, serving, terminating)
type Ep<'a> = (&'a IpAddr, bool, bool, bool);

fn slice(svc: &str, name: &str, v6: bool, eps: &[Ep]) -> EndpointSlice {
    let on_this_node: Vec<(Ep, &str)> = eps.iter().map(|e| (*e, NODE)).collect();
    slice_on(svc, name, v6, &on_this_node)
}

/// Endpoints each with its node.
fn slice_on(svc: &str, name: &str, v6: bool, eps: &[(Ep, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|((ip, ready, serving, terminating), node)| {
            json!({"addresses": [ip.to_string()], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [
            {"name": "http", "port": BACKEND_PORT, "protocol": "TCP"},
            {"name": "dns", "port": BACKEND_PORT, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready(ip: &IpAddr) -> Ep<'_> {
    (ip, true, true, false)
}

struct K8sLab {
    lab: LbLab,
    api: FakeApi,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl K8sLab {
    fn new(extra_ns: &[&Netns]) -> Self {
        let lab = LbLab::two_arm(3).unwrap();
        let mut nss = vec![&lab.lb];
        nss.extend_from_slice(extra_ns);
        let api = FakeApi::start(&nss).unwrap();
        let dir = std::env::temp_dir().join(unique_name("xlbk8s"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = api.kubeconfig(&dir).unwrap();
        K8sLab {
            lab,
            api,
            dir,
            kubeconfig,
        }
    }

    fn agent_in(&self, ns: &Netns, iface: &str, extra: &[&str]) -> Agent {
        let snat4 = self.lab.snat4.to_string();
        let snat6 = self.lab.snat6.to_string();
        Start::new(ns, iface)
            .xdp_mode("generic")
            .args(&["--kubernetes", "--node-name", NODE])
            .args(&["--snat-ipv4", &snat4, "--snat-ipv6", &snat6])
            .args(extra)
            .env("KUBECONFIG", self.kubeconfig.to_str().unwrap())
            .start()
            .unwrap()
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        self.agent_in(&self.lab.lb, &self.lab.iface_arg(), extra)
    }

    fn b(&self, i: usize) -> IpAddr {
        self.lab.backend(i, false).ip()
    }

    /// The Service `web` at VIP4, served by `ready_eps` (the EndpointSlice `web-1`).
    fn serve_web(&self, ready_eps: &[IpAddr]) {
        self.api
            .apply(Kind::Service, &service("web", json!({}), &[VIP4]));
        let eps: Vec<Ep> = ready_eps.iter().map(ready).collect();
        self.api
            .apply(Kind::EndpointSlice, &slice("web", "web-1", false, &eps));
    }
}

impl Drop for K8sLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls the agent's tables until `done` holds for them, or fails after `timeout`.
fn wait_tables(
    pin: &Path,
    timeout: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, Vec<String>>) -> bool,
) -> BTreeMap<String, Vec<String>> {
    let start = Instant::now();
    loop {
        if let Ok(t) = xlb::status::read_tables(pin) {
            if done(&t) {
                return t;
            }
            if start.elapsed() > timeout {
                let summary: BTreeMap<_, BTreeSet<_>> =
                    t.iter().map(|(k, v)| (k, v.iter().collect())).collect();
                panic!("timed out waiting for {what}; tables: {summary:?}");
            }
        } else if start.elapsed() > timeout {
            panic!("timed out waiting for {what}; no tables");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The backends (as addresses) in the table of `key`.
fn members(t: &BTreeMap<String, Vec<String>>, key: &str) -> BTreeSet<String> {
    t.get(key)
        .map(|v| v.iter().cloned().collect())
        .unwrap_or_default()
}

fn addrs(ips: &[IpAddr]) -> BTreeSet<String> {
    ips.iter()
        .map(|ip| SocketAddr::new(*ip, BACKEND_PORT).to_string())
        .collect()
}

fn udp_backend(lab: &LbLab, vip: SocketAddr) -> usize {
    let reply = udp_request(&lab.client, vip, b"ping").unwrap();
    let (name, echoed) = parse_reply(&reply).unwrap();
    assert_eq!(echoed, b"ping");
    xlb_tests::traffic::backend_index(&name)
}

#[test]
fn privileged_k8s_service_serves_and_scaling_keeps_established_flows() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1, b2) = (k.b(0), k.b(1), k.b(2));
    k.serve_web(&[b0, b1]);
    let agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    let udp = format!("{VIP4}:53/udp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| members(t, &tcp) == addrs(&[b0, b1]) && members(t, &udp) == addrs(&[b0, b1]),
    );

    // Traffic to the VIP reaches the endpoints, TCP and UDP.
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut conns = Vec::new();
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let mut c = connect(&k.lab.client, vip);
        let b = c.exchange(&format!("hello {i}")).unwrap();
        assert!(b < 2, "only b0 and b1 are endpoints, got b{b}");
        seen.insert(b);
        conns.push((c, b));
    }
    assert_eq!(seen.len(), 2, "both endpoints get flows");
    let udp_vip: SocketAddr = format!("{VIP4}:53").parse().unwrap();
    assert!(udp_backend(&k.lab, udp_vip) < 2);

    // Scale up: b2 joins; every established flow stays where it was.
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b1), ready(&b2)]),
    );
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "b2 to join",
        |t| members(t, &tcp) == addrs(&[b0, b1, b2]),
    );
    for (i, (c, b)) in conns.iter_mut().enumerate() {
        assert_eq!(
            c.exchange(&format!("after scale-up {i}")).unwrap(),
            *b,
            "flow {i} moved"
        );
    }
    let mut on_b2 = 0;
    for i in 0..60 {
        if connect(&k.lab.client, vip)
            .exchange(&format!("new {i}"))
            .unwrap()
            == 2
        {
            on_b2 += 1;
        }
    }
    assert!(on_b2 > 0, "new flows reach the new endpoint");

    // Scale down: b1 goes; flows on b0 stay on b0.
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b2)]),
    );
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "b1 to leave",
        |t| members(t, &tcp) == addrs(&[b0, b2]),
    );
    for (i, (c, b)) in conns.iter_mut().enumerate().filter(|(_, (_, b))| *b == 0) {
        assert_eq!(
            c.exchange(&format!("after scale-down {i}")).unwrap(),
            *b,
            "flow {i} moved"
        );
    }
    for i in 0..20 {
        let b = connect(&k.lab.client, vip)
            .exchange(&format!("late {i}"))
            .unwrap();
        assert_ne!(b, 1, "no new flow reaches a removed endpoint");
    }
}

#[test]
fn privileged_k8s_terminating_endpoints_drain() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1) = (k.b(0), k.b(1));
    k.serve_web(&[b0, b1]);
    let agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| members(t, &tcp) == addrs(&[b0, b1]),
    );
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    // Flows on b1, bounded: Maglev gives b1 about half.
    let mut on_b1 = Vec::new();
    for i in 0..60 {
        let mut c = connect(&k.lab.client, vip);
        if c.exchange(&format!("m{i}")).unwrap() == 1 {
            on_b1.push(c);
        }
        if on_b1.len() == 4 {
            break;
        }
    }
    assert_eq!(on_b1.len(), 4, "found flows on b1");

    // b1 terminates: still serving, no longer ready.
    k.api.apply(
        Kind::EndpointSlice,
        &slice(
            "web",
            "web-1",
            false,
            &[ready(&b0), (&b1, false, true, true)],
        ),
    );
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "b1 to drain",
        |t| members(t, &tcp) == addrs(&[b0]),
    );
    for (i, c) in on_b1.iter_mut().enumerate() {
        assert_eq!(
            c.exchange(&format!("draining {i}")).unwrap(),
            1,
            "a draining flow keeps its endpoint"
        );
    }
    for i in 0..20 {
        let b = connect(&k.lab.client, vip)
            .exchange(&format!("new {i}"))
            .unwrap();
        assert_eq!(b, 0, "new flows avoid the terminating endpoint");
    }
    // Gone for good: its flows now go elsewhere, new ones too.
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0)]),
    );
    let st = wait_tables(&agent.pin_path, Duration::from_secs(10), "b1 to go", |t| {
        members(t, &tcp) == addrs(&[b0])
    });
    assert!(!st.is_empty());
}

#[test]
fn privileged_k8s_api_outage_keeps_forwarding_and_relists_after_410() {
    if !privileged() {
        return;
    }
    let mut k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1, b2) = (k.b(0), k.b(1), k.b(2));
    k.serve_web(&[b0, b1]);
    let mut agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| members(t, &tcp) == addrs(&[b0, b1]),
    );
    agent
        .wait_for_log("Kubernetes services applied", Duration::from_secs(5))
        .unwrap();
    let applied = agent.count_log("Kubernetes services applied");
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let mut long = connect(&k.lab.client, vip);
    let long_b = long.exchange("before").unwrap();

    // The API server goes away. Forwarding goes on with the last state.
    k.api.stop();
    agent
        .wait_for_log("Kubernetes API watch failed", Duration::from_secs(20))
        .unwrap();
    for i in 0..10 {
        let b = connect(&k.lab.client, vip)
            .exchange(&format!("outage {i}"))
            .unwrap();
        assert!(b < 2);
    }
    assert_eq!(long.exchange("during").unwrap(), long_b);

    // It returns with its history compacted: the watches' resourceVersion is too old,
    // they get 410 Gone and relist. Nothing changed, so nothing is reprogrammed.
    k.api.compact();
    k.api.restart().unwrap();
    agent
        .wait_for_log("Kubernetes API watch is back", Duration::from_secs(30))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.count_log("Kubernetes services applied"),
        applied,
        "a relist of unchanged objects reprograms nothing:\n{}",
        agent.logs()
    );
    assert!(k.api.gone_sent() > 0, "the watches were answered 410 Gone");
    assert!(
        k.api.bookmarks_sent() > 0,
        "the watches asked for and got bookmarks"
    );

    // Changes made after the relist converge.
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b1), ready(&b2)]),
    );
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "b2 after the outage",
        |t| members(t, &tcp) == addrs(&[b0, b1, b2]),
    );
    assert_eq!(long.exchange("after").unwrap(), long_b);
    // And a change made while the server was down (stop, change, compact, start).
    k.api.stop();
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b2)]),
    );
    k.api.compact();
    k.api.restart().unwrap();
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(30),
        "the change made during the outage",
        |t| members(t, &tcp) == addrs(&[b0, b2]),
    );
}

#[test]
fn privileged_k8s_ipam_assigns_and_bad_objects_raise_events() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let b0 = k.b(0);
    let b0v6 = k.lab.backend(0, true).ip();
    // Dual-stack, no address anywhere: the allocator gives one per family. An SCTP
    // port is reported and the others served.
    let mut web = service(
        "web",
        json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
        &[],
    );
    // Two of them: two problems of one reason are two Events, each naming its port.
    for (name, port) in [("sig", 9), ("sig2", 3868)] {
        web.spec.as_mut().unwrap().ports.as_mut().unwrap().push(
            serde_json::from_value(json!({"name": name, "port": port, "protocol": "SCTP"}))
                .unwrap(),
        );
    }
    k.api.apply(Kind::Service, &web);
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-v4", false, &[ready(&b0)]),
    );
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-v6", true, &[ready(&b0v6)]),
    );
    // Invalid: an externalIP that is not an address. Its own Event; web unaffected.
    k.api.apply(
        Kind::Service,
        &service("broken", json!({"externalIPs": ["300.1.2.3"]}), &[]),
    );
    let agent = k.agent(&["--ipam-pool", "10.100.8.0/29,fd00:100:8::/125"]);

    let start = Instant::now();
    let ips = loop {
        let st = k.api.get(Kind::Service, "default", "web").unwrap();
        let ips: Vec<IpAddr> = st["status"]["loadBalancer"]["ingress"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ips.len() == 2 || start.elapsed() > Duration::from_secs(10) {
            break ips;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        ips.len(),
        2,
        "one address per family in the status: {ips:?}\n{}",
        agent.logs()
    );
    let v4 = ips.iter().find(|ip| ip.is_ipv4()).unwrap();
    let v6 = ips.iter().find(|ip| ip.is_ipv6()).unwrap();
    assert!(
        "10.100.8.0/29"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(v4),
        "{v4}"
    );
    assert!(
        "fd00:100:8::/125"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(v6),
        "{v6}"
    );
    let tcp4 = format!("{v4}:80/tcp");
    let tcp6 = format!("[{v6}]:80/tcp");
    let _ = VIP6;
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the allocated VIPs",
        |t| members(t, &tcp4) == addrs(&[b0]) && !members(t, &tcp6).is_empty(),
    );
    // Traffic to the allocated addresses reaches the endpoints.
    for vip in [SocketAddr::new(*v4, 80), SocketAddr::new(*v6, 80)] {
        assert_eq!(
            connect(&k.lab.client, vip).exchange("hi").unwrap(),
            0,
            "{vip}"
        );
    }
    // With ipMode VIP on every entry.
    let st = k.api.get(Kind::Service, "default", "web").unwrap();
    for i in st["status"]["loadBalancer"]["ingress"].as_array().unwrap() {
        assert_eq!(i["ipMode"], "VIP", "{st:#}");
    }
    // Written once (the broken Service got an address too: only its bad externalIP
    // is ignored).
    let writes = k.api.status_writes();
    assert_eq!(
        writes.iter().filter(|(_, n)| n == "web").count(),
        1,
        "{writes:?}"
    );

    // Events: each SCTP port on web, the bad address on broken.
    let start = Instant::now();
    let (sctp, sctp2, bad) = loop {
        let evs = k.api.events();
        let find = |name: &str, reason: &str, note: &str| {
            evs.iter().any(|e| {
                e["regarding"]["name"] == name
                    && e["reason"] == reason
                    && e["note"].as_str().is_some_and(|n| n.contains(note))
            })
        };
        let got = (
            find("web", "UnsupportedProtocol", "(9): protocol SCTP"),
            find("web", "UnsupportedProtocol", "(3868): protocol SCTP"),
            find("broken", "InvalidVIP", ""),
        );
        if got == (true, true, true) || start.elapsed() > Duration::from_secs(10) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(sctp, "an Event for the SCTP port: {:?}", k.api.events());
    assert!(
        sctp2,
        "an Event of its own for the second SCTP port: {:?}",
        k.api.events()
    );
    assert!(bad, "an Event for the bad externalIP: {:?}", k.api.events());
    let tables = xlb::status::read_tables(&agent.pin_path).unwrap();
    assert!(!tables
        .keys()
        .any(|key| key.ends_with(":9/tcp") || key.ends_with(":9/udp") || key.contains(":3868/")));
}

#[test]
fn privileged_k8s_two_agents_build_identical_tables() {
    if !privileged() {
        return;
    }
    // A second "node": its own namespace and interface, the same API server.
    let node2 = Netns::new("kn").unwrap();
    let peer = Netns::new("kp").unwrap();
    let (n2_if, _) = veth_pair(&node2, &["10.50.0.1/24"], &peer, &["10.50.0.2/24"]).unwrap();
    let k = K8sLab::new(&[&node2]);
    // Three Services with different endpoint sets, weights through readiness.
    let ips: Vec<IpAddr> = (0..8)
        .map(|i| format!("10.60.0.{}", i + 10).parse().unwrap())
        .collect();
    for (s, n) in [("a", 3), ("b", 8), ("c", 5)] {
        let vip = format!("10.100.{}.1", 20 + n);
        k.api.apply(Kind::Service, &service(s, json!({}), &[&vip]));
        let eps: Vec<Ep> = ips[..n].iter().map(ready).collect();
        k.api.apply(
            Kind::EndpointSlice,
            &slice(s, &format!("{s}-1"), false, &eps),
        );
    }
    let a1 = k.agent(&[]);
    let a2 = k.agent_in(&node2, &n2_if.name, &[]);
    let full =
        |t: &BTreeMap<String, Vec<String>>| t.len() == 6 && t.values().all(|v| !v.is_empty());
    converge(&a1.pin_path, &a2.pin_path, "the first sync", full);
    // And after a change, again.
    let eps: Vec<Ep> = ips[2..7].iter().map(ready).collect();
    k.api
        .apply(Kind::EndpointSlice, &slice("b", "b-1", false, &eps));
    let changed = |t: &BTreeMap<String, Vec<String>>| {
        ["10.100.28.1:80/tcp", "10.100.28.1:53/udp"]
            .iter()
            .all(|key| {
                t.get(*key)
                    .is_some_and(|v| v.iter().collect::<BTreeSet<_>>().len() == 5)
            })
    };
    converge(&a1.pin_path, &a2.pin_path, "the change", changed);
}

/// Waits until both agents' tables satisfy `done` and are identical. Read while an
/// agent is applying, a snapshot can hold one new table and one old: only the settled
/// state is compared.
fn converge(a: &Path, b: &Path, what: &str, done: impl Fn(&BTreeMap<String, Vec<String>>) -> bool) {
    let start = Instant::now();
    loop {
        let (t1, t2) = (
            xlb::status::read_tables(a).unwrap_or_default(),
            xlb::status::read_tables(b).unwrap_or_default(),
        );
        if done(&t1) && done(&t2) && t1 == t2 {
            return;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let differ: Vec<&String> = t1.keys().filter(|k| t1.get(*k) != t2.get(*k)).collect();
            panic!(
                "{what}: the two agents' tables did not converge; services that differ: {differ:?}; keys {:?} vs {:?}",
                t1.keys().collect::<Vec<_>>(),
                t2.keys().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long an EndpointSlice change takes to reach the maps: from the API server's
/// write to the moment the table read from the pinned map shows it. Measured over many
/// changes; reported, not asserted (only that every change arrives).
#[test]
fn privileged_k8s_endpointslice_to_map_latency() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let ips: Vec<IpAddr> = (0..12)
        .map(|i| format!("10.60.1.{}", i + 10).parse().unwrap())
        .collect();
    k.serve_web(&ips[..6]);
    let agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| members(t, &tcp).len() == 6,
    );
    const CHANGES: usize = 100;
    let mut lat = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        // A sliding window of 6 endpoints: one joins, one leaves, each time.
        let set: Vec<IpAddr> = (0..6).map(|j| ips[(i + 1 + j) % ips.len()]).collect();
        let eps: Vec<Ep> = set.iter().map(ready).collect();
        let want = addrs(&set);
        let t0 = Instant::now();
        k.api
            .apply(Kind::EndpointSlice, &slice("web", "web-1", false, &eps));
        // The backends map is the cheap thing to poll: the agent removes the leaving
        // backend from it last, after the new table is in place.
        loop {
            let now: BTreeSet<String> = xlb::status::read_services(&agent.pin_path)
                .unwrap()
                .into_iter()
                .filter(|s| s.vip == VIP4 && s.port == 80 && s.protocol == "tcp")
                .flat_map(|s| s.backends.into_iter().map(|b| b.address))
                .collect();
            if now == want {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "change {i} never arrived"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    let report = json!({
        "changes": CHANGES,
        "p50_ms": pct(0.50).as_secs_f64() * 1e3,
        "p99_ms": pct(0.99).as_secs_f64() * 1e3,
        "max_ms": lat.last().unwrap().as_secs_f64() * 1e3,
        "debounce_quiet_ms": xlb::k8s::controller::DEBOUNCE_QUIET.as_millis() as u64,
    });
    println!("EndpointSlice change → map update: {report}");
    xlb_tests::report("k8s_endpointslice_latency", report.clone());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("k8s_latency.json"), report.to_string());
}

/// GET http://127.0.0.1:{port}/ from inside `ns`: (status code, body).
fn http_get(ns: &Netns, port: u16) -> (u16, String) {
    use std::io::{Read, Write};
    ns.run(move || {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    })
    .unwrap()
}

/// externalTrafficPolicy: Local serves only this node's endpoints and answers the
/// health check node port; sessionAffinity: ClientIP keeps a client on one backend
/// whatever its source port.
#[test]
fn privileged_k8s_local_policy_health_port_and_client_affinity() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1, b2) = (k.b(0), k.b(1), k.b(2));
    const HC_PORT: u16 = 32123;
    let spec = json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": HC_PORT,
                      "sessionAffinity": "ClientIP"});
    k.api.apply(Kind::Service, &service("web", spec, &[VIP4]));
    let eps = [
        (ready(&b0), NODE),
        (ready(&b1), NODE),
        (ready(&b2), "node-b"),
    ];
    k.api
        .apply(Kind::EndpointSlice, &slice_on("web", "web-1", false, &eps));
    let agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the local endpoints",
        |t| members(t, &tcp) == addrs(&[b0, b1]),
    );
    let start = Instant::now();
    let (code, body) = loop {
        let got = std::panic::catch_unwind(|| http_get(&k.lab.lb, HC_PORT));
        match got {
            Ok(r) => break r,
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(_) => panic!("no health check node port:\n{}", agent.logs()),
        }
    };
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 2);
    assert_eq!(v["service"]["name"], "web");

    // One client, many source ports: one backend, and a local one.
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let first = connect(&k.lab.client, vip).exchange("first").unwrap();
    assert!(first < 2, "only this node's endpoints, got b{first}");
    for i in 0..20 {
        let b = connect(&k.lab.client, vip)
            .exchange(&format!("again {i}"))
            .unwrap();
        assert_eq!(b, first, "ClientIP affinity keeps the client on b{first}");
    }

    // No local endpoint left: the health port says so (503), and the VIP has none.
    let eps = [(ready(&b0), "node-b"), (ready(&b1), "node-b")];
    k.api
        .apply(Kind::EndpointSlice, &slice_on("web", "web-1", false, &eps));
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "no local endpoints",
        |t| members(t, &tcp).is_empty(),
    );
    let start = Instant::now();
    loop {
        let (code, body) = http_get(&k.lab.lb, HC_PORT);
        if code == 503 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["localEndpoints"], 0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {code}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) for an Event with `reason` whose text contains `needle`.
fn wait_event(api: &FakeApi, reason: &str, needle: &str) {
    let start = Instant::now();
    while !api.events().iter().any(|e| {
        let text = format!("{} {}", e["note"], e["message"]);
        e["reason"] == reason && text.contains(needle)
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {reason} Event with {needle:?}: {:?}",
            api.events()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `spec.loadBalancerSourceRanges` from the API: the client (10.30.0.2, and a second
/// address 10.30.0.3 of its namespace) inside the ranges is answered, the other is
/// denied; an update of the Service swaps them; an invalid range stops the Service
/// being served, with an Event naming the range.
#[test]
fn privileged_k8s_load_balancer_source_ranges_and_their_update() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    k.lab.add_client_addresses(&["10.30.0.3/24"]).unwrap();
    let (inside, outside): (IpAddr, IpAddr) =
        ("10.30.0.2".parse().unwrap(), "10.30.0.3".parse().unwrap());
    let (b0, b1) = (k.b(0), k.b(1));
    let with_ranges =
        |ranges: &[&str]| service("web", json!({"loadBalancerSourceRanges": ranges}), &[VIP4]);
    k.api.apply(Kind::Service, &with_ranges(&["10.30.0.2/32"]));
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b1)]),
    );
    let agent = k.agent(&[]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| members(t, &tcp) == addrs(&[b0, b1]),
    );
    let vip: IpAddr = VIP4.parse().unwrap();
    let n = 50;
    let answered = |src: IpAddr, wait_ms: u64| {
        xlb_tests::traffic::burst(
            &k.lab.client,
            src,
            vip,
            (80, 53),
            n,
            Duration::from_millis(wait_ms),
        )
        .unwrap()
    };
    let all = xlb_tests::traffic::Burst {
        tcp_answered: n,
        udp_answered: n,
    };
    let none = xlb_tests::traffic::Burst::default();
    assert_eq!(answered(inside, 5000), all, "inside the ranges");
    assert_eq!(answered(outside, 1500), none, "outside the ranges");

    // The Service's ranges change: applied within the usual latency.
    k.api.apply(Kind::Service, &with_ranges(&["10.30.0.3/32"]));
    let start = Instant::now();
    loop {
        let st = agent.status().unwrap();
        let svc = st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["port"] == 80)
            .cloned()
            .unwrap();
        if svc["allow"] == json!(["10.30.0.3/32"]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ranges not updated: {svc}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(answered(outside, 5000), all, "now inside the ranges");
    assert_eq!(answered(inside, 1500), none, "now outside the ranges");

    // An invalid range: the Service is not served, and an Event says why.
    k.api.apply(Kind::Service, &with_ranges(&["10.30.0.0/33"]));
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service withdrawn",
        |t| !t.contains_key(&tcp),
    );
    wait_event(&k.api, "InvalidSourceRange", "10.30.0.0/33");
}

/// The Kubernetes side follows the config file through reloads: a SIGHUP that adds
/// file services changes the room the Kubernetes services have (`--max-services`) and
/// what they are checked against (a file service's VIP, port and protocol stay the
/// file's). Before, the controller kept the copy of the file it was started with, and
/// such a reload was rejected whole for the Kubernetes list made before it.
#[test]
fn privileged_k8s_side_follows_a_reload_that_adds_file_services() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let (b0, b1) = (k.b(0), k.b(1));
    // Two Service ports (TCP 80, UDP 53) on VIP4.
    k.serve_web(&[b0, b1]);
    let cfg = k.dir.join("base.yaml");
    std::fs::write(&cfg, "services: []\n").unwrap();
    let mut agent = k.agent(&["--config", cfg.to_str().unwrap(), "--max-services", "3"]);
    let tcp = format!("{VIP4}:80/tcp");
    let udp = format!("{VIP4}:53/udp");
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Service",
        |t| t.contains_key(&tcp) && t.contains_key(&udp),
    );
    // The file now claims VIP4:80/tcp itself and adds another service: three in all,
    // so one Kubernetes service port fits, and it cannot be VIP4:80/tcp.
    let file_backend = SocketAddr::new(b1, BACKEND_PORT);
    Cfg::new()
        .service(Svc::tcp("file-web", VIP4, 80).backends([file_backend]))
        .service(Svc::tcp("file-other", VIP4, 8443).backends([file_backend]))
        .write(&cfg)
        .unwrap();
    agent.reload().expect("the reload is applied, not rejected");
    let t = wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "file and Kubernetes services",
        |t| t.len() == 3 && t.contains_key(&format!("{VIP4}:8443/tcp")) && t.contains_key(&udp),
    );
    assert_eq!(
        members(&t, &tcp),
        [file_backend.to_string()].into(),
        "VIP4:80/tcp is the file's"
    );
    // The controller said why the Kubernetes port was left out.
    wait_event(&k.api, "InvalidService", "is a service of the config file");
}

/// `xlb.dev/conntrack` end to end: "false" on a Service forwarded by nat (Cluster, the
/// default) is refused with the config file's reason as an Event and not served; with
/// `externalTrafficPolicy: Local` (dnat) it is served and `xlb status` shows its
/// entries stateless (the service entry's SVC_F_STATELESS); another value is an
/// Event and keeps conntrack on; "false" again sets the flag and "true" clears it.
#[test]
fn privileged_k8s_conntrack_annotation_is_refused_on_nat_and_marks_dnat_stateless() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1) = (k.b(0), k.b(1));
    let annotated = |spec: serde_json::Value, value: &str| {
        let mut s = service("dns", spec, &[VIP4]);
        s.metadata.annotations =
            Some([("xlb.dev/conntrack".to_string(), value.to_string())].into());
        s
    };
    let local = || json!({"externalTrafficPolicy": "Local"});
    k.api.apply(Kind::Service, &annotated(json!({}), "false"));
    k.api.apply(
        Kind::EndpointSlice,
        &slice("dns", "dns-1", false, &[ready(&b0), ready(&b1)]),
    );
    let agent = k.agent(&[]);
    let (tcp, udp) = (format!("{VIP4}:80/tcp"), format!("{VIP4}:53/udp"));
    wait_event(&k.api, "InvalidService", "refused for mode nat");
    wait_event(&k.api, "InvalidService", "SNAT port");
    let t = xlb::status::read_tables(&agent.pin_path).unwrap();
    assert!(
        !t.contains_key(&tcp) && !t.contains_key(&udp),
        "a nat Service with the annotation is not served: {t:?}"
    );

    // The VIP's services in `xlb status --json`: (protocol, mode, stateless).
    let shown = || -> Vec<(String, String, bool)> {
        let st = agent.status().unwrap();
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["vip"] == VIP4)
            .map(|s| {
                (
                    s["protocol"].as_str().unwrap().to_owned(),
                    s["mode"].as_str().unwrap().to_owned(),
                    s["stateless"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let wait_shown = |stateless: bool| {
        let want: Vec<(String, String, bool)> = ["tcp", "udp"]
            .iter()
            .map(|p| (p.to_string(), "dnat".to_owned(), stateless))
            .collect();
        let start = Instant::now();
        loop {
            let mut got = shown();
            got.sort();
            if got == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "status shows {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Local: dnat, served, stateless, and it answers.
    k.api.apply(Kind::Service, &annotated(local(), "false"));
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(10),
        "the Local Service",
        |t| members(t, &udp) == addrs(&[b0, b1]) && members(t, &tcp) == addrs(&[b0, b1]),
    );
    wait_shown(true);
    let vip: SocketAddr = format!("{VIP4}:53").parse().unwrap();
    assert!(udp_backend(&k.lab, vip) < 2);
    let out =
        xlb_tests::agent::xlb_cmd(&["status", "--pin-path", agent.pin_path.to_str().unwrap()])
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("service #") && l.contains(&format!(" {VIP4}:")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(", stateless (no conntrack)")),
        "{text}"
    );

    // Another value: an Event, and conntrack is on again.
    k.api.apply(Kind::Service, &annotated(local(), "off"));
    wait_event(&k.api, "InvalidAnnotation", "keeping conntrack on");
    wait_shown(false);
    // "false" again, then "true".
    k.api.apply(Kind::Service, &annotated(local(), "false"));
    wait_shown(true);
    k.api.apply(Kind::Service, &annotated(local(), "true"));
    wait_shown(false);
    assert!(udp_backend(&k.lab, vip) < 2);
}

/// An API server that takes requests and never answers, while the controller has a
/// status to write: kube's client has no read timeout, and before the fix that write
/// held the controller for good, so no EndpointSlice change reached the maps after it
/// (the watches still deliver them). Now a status write has 2 s, then waits 5 s.
#[test]
fn privileged_k8s_hung_status_write_does_not_stop_endpoint_updates() {
    if !privileged() {
        return;
    }
    let k = K8sLab::new(&[]);
    let _servers = k.lab.start_backends(Duration::from_secs(60)).unwrap();
    let (b0, b1) = (k.b(0), k.b(1));
    k.serve_web(&[b0]);
    let agent = k.agent(&["--ipam-pool", "10.100.9.0/29"]);
    let tcp = format!("{VIP4}:80/tcp");
    wait_tables(&agent.pin_path, Duration::from_secs(10), "web", |t| {
        members(t, &tcp) == addrs(&[b0])
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !k.api.status_writes().iter().any(|(_, n)| n == "web") {
        assert!(Instant::now() < deadline, "web's status:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(20));
    }

    k.api.hang(true);
    // A Service that needs an address: its status write will not be answered.
    k.api.apply(Kind::Service, &service("web2", json!({}), &[]));
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web2", "web2-1", false, &[ready(&b1)]),
    );
    std::thread::sleep(Duration::from_secs(1));
    k.api.apply(
        Kind::EndpointSlice,
        &slice("web", "web-1", false, &[ready(&b0), ready(&b1)]),
    );
    let t0 = Instant::now();
    wait_tables(
        &agent.pin_path,
        Duration::from_secs(15),
        "web's new endpoint while a status write hangs",
        |t| members(t, &tcp) == addrs(&[b0, b1]),
    );
    let took = t0.elapsed();
    assert!(
        agent.logs().contains("writing the status took longer than"),
        "the stalled write is said:\n{}",
        agent.logs()
    );
    k.api.hang(false);
    eprintln!("web's endpoint reached the maps {took:?} after its change");
}
