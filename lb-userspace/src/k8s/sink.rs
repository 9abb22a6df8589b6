//! The Kubernetes sink: what xlb writes back to the API and serves for it. It keeps
//! each Service's `status.loadBalancer.ingress`, the Events that report a Service's
//! problems (each once while it lasts) and the `externalTrafficPolicy: Local` health
//! check node ports, bringing them to what the controller's translation wants. The
//! Service objects are its record of what it last wrote: the translation asks for a
//! status only where the object's differs. Events of announcing (`AnnounceEvents`)
//! follow the announcing sinks' changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::{
    api::{Patch, PatchParams},
    runtime::events::{Event as K8sEvent, EventType},
    Api, Client,
};
use tracing::{debug, info, warn};

use super::{
    events::EventWriter,
    health_port::HealthPorts,
    translate::{HealthPort, Problem, ServiceRef},
};
use crate::{model::Desired, sink::Sink};

/// The Kubernetes-facing part of the desired state, from the controller's translation.
#[derive(Debug, Default)]
pub struct Wanted {
    /// Services whose `status.loadBalancer.ingress` should become these addresses.
    pub status: Vec<(ServiceRef, Vec<IpAddr>)>,
    /// Every problem that stands now; a problem is reported once while it stands.
    pub problems: Vec<Problem>,
    /// The health check node ports to serve, exactly.
    pub health_ports: BTreeMap<u16, HealthPort>,
}

/// What one apply wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub statuses: usize,
    pub events: usize,
}

pub struct KubernetesSink {
    client: Client,
    events: EventWriter,
    /// Problems already reported as Events, so a steady problem is reported once.
    reported: BTreeSet<(String, &'static str, String)>,
    health: HealthPorts,
    /// Set when a status write ran out of STATUS_WRITE_BUDGET: none before this instant.
    status_stalled_until: Option<std::time::Instant>,
}

/// The longest one status write may hold the controller, whose syncs also carry
/// every EndpointSlice change to the maps (kube's client has no read timeout).
const STATUS_WRITE_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);
/// How long status writes are left alone after one ran out of time.
const STATUS_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

impl KubernetesSink {
    pub fn new(client: Client, events: EventWriter) -> Self {
        Self {
            events,
            client,
            reported: BTreeSet::new(),
            health: HealthPorts::default(),
            status_stalled_until: None,
        }
    }

    /// Writes the VIPs into the Service's status. The resourceVersion makes the write
    /// conditional: when another agent wrote first, this one gets 409 and loses.
    /// Ok(written); Err: the API server did not answer in time (the caller backs off).
    async fn write_status(&self, svc: &ServiceRef, ips: &[IpAddr]) -> Result<bool, ()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &svc.namespace);
        let ingress: Vec<_> = ips
            .iter()
            // ipMode VIP: the node's own traffic to the VIP is sent to it too (kube-proxy
            // routes it locally otherwise), as for any balancer that answers the VIP.
            .map(|ip| serde_json::json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect();
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": svc.resource_version},
            "status": {"loadBalancer": {"ingress": ingress}},
        });
        let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
        let write = api.patch_status(&svc.name, &pp, &merge);
        let Ok(result) = tokio::time::timeout(STATUS_WRITE_BUDGET, write).await else {
            warn!(service = %svc, "writing the status took longer than {STATUS_WRITE_BUDGET:?}: the Kubernetes API server is not answering; status writes wait {STATUS_BACKOFF:?}, and the Services go on being served");
            return Err(());
        };
        match result {
            Ok(_) => {
                info!(service = %svc, ?ips, "wrote status.loadBalancer.ingress");
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(service = %svc, "status changed meanwhile (another agent wrote it); rereading");
                Ok(false)
            }
            Err(e) => {
                warn!(service = %svc, "writing the status failed: {e}");
                Ok(false)
            }
        }
    }

    fn publish(&self, p: &Problem) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(p.service.namespace.clone()),
            name: Some(p.service.name.clone()),
            uid: Some(p.service.uid.clone()),
            ..Default::default()
        };
        let ev = K8sEvent {
            type_: EventType::Warning,
            reason: p.reason.into(),
            note: Some(p.message.chars().take(1024).collect()),
            action: "Serve".into(),
            secondary: None,
        };
        self.events.publish(ev, reference);
    }
}

impl Sink<Wanted> for KubernetesSink {
    type Changes = Written;

    /// A write the API refuses is logged and left for the next change (the translation
    /// asks for it again while the object differs): one Service cannot stop the others.
    async fn apply(&mut self, wanted: &Wanted) -> anyhow::Result<Written> {
        let mut written = Written::default();
        self.health.update(&wanted.health_ports).await;
        let stalled = self
            .status_stalled_until
            .is_some_and(|t| std::time::Instant::now() < t);
        if !stalled {
            for (svc, ips) in &wanted.status {
                match self.write_status(svc, ips).await {
                    Ok(true) => written.statuses += 1,
                    Ok(false) => {}
                    Err(()) => {
                        self.status_stalled_until =
                            Some(std::time::Instant::now() + STATUS_BACKOFF);
                        break;
                    }
                }
            }
        }
        let live: BTreeSet<&str> = wanted
            .problems
            .iter()
            .map(|p| p.service.uid.as_str())
            .collect();
        self.reported
            .retain(|(uid, _, _)| live.contains(uid.as_str()));
        for p in &wanted.problems {
            let key = (p.service.uid.clone(), p.reason, p.message.clone());
            if self.reported.insert(key) {
                warn!(service = %p.service, reason = p.reason, "{}", p.message);
                self.publish(p);
                written.events += 1;
            }
        }
        Ok(written)
    }
}

/// Events on a Service when this node starts or stops announcing its VIP.
pub struct AnnounceEvents {
    events: EventWriter,
    node: String,
}

impl AnnounceEvents {
    pub fn new(events: EventWriter, node: Option<String>) -> Self {
        Self {
            events,
            node: node.unwrap_or_else(|| "this node".into()),
        }
    }

    /// One Event per Service (named `namespace/name:...` by translate) that has `vip`.
    pub fn announced(&self, cfg: &Desired, vip: IpAddr, up: bool, how: &str) {
        let mut services = BTreeSet::new();
        for s in cfg
            .services
            .iter()
            .filter(|s| s.vip == vip && !s.encapsulated)
        {
            if let Some((ns, rest)) = s.name.split_once('/') {
                if let Some((name, _)) = rest.split_once(':') {
                    services.insert((ns.to_owned(), name.to_owned()));
                }
            }
        }
        for (namespace, name) in services {
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(namespace),
                name: Some(name.clone()),
                ..Default::default()
            };
            let ev = K8sEvent {
                type_: EventType::Normal,
                reason: if up { "Announced" } else { "Withdrawn" }.into(),
                note: Some(format!(
                    "{vip} {} by {} {how}",
                    if up { "announced" } else { "withdrawn" },
                    self.node
                )),
                action: "Announce".into(),
                secondary: None,
            };
            self.events.publish(ev, reference);
        }
    }
}
