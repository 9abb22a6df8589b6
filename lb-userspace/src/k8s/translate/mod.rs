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

use std::sync::Arc;

use super::ipam;
use crate::model::{self, Backend, Mode, Protocol, SessionAffinity};

/// The loadBalancerClass xlb serves unless told otherwise.
pub const DEFAULT_CLASS: &str = "xlb.dev/xdp";
/// Services with the same value may share a VIP, on different ports.
pub const SHARED_IP_ANNOTATION: &str = "xlb.dev/allow-shared-ip";
/// `dsr` or `nat`: how an `externalTrafficPolicy: Cluster` Service reaches endpoints
/// on other nodes, overriding `--cluster-forwarding`.
pub const FORWARDING_ANNOTATION: &str = "xlb.dev/forwarding";
/// `"false"`: the Service's flows get no conntrack entry and every packet is balanced
/// by Maglev alone (`conntrack: false` in the config file); `"true"`, or absent: they
/// do. Refused, as in the file, where the Service is forwarded by nat.
pub const CONNTRACK_ANNOTATION: &str = "xlb.dev/conntrack";
/// The older way to give source ranges, read when `spec.loadBalancerSourceRanges` is
/// empty (as kube-proxy does): a comma-separated list of CIDRs.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// How `externalTrafficPolicy: Cluster` traffic reaches the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    pub services: Vec<model::Service>,
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
    let t = Cache::default().translate(services, slices, nodes, opts);
    Desired {
        services: t.services.into_iter().map(Arc::unwrap_or_clone).collect(),
        status: t.status,
        problems: t.problems,
        health_ports: t.health_ports,
    }
}

/// `translate`'s result as `Cache::translate` gives it: the services shared with the
/// cache, and the names of those made again by this translation (the rest are the
/// last translation's, unchanged).
#[derive(Debug, Default)]
pub struct Translated {
    pub services: Vec<Arc<model::Service>>,
    pub status: Vec<(ServiceRef, Vec<IpAddr>)>,
    pub problems: Vec<Problem>,
    pub health_ports: BTreeMap<u16, HealthPort>,
    pub fresh: BTreeSet<String>,
}

fn translate_cached(
    cache: &mut Cache,
    services: &[&Service],
    slices: &[&EndpointSlice],
    nodes: &[&Node],
    opts: &Options,
) -> Translated {
    let mut out = Translated::default();
    let node_addrs = node_addresses(nodes);
    cache.begin(&node_addrs);
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
        let my_slices = slices_of
            .get(&(c.sref.namespace.clone(), c.sref.name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let piece = cache.piece(c, my_slices, &node_addrs, opts);
        out.services.extend(piece.services.iter().cloned());
        out.problems.extend(piece.problems.iter().cloned());
        if let Some((port, hp)) = &piece.health_port {
            out.health_ports.insert(*port, hp.clone());
        }
    }
    out.fresh = cache.done();
    out.problems.sort();
    out.problems.dedup();
    out
}

/// What one Service gives, besides its status: its xlb services, its problems, its
/// health check port. A function of the Service, its EndpointSlices, its VIPs (as the
/// conflicts and pools left them), the nodes' addresses and the options only: what
/// `Cache` keeps between translations.
#[derive(Debug, Default)]
pub(super) struct Piece {
    pub(super) services: Vec<Arc<model::Service>>,
    pub(super) problems: Vec<Problem>,
    pub(super) health_port: Option<(u16, HealthPort)>,
}

fn serve(
    c: &Candidate,
    my_slices: &[&EndpointSlice],
    node_addrs: &BTreeMap<String, Vec<IpAddr>>,
    opts: &Options,
) -> Piece {
    let mut out = Piece::default();
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
    let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
    let forwarding = annotations::forwarding(c, opts, &mut out.problems);
    let conntrack = annotations::conntrack(c, &mut out.problems);
    let Some(allow) = source_ranges(c.svc, &c.sref, &mut out.problems) else {
        return out;
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
            let svc = |name: String, mode, backends, encapsulated| {
                Arc::new(model::Service {
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
                    conntrack,
                })
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
                    b.local = true;
                    remote.push(b);
                    continue;
                }
                let via = ep
                    .node
                    .as_ref()
                    .and_then(|n| node_addrs.get(n))
                    .and_then(|ips| ips.iter().copied().find(|ip| ip.is_ipv4() == vip.is_ipv4()));
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
            out.health_port = Some((
                port,
                HealthPort {
                    service: c.sref.to_string(),
                    local_endpoints: local_ready.len(),
                },
            ));
        }
    }
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
        match crate::model::parse_source_range(t) {
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

mod annotations;
mod cache;
mod endpoints;
pub use cache::Cache;
use endpoints::{endpoints_for, to_backend, to_backends};

#[cfg(test)]
mod tests;
