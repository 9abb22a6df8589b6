use serde_json::json;

use super::*;

fn opts() -> Options {
    Options {
        class: DEFAULT_CLASS.into(),
        default_class: false,
        node_name: Some("node-a".into()),
        pools: vec![],
        cluster_forwarding: ClusterForwarding::Nat,
    }
}

fn node(name: &str, addrs: &[(&str, &str)]) -> Node {
    let addresses: Vec<_> = addrs
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"addresses": addresses},
    }))
    .unwrap()
}

fn service(name: &str, created: &str, spec: serde_json::Value, status_ip: Option<&str>) -> Service {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "resourceVersion": "7", "creationTimestamp": created},
        "spec": spec,
    });
    if let Some(ip) = status_ip {
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip}]}});
    }
    serde_json::from_value(v).unwrap()
}

fn lb_spec(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "type": "LoadBalancer",
        "loadBalancerClass": DEFAULT_CLASS,
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

fn slice(
    svc: &str,
    family: &str,
    ports: serde_json::Value,
    endpoints: serde_json::Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{svc}-{family}"), "namespace": "default",
                     "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn run(svcs: &[Service], slices: &[EndpointSlice], o: &Options) -> Desired {
    run_with_nodes(svcs, slices, &[], o)
}

fn run_with_nodes(
    svcs: &[Service],
    slices: &[EndpointSlice],
    nodes: &[Node],
    o: &Options,
) -> Desired {
    translate(
        &svcs.iter().collect::<Vec<_>>(),
        &slices.iter().collect::<Vec<_>>(),
        &nodes.iter().collect::<Vec<_>>(),
        o,
    )
}

fn backends(d: &Desired, vip: &str, port: u16) -> Vec<(String, u32)> {
    let vip: IpAddr = vip.parse().unwrap();
    d.services
        .iter()
        .find(|s| s.vip == vip && s.port == port)
        .unwrap_or_else(|| panic!("no {vip}:{port} in {:?}", d.services))
        .backends
        .iter()
        .map(|b| (b.address.to_string(), b.weight))
        .collect()
}

#[test]
fn source_ranges_from_the_field_or_the_annotation_and_per_family() {
    let t = "2026-01-01T00:00:00Z";
    let svc = |extra: serde_json::Value, annotation: Option<&str>, ip: &str| {
        let mut s = service("web", t, lb_spec(extra), Some(ip));
        if let Some(a) = annotation {
            s.metadata.annotations =
                Some([(SOURCE_RANGES_ANNOTATION.to_string(), a.to_string())].into());
        }
        s
    };
    let allow = |d: &Desired| -> Vec<String> {
        d.services[0]
            .allow
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    // The field; host bits are cleared as Kubernetes' own parsing does.
    let d = run(
        &[svc(
            json!({"loadBalancerSourceRanges": ["10.1.2.3/8", "192.0.2.0/24"]}),
            None,
            "192.0.2.1",
        )],
        &[],
        &opts(),
    );
    assert_eq!(allow(&d), ["10.0.0.0/8", "192.0.2.0/24"]);
    // The annotation, read only when the field is empty.
    let d = run(
        &[svc(
            json!({}),
            Some(" 10.0.0.0/8 , 172.16.0.0/12"),
            "192.0.2.1",
        )],
        &[],
        &opts(),
    );
    assert_eq!(allow(&d), ["10.0.0.0/8", "172.16.0.0/12"]);
    let d = run(
        &[svc(
            json!({"loadBalancerSourceRanges": ["192.0.2.0/24"]}),
            Some("10.0.0.0/8"),
            "192.0.2.1",
        )],
        &[],
        &opts(),
    );
    assert_eq!(allow(&d), ["192.0.2.0/24"], "the field wins");
    // None at all: everyone.
    let d = run(&[svc(json!({}), None, "192.0.2.1")], &[], &opts());
    assert!(d.services[0].allow.is_empty() && d.services[0].source_ranges().is_none());
    // An invalid range: the Service is not served, with an Event naming it.
    let d = run(
        &[svc(
            json!({"loadBalancerSourceRanges": ["10.0.0.0/8", "bogus"]}),
            None,
            "192.0.2.1",
        )],
        &[],
        &opts(),
    );
    assert!(d.services.is_empty(), "not served: {:?}", d.services);
    assert!(
        d.problems
            .iter()
            .any(|p| p.reason == "InvalidSourceRange" && p.message.contains("bogus")),
        "{:?}",
        d.problems
    );
    // Only IPv6 ranges for an IPv4 VIP: that VIP admits no one, so it is not served.
    let d = run(
        &[svc(
            json!({"loadBalancerSourceRanges": ["2001:db8::/32"]}),
            None,
            "192.0.2.1",
        )],
        &[],
        &opts(),
    );
    assert!(d.services.is_empty());
    assert!(
        d.problems
            .iter()
            .any(|p| p.reason == "SourceRangesOtherFamily"),
        "{:?}",
        d.problems
    );
}

#[test]
fn only_load_balancers_of_our_class() {
    let mine = service(
        "mine",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({})),
        Some("192.0.2.1"),
    );
    let other = service(
        "other",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"loadBalancerClass": "metallb.io/x"})),
        Some("192.0.2.2"),
    );
    let classless = service(
        "classless",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"loadBalancerClass": null})),
        Some("192.0.2.3"),
    );
    let cluster_ip = service(
        "cip",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"type": "ClusterIP"})),
        Some("192.0.2.4"),
    );
    let all = [mine, other, classless, cluster_ip];
    let vips = |d: &Desired| {
        let mut v: Vec<String> = d.services.iter().map(|s| s.vip.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(vips(&run(&all, &[], &opts())), ["192.0.2.1"]);
    let o = Options {
        default_class: true,
        ..opts()
    };
    assert_eq!(vips(&run(&all, &[], &o)), ["192.0.2.1", "192.0.2.3"]);
    let o = Options {
        class: "metallb.io/x".into(),
        ..opts()
    };
    assert_eq!(vips(&run(&all, &[], &o)), ["192.0.2.2"]);
}

#[test]
fn named_target_ports_resolve_per_slice_and_sctp_is_reported() {
    let svc = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
            {"name": "sig", "port": 9, "protocol": "SCTP"},
        ]})),
        Some("192.0.2.1"),
    );
    // Two slices: the named port resolves to different numbers in each.
    let a = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        json!([{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}]),
    );
    let mut b = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 9090, "protocol": "TCP"}]),
        json!([{"addresses": ["10.1.0.2"]}]),
    );
    b.metadata.name = Some("web-b".into());
    let d = run(&[svc], &[a, b], &opts());
    assert_eq!(
        backends(&d, "192.0.2.1", 80),
        [("10.1.0.1:8080".into(), 1), ("10.1.0.2:9090".into(), 1)]
    );
    assert_eq!(backends(&d, "192.0.2.1", 53), [("10.1.0.1:5353".into(), 1)]);
    assert_eq!(d.services.len(), 2, "the SCTP port is not served");
    assert!(
        d.problems
            .iter()
            .any(|p| p.reason == "UnsupportedProtocol" && p.message.contains("SCTP")),
        "{:?}",
        d.problems
    );
}

#[test]
fn ready_get_flows_terminating_drain_and_the_rest_are_left_out() {
    let svc = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({})),
        Some("192.0.2.1"),
    );
    let s = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([
            {"addresses": ["10.1.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["10.1.0.4"], "conditions": {"ready": false}},
        ]),
    );
    let d = run(&[svc], &[s], &opts());
    assert_eq!(
        backends(&d, "192.0.2.1", 80),
        [("10.1.0.1:8080".into(), 1), ("10.1.0.2:8080".into(), 0)]
    );
}

#[test]
fn local_policy_uses_this_nodes_endpoints_and_reports_them_on_the_health_port() {
    let svc = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(
            json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000, "sessionAffinity": "ClientIP"}),
        ),
        Some("192.0.2.1"),
    );
    let s = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([
            {"addresses": ["10.1.0.1"], "nodeName": "node-a"},
            {"addresses": ["10.1.0.2"], "nodeName": "node-b"},
        ]),
    );
    let d = run(
        std::slice::from_ref(&svc),
        std::slice::from_ref(&s),
        &opts(),
    );
    assert_eq!(backends(&d, "192.0.2.1", 80), [("10.1.0.1:8080".into(), 1)]);
    assert_eq!(d.services[0].session_affinity, SessionAffinity::ClientIp);
    // Local keeps the client's address: dnat to this node's pods.
    assert_eq!(d.services[0].mode, Mode::Dnat);
    assert_eq!(d.health_ports[&32000].local_endpoints, 1);
    let o = Options {
        node_name: Some("node-c".into()),
        ..opts()
    };
    let d = run(&[svc], &[s], &o);
    assert!(backends(&d, "192.0.2.1", 80).is_empty());
    assert_eq!(d.health_ports[&32000].local_endpoints, 0);
}

fn two_node_service(annotation: Option<&str>) -> (Service, EndpointSlice, Vec<Node>) {
    let mut svc = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({})),
        Some("192.0.2.1"),
    );
    if let Some(a) = annotation {
        svc.metadata.annotations =
            Some([(FORWARDING_ANNOTATION.to_string(), a.to_string())].into());
    }
    let s = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([
            {"addresses": ["10.1.0.1"], "nodeName": "node-a"},
            {"addresses": ["10.1.0.2"], "nodeName": "node-b"},
            {"addresses": ["10.1.0.3"], "nodeName": "node-c"},
        ]),
    );
    let nodes = vec![
        node("node-a", &[("InternalIP", "172.16.0.1")]),
        node(
            "node-b",
            &[
                ("ExternalIP", "198.51.100.2"),
                ("InternalIP", "172.16.0.2"),
                ("InternalIP", "fd16::2"),
            ],
        ),
        // node-c has no address of the VIP's family.
        node("node-c", &[("InternalIP", "fd16::3")]),
    ];
    (svc, s, nodes)
}

#[test]
fn cluster_policy_is_nat_unless_dsr_is_asked_for() {
    let (svc, s, nodes) = two_node_service(None);
    let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].mode, Mode::Nat);
    assert_eq!(d.services[0].backends.len(), 3);
}

#[test]
fn cluster_dsr_goes_through_each_endpoints_node_and_dnats_its_own() {
    for (annotation, flag) in [
        (None, ClusterForwarding::Dsr),
        (Some("dsr"), ClusterForwarding::Nat),
    ] {
        let (svc, s, nodes) = two_node_service(annotation);
        let o = Options {
            cluster_forwarding: flag,
            ..opts()
        };
        let d = run_with_nodes(&[svc], &[s], &nodes, &o);
        let lb = d.services.iter().find(|s| !s.encapsulated).unwrap();
        assert_eq!(lb.mode, Mode::Dsr);
        let got: Vec<(String, Option<IpAddr>, bool)> = lb
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.via, b.local))
            .collect();
        assert_eq!(
            got,
            [
                ("10.1.0.1:8080".into(), None, true),
                ("10.1.0.2:8080".into(), Some("172.16.0.2".parse().unwrap()), false),
            ],
            "this node's endpoint by dnat; node-b's through its InternalIP; node-c has no IPv4 address"
        );
        let here = d.services.iter().find(|s| s.encapsulated).unwrap();
        assert_eq!(here.mode, Mode::Dnat);
        assert_eq!((here.vip, here.port), (lb.vip, lb.port));
        assert_eq!(here.backends.len(), 1);
        assert_eq!(here.backends[0].address.to_string(), "10.1.0.1:8080");
        assert!(d
            .problems
            .iter()
            .any(|p| p.reason == "NodeAddressUnknown" && p.message.contains("node-c")));
        // The pair validates: a dsr backend through a node may have another port.
        crate::model::validate::services(&d.services, &[]).unwrap();
    }
    // The annotation wins over the flag, and a bad one is reported.
    let (svc, s, nodes) = two_node_service(Some("nat"));
    let o = Options {
        cluster_forwarding: ClusterForwarding::Dsr,
        ..opts()
    };
    let d = run_with_nodes(&[svc], &[s], &nodes, &o);
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].mode, Mode::Nat);
    let (svc, s, nodes) = two_node_service(Some("tunnel"));
    let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
    assert!(d.problems.iter().any(|p| p.reason == "InvalidAnnotation"));
}

#[test]
fn dual_stack_pairs_each_vip_with_slices_of_its_family() {
    let mut svc = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"ipFamilies": ["IPv4", "IPv6"]})),
        None,
    );
    svc.status = serde_json::from_value(
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP"}, {"ip": "2001:db8::1", "ipMode": "VIP"}]}}),
    )
    .unwrap();
    let v4 = slice(
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([{"addresses": ["10.1.0.1"]}]),
    );
    let v6 = slice(
        "web",
        "IPv6",
        json!([{"name": "http", "port": 8080}]),
        json!([{"addresses": ["fd00::1"]}]),
    );
    let d = run(&[svc], &[v4, v6], &opts());
    assert_eq!(backends(&d, "192.0.2.1", 80), [("10.1.0.1:8080".into(), 1)]);
    assert_eq!(
        backends(&d, "2001:db8::1", 80),
        [("[fd00::1]:8080".into(), 1)]
    );
    assert!(d.status.is_empty(), "the status already says so");
}

#[test]
fn the_older_service_keeps_a_contested_vip_and_bad_addresses_are_reported() {
    let old = service(
        "old",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({})),
        Some("192.0.2.1"),
    );
    let young = service(
        "young",
        "2026-02-01T00:00:00Z",
        lb_spec(json!({"externalIPs": ["192.0.2.1", "not-an-ip"]})),
        Some("192.0.2.1"),
    );
    let d = run(&[young, old], &[], &opts());
    let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["default/old:80/tcp@192.0.2.1"]);
    let reasons: BTreeSet<&str> = d
        .problems
        .iter()
        .filter(|p| p.service.name == "young")
        .map(|p| p.reason)
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["InvalidVIP", "NoVIP", "VIPConflict"])
    );
}

#[test]
fn the_allocator_fills_the_status_once() {
    let o = Options {
        pools: vec!["198.51.100.0/28".parse().unwrap()],
        ..opts()
    };
    let svc = service("web", "2026-01-01T00:00:00Z", lb_spec(json!({})), None);
    let d = run(std::slice::from_ref(&svc), &[], &o);
    assert_eq!(d.status.len(), 1);
    let ip = d.status[0].1[0];
    assert!(o.pools[0].contains(&ip));
    assert_eq!(d.services[0].vip, ip);
    // A status without ipMode is written again, with it.
    let mut written = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({})),
        Some(&ip.to_string()),
    );
    assert_eq!(run(std::slice::from_ref(&written), &[], &o).status.len(), 1);
    // Once written, the status is the record: nothing more to write.
    written.status = serde_json::from_value(
        json!({"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}),
    )
    .unwrap();
    assert!(run(&[written], &[], &o).status.is_empty());
}

/// The cache translates again only the Services a change touches: the others' services
/// are the last translation's, shared, and the whole is what `translate` makes.
#[test]
fn the_cache_translates_only_what_a_change_touches() {
    let t = "2026-01-01T00:00:00Z";
    let svcs = [
        service("a", t, lb_spec(json!({})), Some("192.0.2.1")),
        service("b", t, lb_spec(json!({})), Some("192.0.2.2")),
    ];
    let mk_slice = |svc: &str, ip: &str, rv: &str| {
        let mut s = slice(
            svc,
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            json!([{"addresses": [ip]}]),
        );
        s.metadata.resource_version = Some(rv.into());
        s
    };
    fn refs(v: &[EndpointSlice]) -> Vec<&EndpointSlice> {
        v.iter().collect()
    }
    let svc_refs: Vec<&Service> = svcs.iter().collect();
    let mut cache = Cache::default();
    let slices = [
        mk_slice("a", "10.1.0.1", "1"),
        mk_slice("b", "10.2.0.1", "1"),
    ];
    let first = cache.translate(&svc_refs, &refs(&slices), &[], &opts());
    assert_eq!(first.fresh.len(), 2, "{:?}", first.fresh);
    // Nothing changed: nothing made again, the same services.
    let again = cache.translate(&svc_refs, &refs(&slices), &[], &opts());
    assert!(again.fresh.is_empty(), "{:?}", again.fresh);
    assert!(first
        .services
        .iter()
        .zip(&again.services)
        .all(|(x, y)| Arc::ptr_eq(x, y)));
    // b's slice changed: only b made again, a shared.
    let slices = [
        mk_slice("a", "10.1.0.1", "1"),
        mk_slice("b", "10.2.0.9", "2"),
    ];
    let changed = cache.translate(&svc_refs, &refs(&slices), &[], &opts());
    let b_name = "default/b:80/tcp@192.0.2.2";
    assert_eq!(
        changed.fresh.iter().map(String::as_str).collect::<Vec<_>>(),
        [b_name]
    );
    let a = |d: &Translated| {
        d.services
            .iter()
            .find(|s| s.name.starts_with("default/a:"))
            .cloned()
            .unwrap()
    };
    assert!(Arc::ptr_eq(&a(&first), &a(&changed)));
    let whole = translate(&svc_refs, &refs(&slices), &[], &opts());
    let cached: Vec<model::Service> = changed.services.iter().map(|s| (**s).clone()).collect();
    assert_eq!(cached, whole.services);
    assert_eq!(
        backends(&whole, "192.0.2.2", 80),
        [("10.2.0.9:8080".into(), 1)]
    );
    // A slice without a resourceVersion is translated every time.
    let mut bare = slices.clone();
    bare[0].metadata.resource_version = None;
    cache.translate(&svc_refs, &refs(&bare), &[], &opts());
    let next = cache.translate(&svc_refs, &refs(&bare), &[], &opts());
    assert_eq!(next.fresh.len(), 1, "{:?}", next.fresh);
    // A Service gone is dropped from the cache.
    cache.translate(&svc_refs[..1], &refs(&slices), &[], &opts());
    assert_eq!(cache.len(), 1);
}

mod annotations;
