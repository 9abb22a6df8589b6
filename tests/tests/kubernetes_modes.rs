//! Kubernetes' traffic policies, end to end, against the fake API server: two nodes on
//! a shared segment behind a router, each running `xlb run --kubernetes` with default
//! flags, and a "pod" behind each node (a namespace behind a veth of the node, reached
//! by the node's own routes; no CNI). The router sends the VIPs to node A.
//!
//! - `externalTrafficPolicy: Local`: dnat to node A's pod, which sees the client.
//! - `Cluster` with `xlb.dev/forwarding: dsr`: node A spreads flows over both pods,
//!   node B's by IP-in-IP to node B, whose xlb decapsulates, DNATs to its pod and
//!   translates the pod's reply at TC egress; every pod sees the client, and node B's
//!   replies never pass node A.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use xlb_tests::{
    agent::{status_json, Agent},
    fakeapi::{FakeApi, Kind},
    peer::{one_try_each, serve},
    privileged, report,
    segment::{Node as LabNode, SegmentLab},
    topology::{VIP4, VIP6},
    unique_name, RemoveOnDrop,
};

const POD_PORT: u16 = 8080;
const NODES: [&str; 2] = ["node-a", "node-b"];

fn service(policy: &str, forwarding: Option<&str>) -> Service {
    let mut v = json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "xlb.dev/xdp",
            "ipFamilies": ["IPv4", "IPv6"],
            "externalTrafficPolicy": policy,
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": POD_PORT},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": POD_PORT},
            ],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": VIP4}, {"ip": VIP6}]}},
    });
    if let Some(f) = forwarding {
        v["metadata"]["annotations"] = json!({"xlb.dev/forwarding": f});
    }
    serde_json::from_value(v).unwrap()
}

fn slice(v6: bool, pods: &[(&LabNode, &str)]) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(p, node)| {
            let a = if v6 { p.addr6 } else { p.addr4 };
            json!({"addresses": [a.to_string()], "nodeName": node, "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": if v6 { "web-v6" } else { "web-v4" }, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [
            {"name": "http", "port": POD_PORT, "protocol": "TCP"},
            {"name": "dns", "port": POD_PORT, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn node(name: &str, n: &LabNode) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": n.addr4.to_string()},
            {"type": "InternalIP", "address": n.addr6.to_string()},
        ]},
    }))
    .unwrap()
}

struct Cluster {
    lab: SegmentLab,
    pods: Vec<LabNode>,
    api: FakeApi,
    dir: PathBuf,
    agents: Vec<(Agent, PathBuf, RemoveOnDrop)>,
}

impl Cluster {
    fn new() -> Self {
        let lab = SegmentLab::new(2, 0).unwrap();
        let pods: Vec<LabNode> = (0..2).map(|k| lab.pod_on_lb(k, k).unwrap()).collect();
        let api = FakeApi::start(&[&lab.lbs[0].ns, &lab.lbs[1].ns]).unwrap();
        let dir = std::env::temp_dir().join(unique_name("xk8m"));
        std::fs::create_dir_all(&dir).unwrap();
        for (k, name) in NODES.iter().enumerate() {
            api.apply(Kind::Node, &node(name, &lab.lbs[k]));
        }
        Cluster {
            lab,
            pods,
            api,
            dir,
            agents: Vec::new(),
        }
    }

    /// `xlb run --kubernetes` on both nodes, with nothing but its interface, its node
    /// name and a pin path of the test's own.
    fn start_agents(&mut self) {
        let kubeconfig = self.api.kubeconfig(&self.dir).unwrap();
        for (k, name) in NODES.iter().enumerate() {
            let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xk8p")));
            let node = &self.lab.lbs[k];
            let agent = node
                .agent()
                .args(&["--kubernetes", "--node-name", name])
                .env("KUBECONFIG", kubeconfig.to_str().unwrap())
                .pin_path(&pin)
                .start()
                .unwrap();
            self.agents.push((agent, pin.clone(), RemoveOnDrop(pin)));
        }
    }

    fn pin(&self, k: usize) -> &Path {
        &self.agents[k].1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn counter(pin: &Path, name: &str) -> u64 {
    status_json(pin).unwrap()["counters"][name]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (bounded) until the agent at `pin` programs `n` services.
fn wait_services(pin: &Path, n: usize, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = status_json(pin)
            .ok()
            .and_then(|s| s["services"].as_array().map(Vec::len))
            .unwrap_or(0);
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} services programmed, want {n}\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn traffic(c: &Cluster, n_pods: usize) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (vip, me) in [(VIP4, c.lab.client4), (VIP6, c.lab.client6)] {
        let vip: IpAddr = vip.parse().unwrap();
        let o = one_try_each(&c.lab.client, me, vip, 50, n_pods);
        assert!(
            o.lost == 0 && o.wrong_peer.is_empty(),
            "{vip}: {} lost (first {:?}); pods that saw another address than the client's: {:?}\nnode A: {}\nnode B: {}",
            o.lost,
            o.first_err,
            o.wrong_peer,
            c.agents[0].0.logs(),
            c.agents[1].0.logs()
        );
        out.insert(
            vip.to_string(),
            json!({"exchanges": 100, "lost": 0, "per_pod": o.per_backend, "client_address_seen": 100}),
        );
        assert!(
            o.per_backend.iter().all(|&p| p > 0),
            "{vip}: every pod takes flows: {:?}",
            o.per_backend
        );
    }
    serde_json::Value::Object(out)
}

#[test]
fn privileged_k8s_local_policy_pods_see_the_client() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::new();
    let life = Duration::from_secs(60);
    let any = SocketAddr::from(([0u16; 8], POD_PORT));
    let _servers: Vec<_> = c
        .pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| serve(&p.ns, i, POD_PORT, &[any], life))
        .collect();
    c.api.apply(Kind::Service, &service("Local", None));
    let pods: Vec<(&LabNode, &str)> = c.pods.iter().zip(NODES).collect();
    c.api.apply(Kind::EndpointSlice, &slice(false, &pods));
    c.api.apply(Kind::EndpointSlice, &slice(true, &pods));
    c.start_agents();
    // 2 ports × 2 VIPs on each node.
    wait_services(c.pin(0), 4, &c.agents[0].0);
    let st = status_json(c.pin(0)).unwrap();
    for s in st["services"].as_array().unwrap() {
        let b = s["backends"].as_array().unwrap();
        assert_eq!(b.len(), 1, "node A's own pod only: {s:#}");
    }
    // Only node A's pod: the router sends every flow there.
    let mut counts = serde_json::Map::new();
    for (vip, me) in [(VIP4, c.lab.client4), (VIP6, c.lab.client6)] {
        let vip: IpAddr = vip.parse().unwrap();
        let o = one_try_each(&c.lab.client, me, vip, 50, 2);
        assert!(
            o.lost == 0 && o.wrong_peer.is_empty() && o.per_backend == [100, 0],
            "{vip}: lost {} ({:?}), wrong peers {:?}, per pod {:?}",
            o.lost,
            o.first_err,
            o.wrong_peer,
            o.per_backend
        );
        counts.insert(
            vip.to_string(),
            json!({"exchanges": 100, "lost": 0, "client_address_seen": 100}),
        );
    }
    assert!(counter(c.pin(0), "event_egress_translated") >= 200);
    report("k8s_local_policy_dnat", serde_json::Value::Object(counts));
}

#[test]
fn privileged_k8s_cluster_dsr_spreads_over_nodes_and_pods_see_the_client() {
    if !privileged() {
        return;
    }
    let mut c = Cluster::new();
    let life = Duration::from_secs(60);
    let any = SocketAddr::from(([0u16; 8], POD_PORT));
    let _servers: Vec<_> = c
        .pods
        .iter()
        .enumerate()
        .flat_map(|(i, p)| serve(&p.ns, i, POD_PORT, &[any], life))
        .collect();
    c.api.apply(Kind::Service, &service("Cluster", Some("dsr")));
    let pods: Vec<(&LabNode, &str)> = c.pods.iter().zip(NODES).collect();
    c.api.apply(Kind::EndpointSlice, &slice(false, &pods));
    c.api.apply(Kind::EndpointSlice, &slice(true, &pods));
    c.start_agents();
    // Per port and VIP: the dsr service and the one for packets from the tunnel.
    for k in 0..2 {
        wait_services(c.pin(k), 8, &c.agents[k].0);
    }
    // Status says how each endpoint is reached.
    let st = status_json(c.pin(0)).unwrap();
    let web4 = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vip"] == VIP4 && s["port"] == 80 && s["encapsulated"] == false)
        .unwrap_or_else(|| panic!("{st:#}"));
    assert_eq!(web4["mode"], "dsr", "{web4:#}");
    let how: Vec<(String, serde_json::Value, bool)> = web4["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["via"].clone(),
                b["dnat_here"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        how,
        [
            (
                format!("{}:{POD_PORT}", c.pods[0].addr4),
                serde_json::Value::Null,
                true
            ),
            (
                format!("{}:{POD_PORT}", c.pods[1].addr4),
                json!(c.lab.lbs[1].addr4.to_string()),
                false
            ),
        ]
    );
    let st_b = status_json(c.pin(1)).unwrap();
    assert!(st_b["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["encapsulated"] == true
            && s["mode"] == "dnat"
            && s["backends"].as_array().unwrap().len() == 1));
    let mut counts = traffic(&c, 2);
    let a_reverse = counter(c.pin(0), "fwd_reverse");
    let b_decap = counter(c.pin(1), "seen_ipv4_tcp") + counter(c.pin(1), "seen_ipv6_tcp");
    let b_egress = counter(c.pin(1), "event_egress_translated");
    let a_egress = counter(c.pin(0), "event_egress_translated");
    assert_eq!(a_reverse, 0, "no reply came back through node A's XDP");
    assert!(
        b_decap > 0 && b_egress > 0,
        "node B decapsulated ({b_decap}) and answered from there ({b_egress})"
    );
    assert!(
        a_egress > 0,
        "node A's own pod answered through its egress ({a_egress})"
    );
    counts["node_b_replies_translated"] = b_egress.into();
    counts["node_a_replies_translated"] = a_egress.into();
    report("k8s_cluster_dsr", counts);
}

/// L2 in Kubernetes: one owner per VIP through a Lease per VIP, against the fake API
/// server. Two nodes on a segment with an on-link client (no route, no static
/// neighbour). The owner answers ARP/NDP; when it fails (agent killed, its link
/// down: it stops renewing), the other node takes the Lease and the VIP over, and the
/// client's entry moves. Failover is measured from the kill.
#[test]
fn privileged_k8s_l2_lease_per_vip_and_failover() {
    if !privileged() {
        return;
    }
    const L2_VIP4: &str = "10.61.0.100";
    const L2_VIP6: &str = "fd61::100";
    let lab = SegmentLab::new(2, 3).unwrap();
    let client = lab.client_on_segment().unwrap();
    let life = Duration::from_secs(60);
    let _servers: Vec<_> = (0..3)
        .flat_map(|i| {
            serve(
                &lab.backends[i].ns,
                i,
                80,
                &[SocketAddr::from(([0u16; 8], 53))],
                life,
            )
        })
        .collect();
    let api = FakeApi::start(&[&lab.lbs[0].ns, &lab.lbs[1].ns]).unwrap();
    let dir = std::env::temp_dir().join(unique_name("xk8l"));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = RemoveOnDrop(dir.clone());
    let mut svc: serde_json::Value = serde_json::to_value(service("Cluster", None)).unwrap();
    svc["status"]["loadBalancer"]["ingress"] = json!([{"ip": L2_VIP4}, {"ip": L2_VIP6}]);
    svc["spec"]["ports"] = json!([
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
    ]);
    api.apply(Kind::Service, &svc);
    for v6 in [false, true] {
        let endpoints: Vec<_> = lab
            .backends
            .iter()
            .map(|b| {
                let a = if v6 { b.addr6 } else { b.addr4 };
                json!({"addresses": [a.to_string()], "nodeName": "node-x", "conditions": {"ready": true}})
            })
            .collect();
        let s = json!({
            "metadata": {"name": if v6 { "web-v6" } else { "web-v4" }, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
            "endpoints": endpoints,
        });
        api.apply(Kind::EndpointSlice, &s);
    }
    let kubeconfig = api.kubeconfig(&dir).unwrap();
    let mut agents: Vec<(Agent, PathBuf, RemoveOnDrop)> = (0..2)
        .map(|k| {
            let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xk8l")));
            let n = &lab.lbs[k];
            let a = n
                .agent()
                .args(&["--kubernetes", "--node-name", NODES[k]])
                .args(&["--announce-l2", &n.iface])
                .env("KUBECONFIG", kubeconfig.to_str().unwrap())
                .pin_path(&pin)
                .start()
                .unwrap();
            (a, pin.clone(), RemoveOnDrop(pin))
        })
        .collect();
    let lease = |vip: &str| xlb::k8s::lease::lease_name(vip.parse().unwrap());
    let holder = |vip: &str| api.lease_holder("xlb-system", &lease(vip));
    let deadline = Instant::now() + Duration::from_secs(15);
    while holder(L2_VIP4).is_none() || holder(L2_VIP6).is_none() {
        assert!(
            Instant::now() < deadline,
            "no Lease holders:\n{}\n{}",
            agents[0].0.logs(),
            agents[1].0.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let macs: Vec<String> = (0..2)
        .map(|k| lab.lbs[k].ns.mac_string(&lab.lbs[k].iface).unwrap())
        .collect();
    let exchange_with = |vip: &str, n: usize| {
        let vip: IpAddr = vip.parse().unwrap();
        let me = if vip.is_ipv4() {
            client.addr4
        } else {
            client.addr6
        };
        let o = one_try_each(&client.ns, me, vip, n, 3);
        o.per_backend.iter().sum::<usize>()
    };
    for vip in [L2_VIP4, L2_VIP6] {
        assert!(
            exchange_with(vip, 5) == 10,
            "{vip} reachable through the owner's answers"
        );
        let owner = NODES
            .iter()
            .position(|n| Some(n.to_string()) == holder(vip))
            .unwrap();
        assert_eq!(
            client.ns.neighbour_mac(vip).as_deref(),
            Some(macs[owner].as_str()),
            "{vip}: the Lease holder answered"
        );
    }
    // Each announcement is an Event on the Service naming the node and the VIP: one
    // per VIP, even when one node holds both (kube's recorder alone would fold the
    // second into the first's series, its note naming the first VIP).
    for vip in [L2_VIP4, L2_VIP6] {
        let k = NODES
            .iter()
            .position(|n| Some(n.to_string()) == holder(vip))
            .unwrap();
        wait_for_announced(&api, NODES[k], vip, &agents[k].0);
    }
    // The owner of the IPv4 VIP fails: killed, and its link goes down.
    let owner = NODES
        .iter()
        .position(|n| Some(n.to_string()) == holder(L2_VIP4))
        .unwrap();
    let other = 1 - owner;
    let t0 = Instant::now();
    agents[owner].0.stop_with(libc::SIGKILL).unwrap();
    lab.lbs[owner]
        .ns
        .ip(&["link", "set", &lab.lbs[owner].iface, "down"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder(L2_VIP4).as_deref() != Some(NODES[other]) {
        assert!(
            Instant::now() < deadline,
            "no takeover of the Lease:\n{}",
            agents[other].0.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let lease_moved = t0.elapsed();
    while client.ns.neighbour_mac(L2_VIP4).as_deref() != Some(macs[other].as_str()) {
        assert!(
            Instant::now() < deadline,
            "the client's entry stayed on the failed node"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let entry_moved = t0.elapsed();
    assert!(
        exchange_with(L2_VIP4, 5) == 10,
        "reachable through the new owner"
    );
    assert!(
        entry_moved < Duration::from_secs(5),
        "failover took {entry_moved:?} (Lease moved after {lease_moved:?})"
    );
    wait_for_announced(&api, NODES[other], L2_VIP4, &agents[other].0);
    report(
        "k8s_l2_lease_failover",
        json!({"lease_seconds": xlb::k8s::lease::LEASE_SECONDS, "lease_moved_ms": lease_moved.as_millis() as u64, "client_entry_moved_ms": entry_moved.as_millis() as u64}),
    );
    let _ = &mut agents;
}

/// Waits (5 s) for an Announced Event on the Service `web` whose note names `node` and
/// `vip`.
fn wait_for_announced(api: &FakeApi, node: &str, vip: &str, agent: &Agent) {
    let has_event = || {
        api.events().iter().any(|e| {
            e["reason"] == "Announced"
                && e["regarding"]["name"] == "web"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains(&format!("{vip} announced by {node} ")))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !has_event() {
        assert!(
            Instant::now() < deadline,
            "no Event of {vip} announced by {node}: {:#?}\n{node}:\n{}",
            api.events(),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An API server that takes requests and never answers (overloaded, or behind a stuck
/// proxy) while this node holds a VIP's Lease. kube's client has no read timeout by
/// default, and the Lease is renewed from the agent's loop: before the fix the loop
/// waited on the renewal for good, so a reload, the sweeps and a stop were never
/// served. Now a pass at the Leases is bounded, the VIPs held go on being answered,
/// and the loop turns.
#[test]
fn privileged_k8s_l2_hung_api_server_keeps_the_loop_turning() {
    if !privileged() {
        return;
    }
    let lab = SegmentLab::new(1, 1).unwrap();
    let client = lab.client_on_segment().unwrap();
    let _servers = serve(
        &lab.backends[0].ns,
        0,
        80,
        &[] as &[SocketAddr],
        Duration::from_secs(60),
    );
    let api = FakeApi::start(&[&lab.lbs[0].ns]).unwrap();
    let dir = std::env::temp_dir().join(unique_name("xk8h"));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = RemoveOnDrop(dir.clone());
    const VIP: &str = "10.61.0.101";
    let mut svc: serde_json::Value = serde_json::to_value(service("Cluster", None)).unwrap();
    svc["status"]["loadBalancer"]["ingress"] = json!([{ "ip": VIP }]);
    svc["spec"]["ipFamilies"] = json!(["IPv4"]);
    svc["spec"]["ports"] =
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]);
    api.apply(Kind::Service, &svc);
    let b = &lab.backends[0];
    api.apply(
        Kind::EndpointSlice,
        &json!({
            "metadata": {"name": "web-v4", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [b.addr4.to_string()], "nodeName": "node-x",
                           "conditions": {"ready": true}}],
        }),
    );
    let config = dir.join("xlb.yaml");
    std::fs::write(&config, "services: []\n").unwrap();
    let kubeconfig = api.kubeconfig(&dir).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xk8h")));
    let _pin = RemoveOnDrop(pin.clone());
    let n = &lab.lbs[0];
    let mut agent = n
        .agent()
        .config(&config)
        .args(&["--kubernetes", "--node-name", NODES[0]])
        .args(&["--announce-l2", &n.iface])
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .pin_path(&pin)
        .start()
        .unwrap();
    let lease = xlb::k8s::lease::lease_name(VIP.parse().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    while api.lease_holder("xlb-system", &lease).as_deref() != Some(NODES[0]) {
        assert!(Instant::now() < deadline, "no Lease:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let vip: IpAddr = VIP.parse().unwrap();
    let reached = |n: usize| {
        one_try_each(&client.ns, client.addr4, vip, n, 3)
            .per_backend
            .iter()
            .sum::<usize>()
    };
    assert_eq!(reached(3), 3, "reachable before:\n{}", agent.logs());

    api.hang(true);
    // Several renewals' worth (the Lease is renewed every second).
    std::thread::sleep(Duration::from_secs(4));
    let t0 = Instant::now();
    agent
        .reload()
        .unwrap_or_else(|e| panic!("the loop stopped turning: {e}"));
    let reload_took = t0.elapsed();
    assert!(
        agent.count_log("renewing the VIP Leases took longer than") > 0,
        "the stalled renewal is said:\n{}",
        agent.logs()
    );
    // The VIP held is still answered: its clients are not cut off by the API's trouble.
    client
        .ns
        .ip(&["neigh", "flush", "dev", &client.iface])
        .unwrap();
    assert_eq!(
        reached(3),
        3,
        "reachable while the API hangs:\n{}",
        agent.logs()
    );
    // A stop is served too (the Leases' release is bounded the same way).
    let t0 = Instant::now();
    agent.stop_with(libc::SIGTERM).unwrap();
    let stop_took = t0.elapsed();
    api.hang(false);
    report(
        "k8s_l2_hung_api",
        json!({"reload_ms": reload_took.as_millis() as u64, "stop_ms": stop_took.as_millis() as u64}),
    );
}
