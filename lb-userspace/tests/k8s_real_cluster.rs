//! Against a real cluster, only when KUBECONFIG is set (CI has none; the fake API
//! server tests in tests/tests/kubernetes.rs cover the controller there).
//!
//! Read-only: lists the cluster's Services and EndpointSlices, translates them as the
//! agent would (taking class-less Services too), and checks what comes out.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{api::ListParams, Api, Client};
use xlb::k8s::translate::{translate, Options, DEFAULT_CLASS};

#[test]
fn real_cluster_objects_translate_consistently() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: set KUBECONFIG to run against a real cluster");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (svcs, slices, nodes) = rt.block_on(async {
        let client = Client::try_default()
            .await
            .expect("a client from KUBECONFIG");
        let svcs = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list Services");
        let slices = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list EndpointSlices");
        let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client)
            .list(&ListParams::default())
            .await
            .expect("list Nodes");
        (svcs.items, slices.items, nodes.items)
    });
    let opts = Options {
        class: DEFAULT_CLASS.into(),
        default_class: true,
        node_name: None,
        pools: vec!["198.18.0.0/24".parse().unwrap()],
        cluster_forwarding: xlb::k8s::translate::ClusterForwarding::Dsr,
    };
    let s: Vec<&Service> = svcs.iter().collect();
    let e: Vec<&EndpointSlice> = slices.iter().collect();
    let n: Vec<_> = nodes.iter().collect();
    let a = translate(&s, &e, &n, &opts);
    let b = translate(&s, &e, &n, &opts);
    assert_eq!(a.services, b.services, "translation is deterministic");
    for svc in &a.services {
        assert_ne!(svc.port, 0);
        for be in &svc.backends {
            assert_eq!(be.address.is_ipv4(), svc.vip.is_ipv4(), "{}", svc.name);
        }
    }
    eprintln!(
        "real cluster: {} Services, {} EndpointSlices → {} xlb services, {} problems",
        svcs.len(),
        slices.len(),
        a.services.len(),
        a.problems.len()
    );
}
