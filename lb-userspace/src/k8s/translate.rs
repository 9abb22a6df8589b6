//! Services and EndpointSlices → the services xlb programs. A pure function of the
//! objects, so two agents that see the same objects program the same maps.
//!
//! Whatever is wrong with one Service (a bad address, SCTP, a port another Service
//! already holds) becomes a `Problem` for that Service, reported as an Event, and
//! costs only the part of it that is wrong.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use super::ipam;
use crate::config::{BackendConfig, Mode, Protocol, ServiceConfig, SessionAffinity};

/// The loadBalancerClass xlb serves unless told otherwise.
pub const DEFAULT_CLASS: &str = "xlb.dev/xdp";
/// Services with the same value may share a VIP, on different ports.
pub const SHARED_IP_ANNOTATION: &str = "xlb.dev/allow-shared-ip";
/// `dsr` or `nat`: how an `externalTrafficPolicy: Cluster` Service reaches endpoints
/// on other nodes, overriding `--cluster-forwarding`.
pub const FORWARDING_ANNOTATION: &str = "xlb.dev/forwarding";
/// The older way to give source ranges, read when `spec.loadBalancerSourceRanges` is
/// empty (as kube-proxy does): a comma-separated list of CIDRs.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// How `externalTrafficPolicy: Cluster` traffic reaches the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClusterForwarding {
    /// Source NAT to the LB node's address; replies come back through it.
    #[default]
    Nat,
    /// Encapsulated to the node that hosts the endpoint, whose xlb decapsulates, DNATs
    /// to the pod and translates its reply, which goes to the client from there.
    Dsr,
}
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone)]
pub struct Options {
    pub class: String,
    /// Also serve LoadBalancer Services that name no class.
    pub default_class: bool,
    /// This node, for `externalTrafficPolicy: Local`.
    pub node_name: Option<String>,
    pub pools: Vec<IpNet>,
    pub cluster_forwarding: ClusterForwarding,
}

/// A node's addresses, for dsr across nodes: InternalIP, else ExternalIP, per family.
fn node_addresses(nodes: &[&Node]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out = BTreeMap::new();
    for n in nodes {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        let addrs = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut ips: Vec<IpAddr> = Vec::new();
        for kind in ["InternalIP", "ExternalIP"] {
            for a in addrs.iter().filter(|a| a.type_ == kind) {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    if !ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4()) {
                        ips.push(ip);
                    }
                }
            }
        }
        out.insert(name, ips);
    }
    out
}

/// Which Service an event or a status write is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub service: ServiceRef,
    /// CamelCase, as Event reasons are.
    pub reason: &'static str,
    pub message: String,
}

/// `externalTrafficPolicy: Local`: the node answers its health check port with the
/// count of local endpoints, so an external balancer skips nodes without any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPort {
    pub service: String,
    pub local_endpoints: usize,
}

#[derive(Debug, Default)]
pub struct Desired {
    pub services: Vec<ServiceConfig>,
    /// Services whose `status.loadBalancer.ingress` should become these addresses.
    pub status: Vec<(ServiceRef, Vec<IpAddr>)>,
    pub problems: Vec<Problem>,
    pub health_ports: BTreeMap<u16, HealthPort>,
}

pub fn is_ours(svc: &Service, opts: &Options) -> bool {
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match &spec.load_balancer_class {
        Some(class) => *class == opts.class,
        None => opts.default_class,
    }
}

/// One of our Services, read and checked.
struct Candidate<'a> {
    svc: &'a Service,
    sref: ServiceRef,
    /// From status and loadBalancerIP (written back to status), then externalIPs.
    status_vips: Vec<IpAddr>,
    external_vips: Vec<IpAddr>,
    ports: Vec<PortSpec>,
    wants_v6: Vec<bool>,
}

struct PortSpec {
    name: Option<String>,
    port: u16,
    protocol: Protocol,
}

pub fn translate(
    services: &[&Service],
    slices: &[&EndpointSlice],
    nodes: &[&Node],
    opts: &Options,
) -> Desired {
    let mut out = Desired::default();
    let node_addrs = node_addresses(nodes);
    let mut ours: Vec<&Service> = services
        .iter()
        .copied()
        .filter(|s| is_ours(s, opts))
        .collect();
    // Oldest first: the order in which addresses and ports are given out.
    ours.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            s.metadata.namespace.clone(),
            s.metadata.name.clone(),
        )
    });
    let mut cands: Vec<Candidate> = ours
        .into_iter()
        .map(|svc| read_service(svc, &mut out.problems))
        .collect();

    // A (VIP, port, protocol) belongs to the oldest Service that declares it. A
    // younger Service loses the VIP (and is given another one if pools exist).
    let mut holder: BTreeMap<(IpAddr, u16, Protocol), String> = BTreeMap::new();
    for c in &mut cands {
        let keep = |ip: &IpAddr, problems: &mut Vec<Problem>| {
            let clash = c.ports.iter().find_map(|p| {
                holder
                    .get(&(*ip, p.port, p.protocol))
                    .map(|h| (p, h.clone()))
            });
            match clash {
                Some((p, h)) => {
                    problems.push(Problem {
                        service: c.sref.clone(),
                        reason: "VIPConflict",
                        message: format!(
                            "{ip}:{}/{} already belongs to {h}; not serving this VIP",
                            p.port,
                            p.protocol.name()
                        ),
                    });
                    false
                }
                None => true,
            }
        };
        c.status_vips.retain(|ip| keep(ip, &mut out.problems));
        c.external_vips.retain(|ip| keep(ip, &mut out.problems));
        for ip in c.status_vips.iter().chain(&c.external_vips) {
            for p in &c.ports {
                holder.insert((*ip, p.port, p.protocol), c.sref.to_string());
            }
        }
    }

    let claims: Vec<ipam::Claim> = cands
        .iter()
        .map(|c| ipam::Claim {
            uid: c.sref.uid.clone(),
            sharing_key: c
                .svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SHARED_IP_ANNOTATION).cloned()),
            ports: c.ports.iter().map(|p| (p.port, p.protocol)).collect(),
            has: c
                .status_vips
                .iter()
                .chain(&c.external_vips)
                .copied()
                .collect(),
            wants_v6: c.wants_v6.clone(),
        })
        .collect();
    let (allocated, failed) = ipam::allocate(&claims, &opts.pools);
    for (i, ip) in allocated {
        cands[i].status_vips.push(ip);
    }
    for (i, why) in failed {
        out.problems.push(Problem {
            service: cands[i].sref.clone(),
            reason: "AllocationFailed",
            message: why,
        });
    }

    let slices_of = group_slices(slices);
    for c in &cands {
        let current = current_status(c.svc);
        if !c.status_vips.is_empty() && (c.status_vips != current || !ip_mode_vip(c.svc)) {
            out.status.push((c.sref.clone(), c.status_vips.clone()));
        }
        let vips: Vec<IpAddr> = c
            .status_vips
            .iter()
            .chain(&c.external_vips)
            .copied()
            .collect();
        if vips.is_empty() {
            out.problems.push(Problem {
                service: c.sref.clone(),
                reason: "NoVIP",
                message: "no address: none in status.loadBalancer.ingress, spec.loadBalancerIP \
                          or spec.externalIPs, and no IPAM pool of its family"
                    .into(),
            });
        }
        let spec = c.svc.spec.as_ref().expect("is_ours checked the spec");
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = match spec.session_affinity.as_deref() {
            Some("ClientIP") => SessionAffinity::ClientIp,
            _ => SessionAffinity::None,
        };
        let my_slices = slices_of
            .get(&(c.sref.namespace.clone(), c.sref.name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
        let forwarding = match c
            .svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORWARDING_ANNOTATION))
            .map(String::as_str)
        {
            None => opts.cluster_forwarding,
            Some("dsr") => ClusterForwarding::Dsr,
            Some("nat") => ClusterForwarding::Nat,
            Some(other) => {
                out.problems.push(Problem {
                    service: c.sref.clone(),
                    reason: "InvalidAnnotation",
                    message: format!(
                        "{FORWARDING_ANNOTATION}: {other:?} is neither dsr nor nat; using {:?}",
                        opts.cluster_forwarding
                    ),
                });
                opts.cluster_forwarding
            }
        };
        let Some(allow) = source_ranges(c.svc, &c.sref, &mut out.problems) else {
            continue;
        };
        for vip in &vips {
            if !allow.is_empty() && !allow.iter().any(|n| n.addr().is_ipv4() == vip.is_ipv4()) {
                out.problems.push(Problem {
                    service: c.sref.clone(),
                    reason: "SourceRangesOtherFamily",
                    message: format!(
                        "loadBalancerSourceRanges has no {} range, so no client may reach {vip}: not serving it",
                        if vip.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                });
                continue;
            }
            for p in &c.ports {
                let name = format!("{}:{}/{}@{vip}", c.sref, p.port, p.protocol.name());
                let eps = endpoints_for(my_slices, p, vip.is_ipv6(), local, opts, &mut local_ready);
                let svc = |name: String, mode, backends, encapsulated| ServiceConfig {
                    name,
                    vip: *vip,
                    port: p.port,
                    protocol: p.protocol,
                    mode,
                    backends,
                    session_affinity: affinity,
                    health_check: None,
                    encapsulated,
                    allow: allow.clone(),
                };
                // Local: only this node's endpoints, which see the client's address.
                if local {
                    out.services
                        .push(svc(name, Mode::Dnat, to_backends(eps), false));
                    continue;
                }
                if forwarding == ClusterForwarding::Nat {
                    out.services
                        .push(svc(name, Mode::Nat, to_backends(eps), false));
                    continue;
                }
                // dsr across nodes: to each endpoint through the node that hosts it;
                // this node's own endpoints by dnat. And the service that node runs
                // for what arrives encapsulated: dnat to its own endpoints.
                let mut remote = Vec::new();
                let mut here = Vec::new();
                for ep in &eps {
                    if ep.local {
                        here.push(ep.clone());
                        let mut b = to_backend(ep);
                        b.dnat_here = true;
                        remote.push(b);
                        continue;
                    }
                    let via = ep
                        .node
                        .as_ref()
                        .and_then(|n| node_addrs.get(n))
                        .and_then(|ips| {
                            ips.iter().copied().find(|ip| ip.is_ipv4() == vip.is_ipv4())
                        });
                    match via {
                        Some(via) => {
                            let mut b = to_backend(ep);
                            b.via = Some(via);
                            remote.push(b);
                        }
                        None => out.problems.push(Problem {
                            service: c.sref.clone(),
                            reason: "NodeAddressUnknown",
                            message: format!(
                                "endpoint {} is on node {:?}, which has no {} address in its status: not served over dsr",
                                ep.address,
                                ep.node.as_deref().unwrap_or("?"),
                                if vip.is_ipv4() { "IPv4" } else { "IPv6" }
                            ),
                        }),
                    }
                }
                out.services.push(svc(
                    format!("{name} (from tunnel)"),
                    Mode::Dnat,
                    to_backends(here),
                    true,
                ));
                out.services.push(svc(name, Mode::Dsr, remote, false));
            }
        }
        if local {
            if let Some(port) = spec
                .health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
            {
                out.health_ports.insert(
                    port,
                    HealthPort {
                        service: c.sref.to_string(),
                        local_endpoints: local_ready.len(),
                    },
                );
            }
        }
    }
    out.problems.sort();
    out.problems.dedup();
    out
}

/// The Service's source ranges (`spec.loadBalancerSourceRanges`, or the annotation
/// when the field is empty). None: a range does not parse, and the Service is not
/// served at all, with an Event: served open it would admit the clients its owner
/// meant to refuse, and served with the valid ranges only, a typo would refuse the
/// clients the owner meant to admit without anything to show why.
fn source_ranges(
    svc: &Service,
    sref: &ServiceRef,
    problems: &mut Vec<Problem>,
) -> Option<Vec<IpNet>> {
    let field: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let (what, texts) = if field.is_empty() {
        let annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        (SOURCE_RANGES_ANNOTATION, annotation)
    } else {
        ("spec.loadBalancerSourceRanges", field)
    };
    let mut out = Vec::new();
    for (k, t) in texts.iter().enumerate() {
        match crate::config::parse_source_range(t) {
            Ok(n) if !out.contains(&n) => out.push(n),
            Ok(_) => {}
            Err(e) => {
                problems.push(Problem {
                    service: sref.clone(),
                    reason: "InvalidSourceRange",
                    message: format!(
                        "{what}[{k}]: {e}; not serving this Service until it is fixed"
                    ),
                });
                return None;
            }
        }
    }
    Some(out)
}

pub fn service_ref_of(svc: &Service) -> ServiceRef {
    let m = &svc.metadata;
    ServiceRef {
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        name: m.name.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        resource_version: m.resource_version.clone().unwrap_or_default(),
    }
}

/// Every ingress entry says `ipMode: VIP`.
fn ip_mode_vip(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|ing| ing.iter().all(|i| i.ip_mode.as_deref() == Some("VIP")))
}

fn current_status(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| {
            ing.iter()
                .filter_map(|i| i.ip.as_ref()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn read_service<'a>(svc: &'a Service, problems: &mut Vec<Problem>) -> Candidate<'a> {
    let sref = service_ref_of(svc);
    let spec = svc.spec.as_ref().expect("is_ours checked the spec");
    let mut bad = |reason: &'static str, message: String| {
        problems.push(Problem {
            service: sref.clone(),
            reason,
            message,
        })
    };
    let mut parse_ips = |field: &str, ips: Vec<&String>| -> Vec<IpAddr> {
        let mut out = Vec::new();
        for s in ips {
            match s.parse::<IpAddr>() {
                Ok(ip) if !out.contains(&ip) => out.push(ip),
                Ok(_) => {}
                Err(_) => bad("InvalidVIP", format!("{field}: {s:?} is not an IP address")),
            }
        }
        out
    };
    let status_ips: Vec<&String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.as_ref()).collect())
        .unwrap_or_default();
    let mut status_vips = parse_ips("status.loadBalancer.ingress", status_ips);
    for ip in parse_ips(
        "spec.loadBalancerIP",
        spec.load_balancer_ip.iter().collect(),
    ) {
        if !status_vips.contains(&ip) {
            status_vips.push(ip);
        }
    }
    let external_vips: Vec<IpAddr> = parse_ips(
        "spec.externalIPs",
        spec.external_ips.iter().flatten().collect(),
    )
    .into_iter()
    .filter(|ip| !status_vips.contains(ip))
    .collect();

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                bad(
                    "UnsupportedProtocol",
                    format!("spec.ports[{i}] ({}): protocol {other} is not supported; xlb serves TCP and UDP", p.port),
                );
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            bad(
                "InvalidPort",
                format!("spec.ports[{i}].port: {} is not a port", p.port),
            );
            continue;
        };
        ports.push(PortSpec {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            protocol,
        });
    }
    let mut wants_v6 = Vec::new();
    for f in spec.ip_families.iter().flatten() {
        match f.as_str() {
            "IPv4" => wants_v6.push(false),
            "IPv6" => wants_v6.push(true),
            other => bad(
                "InvalidIPFamily",
                format!("spec.ipFamilies: unknown family {other:?}"),
            ),
        }
    }
    if wants_v6.is_empty() {
        wants_v6.push(false);
    }
    Candidate {
        svc,
        sref,
        status_vips,
        external_vips,
        ports,
        wants_v6,
    }
}

fn group_slices<'a>(
    slices: &[&'a EndpointSlice],
) -> BTreeMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut out: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        out.entry((ns, svc.clone())).or_default().push(s);
    }
    out
}

/// One endpoint of a Service port.
#[derive(Debug, Clone)]
struct Endpoint {
    address: SocketAddr,
    weight: u32,
    /// On this node.
    local: bool,
    node: Option<String>,
}

fn to_backend(ep: &Endpoint) -> BackendConfig {
    BackendConfig {
        address: ep.address,
        weight: ep.weight,
        healthy: true,
        snat: None,
        via: None,
        dnat_here: false,
    }
}

fn to_backends(eps: Vec<Endpoint>) -> Vec<BackendConfig> {
    eps.iter().map(to_backend).collect()
}

/// The endpoints of one Service port in one family. The target port comes from each
/// slice's port of the same name (the EndpointSlice controller has already resolved a
/// named targetPort per Pod). Ready endpoints get new flows (weight 1); serving but
/// terminating ones keep their flows and get no new ones (weight 0, drain).
fn endpoints_for(
    slices: &[&EndpointSlice],
    port: &PortSpec,
    v6: bool,
    local_only: bool,
    opts: &Options,
    local_ready: &mut BTreeSet<IpAddr>,
) -> Vec<Endpoint> {
    let want_type = if v6 { "IPv6" } else { "IPv4" };
    let mut by_addr: BTreeMap<SocketAddr, (u32, bool, Option<String>)> = BTreeMap::new();
    for s in slices.iter().filter(|s| s.address_type == want_type) {
        let Some(target) = s.ports.iter().flatten().find_map(|sp| {
            let name = sp.name.clone().filter(|n| !n.is_empty());
            let proto_ok = sp.protocol.as_deref().unwrap_or("TCP") == port.protocol.k8s_name();
            (name == port.name && proto_ok).then_some(sp.port).flatten()
        }) else {
            continue;
        };
        let Some(target) = u16::try_from(target).ok().filter(|p| *p != 0) else {
            continue;
        };
        for ep in &s.endpoints {
            let cond = ep.conditions.as_ref();
            // Unset conditions mean ready and serving, not terminating (the API's rule).
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let weight = if ready {
                1
            } else if serving && terminating {
                0
            } else {
                continue;
            };
            let is_local = opts.node_name.is_some() && ep.node_name == opts.node_name;
            if local_only && !is_local {
                continue;
            }
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if ip.is_ipv6() != v6 {
                continue;
            }
            if weight == 1 && is_local {
                local_ready.insert(ip);
            }
            let e = by_addr.entry(SocketAddr::new(ip, target)).or_insert((
                0,
                is_local,
                ep.node_name.clone(),
            ));
            e.0 = e.0.max(weight);
        }
    }
    by_addr
        .into_iter()
        .map(|(address, (weight, local, node))| Endpoint {
            address,
            weight,
            local,
            node,
        })
        .collect()
}

#[cfg(test)]
mod tests {
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

    fn service(
        name: &str,
        created: &str,
        spec: serde_json::Value,
        status_ip: Option<&str>,
    ) -> Service {
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
                .map(|b| (b.address.to_string(), b.via, b.dnat_here))
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
            let cfg = crate::config::Config {
                services: d.services.clone(),
                ..Default::default()
            };
            cfg.validate().unwrap();
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
}
