//! The route sink: each VIP this node can serve, as a host route (/32, /128) in a
//! kernel routing table of xlb's own, for the host's routing daemon (BIRD, FRR) to
//! export over BGP. No `ip rule` points at that table, so no lookup on the host
//! changes; the routes only carry the announcement.
//!
//! A VIP is announced while the program is attached and one of its services can take
//! new flows (a backend with weight > 0 that passes its health check; for Kubernetes'
//! Local policy the services already hold only this node's endpoints). It is withdrawn
//! within a second of that ending (the agent reconciles on every change and every
//! second), on `xlb drain`, and by `xlb detach`. SIGTERM without detach keeps the
//! routes: the datapath still forwards.
//!
//! The routes carry protocol RTPROT_XLB (248): `ip route show table 200 proto 248`.
//! A restarted agent finds its predecessor's routes by that mark and keeps or removes
//! each, as the desired state says.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};
use tracing::{info, warn};

use crate::{model::Desired, nexthop::RTPROT_XLB, sink::Sink};

pub struct RouteSink {
    handle: Handle,
    table: u32,
    lo: u32,
    /// What is in the table now, and since when (seconds since the epoch).
    announced: BTreeMap<IpAddr, u64>,
}

/// The routes sink: a host route per VIP to announce, in xlb's own table.
impl Sink for RouteSink {
    /// (announced, withdrawn).
    type Changes = (Vec<IpAddr>, Vec<IpAddr>);

    async fn apply(&mut self, desired: &Desired) -> Result<Self::Changes> {
        Ok(self.set_routes(&desired.announce).await)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RouteSink {
    /// Opens a netlink socket and reads what an earlier agent left in `table`.
    pub async fn new(table: u32) -> Result<Self> {
        anyhow::ensure!(
            !(table == 0 || (253..=255).contains(&table)),
            "routing table {table} is one of the kernel's own (local, main, default or unspec); pick another, e.g. 200"
        );
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink route socket")?;
        tokio::spawn(conn);
        let name = std::ffi::CString::new("lo").expect("no NUL");
        // SAFETY: if_nametoindex reads a valid C string.
        let lo = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(lo != 0, "no loopback interface in this network namespace");
        let mut sink = Self {
            handle,
            table,
            lo,
            announced: BTreeMap::new(),
        };
        let now = now_s();
        for vip in sink.ours().await? {
            sink.announced.insert(vip, now);
        }
        Ok(sink)
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    /// What is announced, and since when (seconds since the epoch).
    pub fn announced(&self) -> &BTreeMap<IpAddr, u64> {
        &self.announced
    }

    /// xlb's routes in the table, as the kernel has them.
    async fn ours(&self) -> Result<BTreeSet<IpAddr>> {
        Ok(xlb_routes(&self.handle)
            .await?
            .into_iter()
            .filter(|(table, _, _)| *table == self.table)
            .map(|(_, dst, _)| dst)
            .collect())
    }

    fn message(&self, vip: IpAddr) -> RouteMessage {
        let proto = RouteProtocol::Other(RTPROT_XLB);
        match vip {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .table_id(self.table)
                .protocol(proto)
                .scope(RouteScope::Link)
                .output_interface(self.lo)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .table_id(self.table)
                .protocol(proto)
                .scope(RouteScope::Link)
                .output_interface(self.lo)
                .build(),
        }
    }

    /// Makes the table hold exactly `want`. Returns (announced, withdrawn).
    pub async fn set_routes(&mut self, want: &BTreeSet<IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let have: Vec<IpAddr> = self.announced.keys().copied().collect();
        for vip in have.iter().filter(|v| !want.contains(v)) {
            match self.handle.route().del(self.message(*vip)).execute().await {
                Ok(()) => {}
                // Already gone (removed by hand, or the table flushed): withdrawn all the same.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(e) => {
                    warn!(%vip, table = self.table, "withdrawing the VIP's route failed: {e}");
                    continue;
                }
            }
            self.announced.remove(vip);
            info!(%vip, table = self.table, "VIP withdrawn");
            removed.push(*vip);
        }
        let missing: Vec<IpAddr> = want
            .iter()
            .filter(|v| !self.announced.contains_key(v))
            .copied()
            .collect();
        for vip in &missing {
            match self
                .handle
                .route()
                .add(self.message(*vip))
                .replace()
                .execute()
                .await
            {
                Ok(()) => {
                    self.announced.insert(*vip, now_s());
                    info!(%vip, table = self.table, "VIP announced");
                    added.push(*vip);
                }
                Err(e) => warn!(%vip, table = self.table, "announcing the VIP failed: {e}"),
            }
        }
        (added, removed)
    }
}

/// `xlb drain` / `undrain`: the switch the agent reads every second.
pub fn set_drained(pin_path: &std::path::Path, drained: bool) -> Result<()> {
    let mut map = control(pin_path)?;
    map.set(lb_common::CONTROL_DRAINED, drained as u32, 0)
        .context("writing the drain switch")?;
    Ok(())
}

pub fn is_drained(pin_path: &std::path::Path) -> bool {
    control(pin_path)
        .ok()
        .and_then(|m| m.get(&lb_common::CONTROL_DRAINED, 0).ok())
        .is_some_and(|v| v != 0)
}

fn control(pin_path: &std::path::Path) -> Result<aya::maps::Array<aya::maps::MapData, u32>> {
    let data = crate::dataplane::open_pinned(pin_path, lb_common::MAP_CONTROL)?;
    Ok(aya::maps::Array::try_from(aya::maps::Map::Array(data))?)
}

/// Records what is announced in the pinned XLB_ANNOUNCED map, for `xlb status`.
pub fn record(
    pin_path: &std::path::Path,
    table: u32,
    announced: &BTreeMap<IpAddr, u64>,
) -> Result<()> {
    use lb_common::{Announced, VipKey};
    let data = aya::maps::MapData::from_pin(pin_path.join(lb_common::MAP_ANNOUNCED))?;
    let mut map =
        aya::maps::HashMap::<_, VipKey, Announced>::try_from(aya::maps::Map::HashMap(data))?;
    let key = |vip: &IpAddr| {
        let (addr, family) = crate::codec::addr_to_words(*vip);
        VipKey {
            addr,
            family: family as u32,
        }
    };
    let want: BTreeMap<_, _> = announced
        .iter()
        .map(|(v, since)| {
            (
                {
                    let k = key(v);
                    (k.addr, k.family)
                },
                Announced {
                    since_s: *since,
                    table,
                    _pad: 0,
                },
            )
        })
        .collect();
    let have: Vec<VipKey> = map.keys().filter_map(Result::ok).collect();
    for k in have {
        if !want.contains_key(&(k.addr, k.family)) {
            let _ = map.remove(&k);
        }
    }
    for ((addr, family), v) in want {
        map.insert(VipKey { addr, family }, v, 0)?;
    }
    Ok(())
}

/// Reads XLB_ANNOUNCED back: (VIP, table, since).
pub fn read_announced(pin_path: &std::path::Path) -> Vec<(IpAddr, u32, u64)> {
    use lb_common::{Announced, VipKey};
    let Ok(data) = aya::maps::MapData::from_pin(pin_path.join(lb_common::MAP_ANNOUNCED)) else {
        return Vec::new();
    };
    let Ok(map) =
        aya::maps::HashMap::<_, VipKey, Announced>::try_from(aya::maps::Map::HashMap(data))
    else {
        return Vec::new();
    };
    let mut out: Vec<_> = map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| {
            (
                crate::codec::words_to_addr(&k.addr, k.family as u8),
                v.table,
                v.since_s,
            )
        })
        .collect();
    out.sort();
    out
}

/// Every route marked RTPROT_XLB, in any table: (table, destination, the message).
async fn xlb_routes(handle: &Handle) -> Result<Vec<(u32, IpAddr, RouteMessage)>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        let mut routes = handle.route().get(msg).execute();
        while let Some(r) = routes.try_next().await.context("listing routes")? {
            if r.header.protocol != RouteProtocol::Other(RTPROT_XLB) {
                continue;
            }
            let table = crate::nexthop::route_table(&r);
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if let Some(dst) = dst {
                out.push((table, dst, r));
            }
        }
    }
    Ok(out)
}

/// Deletes xlb's routes to `vips` from every table (for `xlb detach`, which does not
/// know the table an agent used). Returns how many were deleted.
pub async fn withdraw_everywhere(vips: &BTreeSet<IpAddr>) -> Result<usize> {
    let (conn, handle, _) =
        rtnetlink::new_connection().context("opening a netlink route socket")?;
    tokio::spawn(conn);
    let doomed: Vec<RouteMessage> = xlb_routes(&handle)
        .await?
        .into_iter()
        .filter(|(_, dst, _)| vips.contains(dst))
        .map(|(_, _, r)| r)
        .collect();
    let n = doomed.len();
    for r in doomed {
        handle
            .route()
            .del(r)
            .execute()
            .await
            .context("deleting a route")?;
    }
    Ok(n)
}
