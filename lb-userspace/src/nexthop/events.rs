//! The kernel's own word that a route, an address, a link or a neighbour changed: a
//! netlink socket bound to those multicast groups. Nothing is polled: a backend's path
//! is looked up again only when an event says it may have changed.

use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use rtnetlink::{
    constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
        RTMGRP_NEIGH,
    },
    packet_core::NetlinkPayload,
    packet_route::{
        address::AddressAttribute,
        link::{LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute},
        route::{RouteAttribute, RouteMessage},
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc;

/// One change that can move a backend's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A route to this prefix was added, changed or removed (any table).
    Route(IpNet),
    /// An address was added to or removed from this interface.
    Address { ifindex: u32, addr: IpAddr },
    /// The link went up or down, or went away.
    Link { ifindex: u32, up: bool },
    /// A neighbour entry was deleted.
    NeighbourGone { ifindex: u32, addr: IpAddr },
    /// The socket's buffer overran: events were lost, so everything may have changed.
    Lost,
}

/// Subscribes to route, address, link and neighbour changes in this network namespace.
pub fn subscribe() -> Result<mpsc::UnboundedReceiver<Event>> {
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket for route events")?;
    let groups = RTMGRP_LINK
        | RTMGRP_NEIGH
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .context("subscribing to route, address, link and neighbour events")?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(m) => classify(m),
                NetlinkPayload::Overrun(_) => Some(Event::Lost),
                _ => None,
            };
            if let Some(e) = event {
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    Ok(rx)
}

fn classify(m: RouteNetlinkMessage) -> Option<Event> {
    use RouteNetlinkMessage::*;
    match m {
        NewRoute(r) | DelRoute(r) => route_prefix(&r).map(Event::Route),
        NewAddress(a) | DelAddress(a) => {
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })?;
            Some(Event::Address {
                ifindex: a.header.index,
                addr,
            })
        }
        NewLink(l) => Some(Event::Link {
            ifindex: l.header.index,
            up: link_up(&l),
        }),
        DelLink(l) => Some(Event::Link {
            ifindex: l.header.index,
            up: false,
        }),
        DelNeighbour(n) => {
            let addr = n.attributes.iter().find_map(|at| match at {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            })?;
            Some(Event::NeighbourGone {
                ifindex: n.header.ifindex,
                addr,
            })
        }
        _ => None,
    }
}

/// Up and carrying packets.
fn link_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up) && l.header.flags.contains(LinkFlags::LowerUp)
}

/// The prefix a route message is for (no destination: the default route).
fn route_prefix(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    let dst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => super::route_addr(d),
        _ => None,
    });
    let addr = match (dst, r.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}
