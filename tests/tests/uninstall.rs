//! `xlb uninstall --kubernetes` against the fake API server, after an agent that
//! served a Service (address from its pool, status written, an L2 Lease taken, an
//! Announced Event recorded, a route in table 200, XDP and TC attached) was stopped
//! with SIGTERM, which leaves all of that in place. Afterwards nothing of xlb's is
//! left (managed neighbour entries, proto 248, included), what belongs to others is
//! untouched, and a second run finds nothing.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::json;
use xlb_tests::{
    agent::{xlb_bin, Agent, Start},
    fakeapi::{FakeApi, Kind},
    privileged,
    topology::{LbLab, Network},
    unique_name, RemoveOnDrop,
};

const LEASE_NS: &str = "xlb-system";

fn wait(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "no {what}:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ingress(api: &FakeApi, name: &str) -> serde_json::Value {
    api.get(Kind::Service, "default", name).unwrap()["status"]["loadBalancer"]["ingress"].clone()
}

#[test]
fn privileged_uninstall_removes_what_xlb_wrote_and_nothing_else() {
    if !privileged() {
        return;
    }
    let lab = LbLab::two_arm_on(1, Network::AsDeployed).unwrap();
    let api = FakeApi::start(&[&lab.lb]).unwrap();
    let dir = std::env::temp_dir().join(unique_name("xun"));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = RemoveOnDrop(dir.clone());
    let kubeconfig = api.kubeconfig(&dir).unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();

    // Ours: a LoadBalancer Service of xlb's class with no address yet.
    api.apply(
        Kind::Service,
        &json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "xlb.dev/xdp",
                     "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        }),
    );
    api.apply(
        Kind::EndpointSlice,
        &json!({
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.40.0.2"], "conditions": {"ready": true}}],
        }),
    );
    // Others': a Service of another balancer, its Event, a Lease without xlb's label.
    api.apply(
        Kind::Service,
        &json!({
            "metadata": {"name": "other", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "metallb.io/x",
                     "ports": [{"port": 80, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}},
        }),
    );
    api.add_event(json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "other.1", "namespace": "default"},
        "eventTime": "2026-12-03T00:00:00.000000Z",
        "reportingController": "metallb", "reportingInstance": "x",
        "action": "Assign", "reason": "IPAllocated", "type": "Normal",
        "regarding": {"kind": "Service", "name": "other", "namespace": "default"},
    }));
    api.apply(
        Kind::Lease,
        &json!({"metadata": {"name": "someone-elses", "namespace": LEASE_NS},
                "spec": {"holderIdentity": "x"}}),
    );

    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xun")));
    let _pins = RemoveOnDrop(pin.clone());
    let client_side = lab.lb_ifaces[0].clone();
    let mut agent = Start::new(&lab.lb, &lab.iface_arg())
        .args(&["--kubernetes", "--node-name", "node-a"])
        .args(&["--ipam-pool", "10.100.0.0/28"])
        .args(&["--announce-l2", &client_side])
        .args(&["--announce-routes-table", "200"])
        .env("KUBECONFIG", &kubeconfig)
        .pin_path(&pin)
        .start()
        .unwrap();
    wait("status written", &agent, || {
        ingress(&api, "web")
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    let vip = ingress(&api, "web")[0]["ip"].as_str().unwrap().to_owned();
    let lease = xlb::k8s::lease::lease_name(vip.parse().unwrap());
    wait("Lease", &agent, || {
        api.lease_holder(LEASE_NS, &lease).is_some()
    });
    let ours = |api: &FakeApi| {
        api.events()
            .iter()
            .filter(|e| e["reportingController"] == "xlb")
            .count()
    };
    wait("Event", &agent, || ours(&api) > 0);
    let routes = || {
        let out = lab
            .lb
            .ip(&["route", "show", "table", "200", "proto", "248"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait("route", &agent, || routes().contains(&vip));
    // The backend's next hop, kept resolved as a managed entry of xlb's.
    let neigh = |ns: &xlb_tests::netns::Netns, args: &[&str]| {
        let mut full = vec!["neigh", "show"];
        full.extend_from_slice(args);
        String::from_utf8_lossy(&ns.ip(&full).unwrap().stdout).into_owned()
    };
    wait("managed neighbour entry", &agent, || {
        neigh(&lab.lb, &["proto", "248"]).contains("10.40.0.2 ")
    });
    assert!(neigh(&lab.lb, &["proto", "248"]).contains("managed"));
    // Others' entries: the operator's static one and one of another protocol on the
    // LB, and a proto 248 entry in another namespace (the backend's).
    let backend_side = &lab.lb_ifaces[1];
    for extra in [
        &[
            "10.40.0.99",
            "lladdr",
            "02:00:00:00:00:99",
            "nud",
            "permanent",
        ][..],
        &[
            "10.40.0.98",
            "lladdr",
            "02:00:00:00:00:98",
            "nud",
            "stale",
            "protocol",
            "249",
        ][..],
    ] {
        let mut args = vec!["neigh", "replace"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["dev", backend_side]);
        let out = lab.lb.ip(&args).unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let b_route = lab.backends[0]
        .ip(&["-j", "route", "get", "10.40.0.1"])
        .unwrap();
    let b_route: serde_json::Value = serde_json::from_slice(&b_route.stdout).unwrap();
    let b_dev = b_route[0]["dev"].as_str().unwrap().to_owned();
    let out = lab.backends[0]
        .ip(&[
            "neigh",
            "replace",
            "10.40.0.97",
            "lladdr",
            "02:00:00:00:00:97",
            "nud",
            "permanent",
            "protocol",
            "248",
            "dev",
            &b_dev,
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let xdp_on = |dev: &str| {
        let out = lab.lb.ip(&["-d", "link", "show", "dev", dev]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    };
    assert!(xdp_on(&client_side));

    // SIGTERM: the agent leaves the datapath, routes and cluster state in place.
    assert!(agent.stop_with(libc::SIGTERM).unwrap().success());
    assert!(pin.exists() && routes().contains(&vip) && xdp_on(&client_side));

    let uninstall = || {
        let out = lab
            .lb
            .command(xlb_bin().unwrap().to_str().unwrap())
            .args(["uninstall", "--kubernetes", "--pin-path"])
            .arg(&pin)
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "xlb uninstall failed:\n{text}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = uninstall();
    eprintln!("xlb uninstall:\n{said}");
    // The cluster: our status, Events and Lease gone; others' untouched.
    assert!(ingress(&api, "web").is_null(), "{}", ingress(&api, "web"));
    assert_eq!(ingress(&api, "other"), json!([{"ip": "192.0.2.7"}]));
    assert_eq!(ours(&api), 0, "xlb's Events deleted");
    assert_eq!(api.events().len(), 1, "the other controller's Event stays");
    assert!(
        api.lease_holder(LEASE_NS, &lease).is_none(),
        "xlb's Lease deleted"
    );
    assert!(api.get(Kind::Lease, LEASE_NS, "someone-elses").is_some());
    // The node: no route, no XDP, no pins.
    assert_eq!(routes().trim(), "", "table 200 emptied");
    for dev in &lab.lb_ifaces {
        assert!(!xdp_on(dev), "XDP still on {dev}");
    }
    assert!(!pin.exists(), "pins removed");
    // Neighbours: xlb's gone from its namespace, everyone else's kept.
    assert_eq!(
        neigh(&lab.lb, &["proto", "248"]).trim(),
        "",
        "managed entries removed"
    );
    let kept = neigh(&lab.lb, &[]);
    assert!(
        kept.contains("10.40.0.99 ") && kept.contains("10.40.0.98 "),
        "{kept}"
    );
    assert!(neigh(&lab.backends[0], &["proto", "248"]).contains("10.40.0.97 "));
    for line in [
        "cleared status.loadBalancer.ingress of Service default/web",
        "deleted Lease xlb-system/",
        "deleted Event default/",
        "withdrew 1 VIP routes",
        "removed neighbour entry 10.40.0.2 dev ",
    ] {
        assert!(said.contains(line), "{line:?} not said:\n{said}");
    }

    // Again: nothing left to remove, and that is not an error.
    let again = uninstall();
    assert_eq!(again.trim(), "", "a second run removed: {again}");
}

/// `xlb uninstall --kubernetes` against an API server that takes requests and never
/// answers: it fails within its read timeout and says what it was doing, rather than
/// hanging (kube's client has no read timeout of its own).
#[test]
fn privileged_uninstall_against_a_hung_api_server_fails_and_says_why() {
    if !privileged() {
        return;
    }
    let ns = xlb_tests::netns::Netns::new("xuh").unwrap();
    let api = FakeApi::start(&[&ns]).unwrap();
    let dir = std::env::temp_dir().join(unique_name("xuh"));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = RemoveOnDrop(dir.clone());
    let kubeconfig = api.kubeconfig(&dir).unwrap();
    api.hang(true);
    let t0 = Instant::now();
    let mut child = ns
        .command(xlb_bin().unwrap().to_str().unwrap())
        .args(["uninstall", "--kubernetes", "--pin-path"])
        .arg(dir.join("no-pins"))
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            api.hang(false);
            panic!("xlb uninstall still waiting on the API server after 40 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    api.hang(false);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success(),
        "it cannot have cleared anything:\n{text}"
    );
    assert!(
        text.contains("Service") && text.to_lowercase().contains("timed out"),
        "says what it was doing and why it stopped:\n{text}"
    );
    eprintln!("failed after {took:?}:\n{text}");
}
