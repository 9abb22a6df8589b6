//! The annotations' translation.

use super::*;

/// `xlb.dev/conntrack`: "false" makes every service of the Service stateless (dsr, the
/// dnat it runs for what arrives encapsulated, Local's dnat); "true" and absent keep
/// conntrack; another value is an InvalidAnnotation and keeps it; on a Service
/// forwarded by nat, the model's validation refuses it (the controller's
/// InvalidService Event).
#[test]
fn the_conntrack_annotation_makes_dsr_and_dnat_services_stateless_and_is_refused_on_nat() {
    let annotated = |svc: &mut Service, forwarding: Option<&str>, conntrack: Option<&str>| {
        let mut a = std::collections::BTreeMap::new();
        if let Some(f) = forwarding {
            a.insert(FORWARDING_ANNOTATION.to_string(), f.to_string());
        }
        if let Some(c) = conntrack {
            a.insert(CONNTRACK_ANNOTATION.to_string(), c.to_string());
        }
        svc.metadata.annotations = Some(a);
    };
    let invalid_annotation = |d: &Desired| -> Vec<String> {
        d.problems
            .iter()
            .filter(|p| p.reason == "InvalidAnnotation")
            .map(|p| p.message.clone())
            .collect()
    };

    // dsr across nodes: both services stateless, and they validate.
    let (mut svc, s, nodes) = two_node_service(None);
    annotated(&mut svc, Some("dsr"), Some("false"));
    let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
    assert_eq!(d.services.len(), 2);
    assert!(d.services.iter().any(|s| s.mode == Mode::Dsr));
    assert!(d
        .services
        .iter()
        .any(|s| s.mode == Mode::Dnat && s.encapsulated));
    assert!(d.services.iter().all(|s| !s.conntrack), "{:?}", d.services);
    assert!(invalid_annotation(&d).is_empty());
    crate::model::validate::services(&d.services, &[]).unwrap();

    // "true", and absent: conntrack on.
    for value in [Some("true"), None] {
        let (mut svc, s, nodes) = two_node_service(None);
        annotated(&mut svc, Some("dsr"), value);
        let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
        assert_eq!(d.services.len(), 2);
        assert!(d.services.iter().all(|s| s.conntrack), "{value:?}");
        assert!(invalid_annotation(&d).is_empty());
    }

    // Another value: reported, and conntrack stays on.
    for bad in ["False", "no", "0", ""] {
        let (mut svc, s, nodes) = two_node_service(None);
        annotated(&mut svc, Some("dsr"), Some(bad));
        let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
        assert!(d.services.iter().all(|s| s.conntrack), "{bad:?}");
        let msgs = invalid_annotation(&d);
        assert_eq!(msgs.len(), 1, "{bad:?}: {:?}", d.problems);
        assert!(
            msgs[0].contains("xlb.dev/conntrack")
                && msgs[0].contains(&format!("{bad:?}"))
                && msgs[0].contains("keeping conntrack on"),
            "{}",
            msgs[0]
        );
        assert_eq!(d.problems[0].service.name, "web");
    }

    // externalTrafficPolicy: Local is dnat: stateless.
    let mut local = service(
        "web",
        "2026-01-01T00:00:00Z",
        lb_spec(json!({"externalTrafficPolicy": "Local", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]})),
        Some("192.0.2.1"),
    );
    annotated(&mut local, None, Some("false"));
    let d = run(&[local], &[], &opts());
    assert_eq!(d.services.len(), 1);
    assert_eq!(
        (d.services[0].mode, d.services[0].protocol),
        (Mode::Dnat, Protocol::Udp)
    );
    assert!(!d.services[0].conntrack);
    crate::model::validate::services(&d.services, &[]).unwrap();

    // Cluster forwarded by nat (the default): translated as asked, then refused by the
    // same check as the config file's, with why.
    let (mut svc, s, nodes) = two_node_service(None);
    annotated(&mut svc, None, Some("false"));
    let d = run_with_nodes(&[svc], &[s], &nodes, &opts());
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].mode, Mode::Nat);
    assert!(!d.services[0].conntrack);
    let e = crate::model::validate::services(&d.services, &[]).unwrap_err();
    assert_eq!(e.place, crate::model::Place::Conntrack);
    assert!(
        e.to_string()
            .contains("field conntrack: false is refused for mode nat")
            && e.to_string().contains("SNAT port"),
        "{e}"
    );
}
