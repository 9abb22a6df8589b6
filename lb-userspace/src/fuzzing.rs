//! The bodies of the fuzz targets (`fuzz/`, run with cargo-fuzz), here so that the
//! regular tests can run them too, on a seeded corpus, in CI.

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    config::Config,
    k8s::translate::{translate, ClusterForwarding, Options, DEFAULT_CLASS},
};

/// Arbitrary bytes as a config file: never a panic; a rejection says why; an accepted
/// file validates again the same way.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(cfg) => assert!(cfg.validate().is_ok(), "accepted, then invalid: {text:?}"),
        Err(e) => assert!(
            !format!("{e:#}").trim().is_empty(),
            "a rejection without a reason"
        ),
    }
}

/// Arbitrary JSON documents as Services, EndpointSlices and Nodes (a JSON array;
/// objects with `addressType` are slices, with `kind: Node` nodes): never a panic, and
/// a deterministic translation, under both cluster forwardings.
pub fn k8s_objects(data: &[u8]) {
    let Ok(serde_json::Value::Array(docs)) = serde_json::from_slice(data) else {
        return;
    };
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut nodes = Vec::new();
    for d in docs {
        if d.get("kind").and_then(|k| k.as_str()) == Some("Node") {
            if let Ok(n) = serde_json::from_value::<Node>(d) {
                nodes.push(n);
            }
        } else if d.get("addressType").is_some() {
            if let Ok(s) = serde_json::from_value::<EndpointSlice>(d) {
                slices.push(s);
            }
        } else if let Ok(s) = serde_json::from_value::<Service>(d) {
            services.push(s);
        }
    }
    let s: Vec<&Service> = services.iter().collect();
    let e: Vec<&EndpointSlice> = slices.iter().collect();
    let n: Vec<&Node> = nodes.iter().collect();
    for cluster_forwarding in [ClusterForwarding::Nat, ClusterForwarding::Dsr] {
        let opts = Options {
            class: DEFAULT_CLASS.into(),
            default_class: true,
            node_name: Some("n1".into()),
            pools: vec![
                "10.0.0.0/30".parse().unwrap(),
                "fd00::/126".parse().unwrap(),
            ],
            cluster_forwarding,
        };
        let a = translate(&s, &e, &n, &opts);
        let b = translate(&s, &e, &n, &opts);
        assert_eq!(a.services, b.services, "translation is not deterministic");
        for svc in &a.services {
            for be in &svc.backends {
                assert_eq!(be.address.is_ipv4(), svc.vip.is_ipv4(), "{}", svc.name);
                if let Some(via) = be.via {
                    assert_eq!(via.is_ipv4(), svc.vip.is_ipv4(), "{}", svc.name);
                }
            }
        }
    }
}
