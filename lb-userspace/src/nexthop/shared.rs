//! One route lookup for many backends, where the kernel's answer is certain to be the
//! same for all of them: 100,000 backends behind one gateway took 100,000 netlink
//! round trips (most of a large agent's start).
//!
//! Certain only when: IPv4 (IPv6 picks a source address per destination); the
//! kernel's three default policy rules and no other (no rule can then send one
//! backend elsewhere); no route of the local table covers the backend; and its most
//! specific route in the main table is a unicast route through one gateway (a
//! connected route's next hop is the backend itself, a multipath route picks a next
//! hop per destination). The kernel's source for such a route depends on the gateway,
//! not on the destination. Any other backend is looked up on its own.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
        rule::{RuleAction, RuleAttribute},
        AddressFamily,
    },
    Handle, IpVersion,
};

const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;
/// Past this many routes (a full routing table) the scan costs more than it saves.
const ROUTES_SCANNED: usize = 10_000;

/// Backends grouped by the one route each will use (look up one, give its answer to
/// all), and the rest, to look up one by one.
pub(super) async fn group(
    handle: &Handle,
    targets: Vec<IpAddr>,
) -> (Vec<Vec<IpAddr>>, Vec<IpAddr>) {
    let (v4, mut rest): (Vec<IpAddr>, Vec<IpAddr>) = targets.into_iter().partition(|a| a.is_ipv4());
    let routes = match shareable_routes(handle).await {
        Ok(r) => r,
        Err(why) => {
            tracing::debug!("no shared route lookups: {why}");
            rest.extend(v4);
            return (Vec::new(), rest);
        }
    };
    let mut groups: Vec<Vec<IpAddr>> = vec![Vec::new(); routes.len()];
    for target in v4 {
        let IpAddr::V4(a) = target else { continue };
        match route_of(&routes, a) {
            Some(i) => groups[i].push(target),
            None => rest.push(target),
        }
    }
    groups.retain(|g| !g.is_empty());
    tracing::debug!(
        groups = groups.len(),
        shared = groups.iter().map(Vec::len).sum::<usize>(),
        alone = rest.len(),
        "route lookups shared"
    );
    (groups, rest)
}

/// A route of the tables a lookup reads: its prefix, table, and whether a backend it
/// is the most specific route for can share its lookup.
struct Route {
    net: Ipv4Net,
    table: u32,
    shareable: bool,
}

/// The index of the shareable route `a` will use, if it is certain.
fn route_of(routes: &[Route], a: Ipv4Addr) -> Option<usize> {
    if routes
        .iter()
        .any(|r| r.table == RT_TABLE_LOCAL && r.net.contains(&a))
    {
        return None;
    }
    let (i, best) = routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.table == RT_TABLE_MAIN && r.net.contains(&a))
        .max_by_key(|(_, r)| r.net.prefix_len())?;
    // Two routes of one prefix (another metric or TOS): not certain which.
    let ties = routes
        .iter()
        .filter(|r| r.table == RT_TABLE_MAIN && r.net == best.net)
        .count();
    (best.shareable && ties == 1).then_some(i)
}

/// The IPv4 routes of the local and main tables, if the policy rules are the
/// kernel's defaults and the tables are not too large to scan.
async fn shareable_routes(handle: &Handle) -> Result<Vec<Route>, String> {
    let rules: Vec<_> = handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("reading the policy rules: {e}"))?;
    let default_rules = rules.len() == 3
        && rules.iter().all(|r| {
            r.header.src_len == 0
                && r.header.dst_len == 0
                && r.header.action == RuleAction::ToTable
                && r.attributes.iter().all(|a| match a {
                    RuleAttribute::Table(t) => [RT_TABLE_LOCAL, RT_TABLE_MAIN, 253].contains(t),
                    RuleAttribute::Priority(_) | RuleAttribute::Protocol(_) => true,
                    // -1: no suppress_prefixlength.
                    RuleAttribute::SuppressPrefixLen(n) => *n == u32::MAX,
                    _ => false,
                })
        });
    if !default_rules {
        return Err(format!(
            "policy rules other than the kernel's three: {rules:?}"
        ));
    }
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    let mut dump = handle.route().get(msg).execute();
    let mut routes = Vec::new();
    while let Some(r) = dump
        .try_next()
        .await
        .map_err(|e| format!("reading the routes: {e}"))?
    {
        let table = super::route_table(&r);
        if table != RT_TABLE_MAIN && table != RT_TABLE_LOCAL {
            continue;
        }
        let dst = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let net = Ipv4Net::new(dst, r.header.destination_prefix_length)
            .map_err(|e| format!("a route to {dst}: {e}"))?;
        let gateway = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_)));
        let multipath = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::MultiPath(_)));
        routes.push(Route {
            net,
            table,
            shareable: r.header.kind == RouteType::Unicast && gateway && !multipath,
        });
        if routes.len() > ROUTES_SCANNED {
            return Err(format!("more than {ROUTES_SCANNED} routes"));
        }
    }
    Ok(routes)
}
