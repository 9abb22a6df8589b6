//! How each backend is reached, from the kernel's own routing: the interface, the next
//! hop (a gateway, or the backend itself on a connected network) and the source address
//! the kernel would use (`snat: auto`, as MASQUERADE picks it).
//!
//! The XDP program cannot resolve a link-layer address: bpf_fib_lookup only reads the
//! neighbour table. So every next hop is kept in that table as a *managed* entry
//! (NTF_EXT_MANAGED, Linux 5.16+), which the kernel resolves at once and keeps
//! reachable by probing it. Entries the agent creates carry protocol RTPROT_XLB, so
//! the ones no backend needs any more are found and deleted, also after a restart.
//! Static entries (permanent, noarp) are the operator's and are left alone. Next hops
//! the datapath still finds unresolved (a route changed) come back as requests on a
//! ring buffer and are handled the same way.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    packet_route::{
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage,
            NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType, RouteVia},
        AddressFamily,
    },
    Handle,
};
use tracing::{debug, info, warn};

use crate::model::Service;

mod events;
mod shared;
pub use events::{subscribe, Event};

/// Route lookups (one netlink round trip each) in flight at once.
const ROUTE_LOOKUPS_IN_FLIGHT: usize = 64;
/// From this many backends looked up at once, those behind one gateway route share
/// a lookup.
const SHARED_FROM: usize = 64;
/// Unroutable backends named one by one in the log; more are counted.
const UNROUTABLE_NAMED: usize = 10;

/// The routing protocol number xlb marks its neighbour entries (and, later, routes)
/// with: `ip neigh show proto 248`. 248 is unassigned in iproute2's rt_protos.
pub const RTPROT_XLB: u8 = 248;

/// How the kernel reaches one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    pub ifindex: u32,
    /// The neighbour to resolve: the gateway, or the backend on a connected network.
    pub neighbour: IpAddr,
    /// The preferred source address of the route (None on a route without one and no
    /// address of that family on the interface).
    pub source: Option<IpAddr>,
    /// The backend is an address of this host: nothing to resolve.
    pub local: bool,
}

pub struct NextHops {
    handle: Handle,
    /// The backends (their targets: `via`, else the backend) with a usable route. A
    /// hash map: 100,000 of them in a B-tree took 11 MB, two thirds of it its nodes'
    /// empty room; nothing here needs them in order.
    paths: HashMap<IpAddr, Path>,
    /// Backends without a usable route, already warned about.
    unroutable: BTreeSet<IpAddr>,
    /// The links last seen up or down, so a link event that changes neither (an XDP
    /// attach, a rename) looks nothing up again.
    links: BTreeMap<u32, bool>,
}

impl NextHops {
    /// Opens a netlink socket in this network namespace.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a netlink route socket")?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            paths: HashMap::new(),
            unroutable: BTreeSet::new(),
            links: BTreeMap::new(),
        })
    }

    /// Fills in each backend's resolved route source (`snat: auto`).
    pub fn resolve(&self, services: &mut [Service]) {
        for svc in services {
            for b in &mut svc.backends {
                b.snat = self.paths.get(&b.target()).and_then(|p| p.source);
            }
        }
    }

    /// Looks up the routes of the backends of `wanted` not known yet, and makes their
    /// next hops managed neighbour entries: a reload that adds one backend looks up one
    /// route. The ones no longer wanted are kept until `forget` (after the new state
    /// applied: a rejected reload leaves the running backends followed). Returns
    /// whether any path changed. Errors about single backends are logged, never fatal:
    /// such a backend gets no SNAT address and its new flows are counted as
    /// drop_no_snat_address.
    ///
    /// Then waits up to `wait` for the new next hops to resolve: a backend's first
    /// packet then finds its link-layer address (IPv6 neighbours on links that just
    /// came up take a second or two).
    pub async fn track(&mut self, wanted: &BTreeSet<IpAddr>, wait: std::time::Duration) -> bool {
        let new: Vec<IpAddr> = wanted
            .iter()
            .filter(|a| !self.paths.contains_key(a) && !self.unroutable.contains(a))
            .copied()
            .collect();
        if new.is_empty() {
            return false;
        }
        let hops_before = self.hops();
        let changed = self.look_up(new).await;
        let hops = self.hops();
        if hops != hops_before {
            if let Err(e) = self.sync_neighbours(&hops).await {
                warn!("keeping the backends' next hops resolved failed: {e:#}");
            }
        }
        if !wait.is_zero() {
            let new_hops: BTreeSet<_> = hops.difference(&hops_before).copied().collect();
            self.wait_resolved(&new_hops, wait).await;
        }
        changed
    }

    /// Stops following the backends not in `wanted` (the state without them applied),
    /// and deletes the managed neighbour entries no backend needs any more.
    pub async fn forget(&mut self, wanted: &BTreeSet<IpAddr>) {
        let hops_before = self.hops();
        self.paths.retain(|a, _| wanted.contains(a));
        self.unroutable.retain(|a| wanted.contains(a));
        let hops = self.hops();
        if hops != hops_before {
            if let Err(e) = self.sync_neighbours(&hops).await {
                warn!("keeping the backends' next hops resolved failed: {e:#}");
            }
        }
    }

    /// Stops following these backends (no backend of the state applied has them), and
    /// deletes the managed neighbour entries no backend needs any more: `forget` for a
    /// change that knows what it removed.
    pub async fn forget_these(&mut self, gone: &BTreeSet<IpAddr>) {
        let mut hops_gone = BTreeSet::new();
        for a in gone {
            if let Some(p) = self.paths.remove(a).filter(|p| !p.local) {
                hops_gone.insert((p.ifindex, p.neighbour));
            }
            self.unroutable.remove(a);
        }
        // A next hop another backend still goes through stays (one gateway for
        // 100,000 backends: the first path looked at says so).
        hops_gone.retain(|h| {
            !self
                .paths
                .values()
                .any(|p| !p.local && (p.ifindex, p.neighbour) == *h)
        });
        if hops_gone.is_empty() {
            return;
        }
        if let Err(e) = self.sync_neighbours(&self.hops()).await {
            warn!("keeping the backends' next hops resolved failed: {e:#}");
        }
    }

    /// Looks up again the paths an event may have changed. Returns whether any did.
    pub async fn changed(&mut self, event: &Event) -> bool {
        let targets: Vec<IpAddr> = match *event {
            Event::Route(net) => self.known().filter(|a| net.contains(a)).collect(),
            // An address is a route source (and a backend may be it) for its own family
            // only: the IPv6 link-local address a link gains when it comes up moves no
            // IPv4 backend.
            Event::Address { ifindex, addr } => self
                .known()
                .filter(|a| {
                    *a == addr
                        || (a.is_ipv4() == addr.is_ipv4()
                            && self.paths.get(a).is_some_and(|p| p.ifindex == ifindex))
                })
                .collect(),
            Event::Link { ifindex, up } => {
                if self.links.insert(ifindex, up) == Some(up) {
                    return false;
                }
                self.known()
                    .filter(|a| {
                        self.unroutable.contains(a)
                            || self.paths.get(a).is_some_and(|p| p.ifindex == ifindex)
                    })
                    .collect()
            }
            Event::NeighbourGone { ifindex, addr } => {
                // One of ours deleted by hand, or flushed: made again.
                if self.hops().contains(&(ifindex, addr)) {
                    self.request(ifindex, addr).await;
                }
                return false;
            }
            Event::Lost => self.known().collect(),
        };
        if targets.is_empty() {
            return false;
        }
        debug!(
            ?event,
            backends = targets.len(),
            "looking up the paths an event may have changed"
        );
        let hops_before = self.hops();
        let changed = self.look_up(targets).await;
        let hops = self.hops();
        if hops != hops_before {
            if let Err(e) = self.sync_neighbours(&hops).await {
                warn!("keeping the backends' next hops resolved failed: {e:#}");
            }
        }
        changed
    }

    /// `ip route get` for each of `targets`, many in flight at once.
    async fn look_up_each(
        &self,
        targets: Vec<IpAddr>,
    ) -> Vec<(IpAddr, std::result::Result<Path, String>)> {
        // Errors as their one-line message: a whole error per unroutable backend, held
        // for 100,000 of them, doubled the agent's memory.
        futures::stream::iter(targets)
            .map(|addr| async move { (addr, self.route(addr).await.map_err(|e| format!("{e:#}"))) })
            .buffer_unordered(ROUTE_LOOKUPS_IN_FLIGHT)
            .collect()
            .await
    }

    /// Every target followed, routable or not.
    fn known(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.paths.keys().chain(self.unroutable.iter()).copied()
    }

    /// The next hops of the routable, non-local targets.
    fn hops(&self) -> BTreeSet<(u32, IpAddr)> {
        self.paths
            .values()
            .filter(|p| !p.local)
            .map(|p| (p.ifindex, p.neighbour))
            .collect()
    }

    /// Looks up the routes of `targets`, many in flight at once (one after another,
    /// 100,000 backends took seconds of round trips). Returns whether any path changed.
    async fn look_up(&mut self, targets: Vec<IpAddr>) -> bool {
        if targets.is_empty() {
            return false;
        }
        // Backends behind one gateway route share one lookup (shared.rs); a group
        // whose lookup does not say "through that gateway" is looked up one by one.
        let (groups, mut alone) = if targets.len() >= SHARED_FROM {
            shared::group(&self.handle, targets).await
        } else {
            (Vec::new(), targets)
        };
        let firsts: Vec<IpAddr> = groups.iter().map(|g| g[0]).collect();
        alone.extend(firsts.iter().copied());
        let mut answers = self.look_up_each(alone).await;
        let mut unshared = Vec::new();
        for group in groups {
            let first = answers
                .iter()
                .find(|(a, _)| *a == group[0])
                .map(|(_, r)| r.clone());
            match first {
                Some(Ok(path)) if !path.local && path.neighbour != group[0] => {
                    answers.extend(group[1..].iter().map(|a| (*a, Ok(path))))
                }
                _ => unshared.extend_from_slice(&group[1..]),
            }
        }
        answers.extend(self.look_up_each(unshared).await);
        let mut changed = false;
        let mut newly_unroutable = Vec::new();
        for (addr, answer) in answers {
            match answer {
                Ok(path) => {
                    if self.unroutable.remove(&addr) {
                        info!(backend = %addr, "backend has a route again");
                    }
                    if self.paths.insert(addr, path) != Some(path) {
                        debug!(backend = %addr, ?path, "path to backend");
                        changed = true;
                    }
                }
                Err(e) => {
                    changed |= self.paths.remove(&addr).is_some();
                    if self.unroutable.insert(addr) {
                        newly_unroutable.push((addr, e));
                    }
                }
            }
        }
        // Each by name while they are few; past that, a count and the first ones.
        if newly_unroutable.len() <= UNROUTABLE_NAMED {
            for (addr, e) in &newly_unroutable {
                warn!(backend = %addr, "no usable route to the backend: {e}");
            }
        } else {
            let first: Vec<String> = newly_unroutable
                .iter()
                .take(UNROUTABLE_NAMED)
                .map(|(a, _)| a.to_string())
                .collect();
            warn!(
                count = newly_unroutable.len(),
                "no usable route to {} backends (their new flows are dropped as drop_no_snat_address), among them: {}",
                newly_unroutable.len(),
                first.join(", ")
            );
        }
        changed
    }

    /// Polls the neighbour tables until every hop has a link-layer address, or `wait`.
    async fn wait_resolved(&self, hops: &BTreeSet<(u32, IpAddr)>, wait: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut pending = hops.clone();
        loop {
            if let Ok(current) = self.neighbours().await {
                pending.retain(|h| !current.get(h).is_some_and(|e| e.valid));
            }
            if pending.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(unresolved = ?pending, "next hops not resolved yet: their first packets wait for resolution (IPv6) or are dropped and retransmitted (IPv4 with SNAT)");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `ip route get ADDR`: the interface, next hop and source the kernel would use.
    pub async fn route(&self, addr: IpAddr) -> Result<Path> {
        let mut msg = RouteMessage::default();
        let (family, len, dst) = match addr {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(dst));
        let mut answers = self.handle.route().get(msg).execute();
        let Some(answer) = answers.try_next().await.context("route lookup")? else {
            bail!("the kernel returned no route");
        };
        let local = match answer.header.kind {
            RouteType::Unicast => false,
            RouteType::Local => true,
            other => bail!("the route is of type {other:?}"),
        };
        let (mut ifindex, mut gateway, mut source) = (None, None, None);
        for attr in &answer.attributes {
            match attr {
                RouteAttribute::Oif(i) => ifindex = Some(*i),
                RouteAttribute::Gateway(g) => gateway = route_addr(g),
                RouteAttribute::Via(RouteVia::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::Via(RouteVia::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::PrefSource(s) => source = route_addr(s),
                _ => {}
            }
        }
        let ifindex = ifindex.context("the route names no interface")?;
        Ok(Path {
            ifindex,
            neighbour: gateway.unwrap_or(addr),
            source,
            local,
        })
    }

    /// A next hop the datapath found unresolved: make it a managed entry now.
    pub async fn request(&self, ifindex: u32, addr: IpAddr) {
        let current = self.neighbours().await.unwrap_or_default();
        if let Err(e) = self.ensure(&current, ifindex, addr).await {
            warn!(%addr, ifindex, "resolving a next hop the datapath asked for failed: {e:#}");
        }
    }

    /// Every next hop in `hops` is a managed (or static) entry; managed entries xlb made
    /// that no next hop needs any more are deleted.
    async fn sync_neighbours(&self, hops: &BTreeSet<(u32, IpAddr)>) -> Result<()> {
        let current = self.neighbours().await?;
        for &(ifindex, addr) in hops {
            self.ensure(&current, ifindex, addr).await?;
        }
        for ((ifindex, addr), entry) in &current {
            if entry.ours && !hops.contains(&(*ifindex, *addr)) {
                debug!(%addr, ifindex, "deleting a managed neighbour entry no backend needs");
                if let Err(e) = self.delete(*ifindex, *addr).await {
                    debug!(%addr, "deleting the neighbour entry failed: {e}");
                }
            }
        }
        Ok(())
    }

    async fn delete(&self, ifindex: u32, addr: IpAddr) -> Result<(), rtnetlink::Error> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family_of(addr);
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(neighbour_addr(addr)));
        self.handle.neighbours().del(msg).execute().await
    }

    /// `xlb uninstall`: deletes every neighbour entry xlb made (protocol RTPROT_XLB) in
    /// this network namespace, and only those. Returns them as (ifindex, address).
    pub async fn remove_all_ours(&self) -> Result<Vec<(u32, IpAddr)>> {
        let mut removed = Vec::new();
        for ((ifindex, addr), entry) in self.neighbours().await? {
            if !entry.ours {
                continue;
            }
            match self.delete(ifindex, addr).await {
                Ok(()) => removed.push((ifindex, addr)),
                // Gone meanwhile (its interface went, or the kernel dropped it).
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.code.map(|c| c.get()) == Some(-libc::ENOENT) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("deleting the neighbour entry for {addr} (ifindex {ifindex})")
                    })
                }
            }
        }
        Ok(removed)
    }

    async fn ensure(
        &self,
        current: &BTreeMap<(u32, IpAddr), Entry>,
        ifindex: u32,
        addr: IpAddr,
    ) -> Result<()> {
        if let Some(e) = current.get(&(ifindex, addr)) {
            if e.managed || e.static_entry {
                return Ok(());
            }
        }
        // A new entry without a link-layer address, or an existing dynamic one turned
        // managed (its state is kept): the kernel starts resolving at once.
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .state(NeighbourState::None)
            .replace();
        let m = req.message_mut();
        m.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        m.attributes
            .push(NeighbourAttribute::Protocol(RouteProtocol::from(
                RTPROT_XLB,
            )));
        req.execute()
            .await
            .with_context(|| format!("adding a managed neighbour entry for {addr}"))?;
        debug!(%addr, ifindex, "managed neighbour entry");
        Ok(())
    }

    /// The IPv4 and IPv6 neighbour tables.
    async fn neighbours(&self) -> Result<BTreeMap<(u32, IpAddr), Entry>> {
        let mut out = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(msg) = dump
                .try_next()
                .await
                .context("reading the neighbour table")?
            {
                let mut addr = None;
                let mut entry = Entry {
                    valid: matches!(
                        msg.header.state,
                        NeighbourState::Reachable
                            | NeighbourState::Stale
                            | NeighbourState::Delay
                            | NeighbourState::Probe
                            | NeighbourState::Permanent
                            | NeighbourState::Noarp
                    ),
                    managed: false,
                    ours: false,
                    static_entry: matches!(
                        msg.header.state,
                        NeighbourState::Permanent | NeighbourState::Noarp
                    ),
                };
                for attr in &msg.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            addr = Some(IpAddr::V4(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            addr = Some(IpAddr::V6(*a))
                        }
                        NeighbourAttribute::ExtFlags(f) => {
                            entry.managed = f.contains(NeighbourExtFlags::Managed)
                        }
                        NeighbourAttribute::Protocol(p) => entry.ours = u8::from(*p) == RTPROT_XLB,
                        _ => {}
                    }
                }
                if let Some(a) = addr {
                    out.insert((msg.header.ifindex, a), entry);
                }
            }
        }
        Ok(out)
    }
}

/// The XDP programs attached to an interface, by mode (program ids; 0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpProgs {
    pub native: u32,
    pub generic: u32,
    pub offload: u32,
}

/// The XDP programs attached to `iface` in this network namespace, as the kernel
/// reports them (`ip -d link` shows the same). None: no interface of that name here.
pub async fn xdp_progs(iface: &str) -> Result<Option<XdpProgs>> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let mut links = handle.link().get().match_name(iface.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("reading link {iface}")),
    };
    let mut progs = XdpProgs::default();
    let (mut attached, mut single) = (None, 0);
    for a in &link.attributes {
        if let LinkAttribute::Xdp(x) = a {
            for x in x {
                match x {
                    LinkXdp::DrvProgId(id) => progs.native = *id,
                    LinkXdp::SkbProgId(id) => progs.generic = *id,
                    LinkXdp::HwProgId(id) => progs.offload = *id,
                    LinkXdp::ProgId(id) => single = *id,
                    LinkXdp::Attached(mode) => attached = Some(*mode),
                    _ => {}
                }
            }
        }
    }
    // Kernels that give only the one program's id with its mode.
    if progs == XdpProgs::default() && single != 0 {
        match attached {
            Some(XdpAttached::Driver) => progs.native = single,
            Some(XdpAttached::SocketBuffer) => progs.generic = single,
            Some(XdpAttached::Hardware) => progs.offload = single,
            _ => {}
        }
    }
    Ok(Some(progs))
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// Has a link-layer address (NUD_VALID): bpf_fib_lookup uses it.
    valid: bool,
    managed: bool,
    ours: bool,
    static_entry: bool,
}

/// The table a route message is for (the attribute, which holds tables past 255).
pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}

pub(crate) fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn neighbour_addr(a: IpAddr) -> NeighbourAddress {
    match a {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }
}

fn family_of(a: IpAddr) -> AddressFamily {
    match a {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}
