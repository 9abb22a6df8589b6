//! A Service port's endpoints, from its EndpointSlices.

use super::*;

/// One endpoint of a Service port.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub(super) address: SocketAddr,
    pub(super) weight: u32,
    /// On this node.
    pub(super) local: bool,
    pub(super) node: Option<String>,
}

pub(super) fn to_backend(ep: &Endpoint) -> Backend {
    Backend::new(ep.address, ep.weight, None)
}

pub(super) fn to_backends(eps: Vec<Endpoint>) -> Vec<Backend> {
    eps.iter().map(to_backend).collect()
}

/// The endpoints of one Service port in one family. The target port comes from each
/// slice's port of the same name (the EndpointSlice controller has already resolved a
/// named targetPort per Pod). Ready endpoints get new flows (weight 1); serving but
/// terminating ones keep their flows and get no new ones (weight 0, drain).
pub(super) fn endpoints_for(
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
