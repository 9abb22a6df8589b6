//! The desired state: what every source produces and every sink consumes.
//!
//! No serde here and no field that a file could set by accident: the YAML schema
//! (`config`) and the Kubernetes translation (`k8s::translate`) are sources that build
//! these types; health checks and routes fill in a backend's resolved facts; the sinks
//! (`dataplane::maps`, `announce`, `l2`, the Kubernetes status writers) read them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::IpNet;

pub mod validate;
pub use validate::{not_unicast, Invalid, Place};

/// Everything the agent wants programmed: the settings and the services, with each
/// backend's resolved facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub settings: Settings,
    pub services: Vec<Service>,
    /// The VIPs to announce (routes, L2): `servable_vips` unless the node is drained.
    pub announce: BTreeSet<IpAddr>,
}

impl Desired {
    /// The VIPs that can take new flows, and so are announced (routes, L2): those of a
    /// service with a healthy backend of weight > 0. An encapsulated service's VIP is
    /// the backend's own, reached by its node address, never announced.
    pub fn servable_vips(&self) -> BTreeSet<IpAddr> {
        self.services
            .iter()
            .filter(|s| !s.encapsulated)
            .filter(|s| s.backends.iter().any(|b| b.weight > 0 && b.healthy))
            .map(|s| s.vip)
            .collect()
    }

    /// Whether the maps can hold these services: the service and backend maps' sizes
    /// are set when they are created (`--max-services`, `--max-backends`).
    pub fn check_capacity(&self, max_services: u32, max_backends: u32) -> anyhow::Result<()> {
        check_capacity(
            self.services.len(),
            self.services.iter().map(|s| s.backends.len()).sum(),
            self.services.iter().map(|s| s.allow.len()).sum(),
            max_services,
            max_backends,
        )
    }
}

/// `Desired::check_capacity` of services counted elsewhere: so many services, backends
/// in all and source ranges in all.
pub fn check_capacity(
    services: usize,
    total_backends: usize,
    total_ranges: usize,
    max_services: u32,
    max_backends: u32,
) -> anyhow::Result<()> {
    {
        if services > max_services as usize {
            anyhow::bail!(
                "field services: {services} services, the maps hold {max_services} (--max-services)"
            );
        }
        if total_backends > max_backends as usize {
            anyhow::bail!("field services: {total_backends} backends in all, the maps hold {max_backends} (--max-backends)");
        }
        if total_ranges > lb_common::SOURCE_RANGES_MAX as usize {
            anyhow::bail!(
                "field services: {total_ranges} source ranges (allow) in all, the datapath holds {}",
                lb_common::SOURCE_RANGES_MAX
            );
        }
        Ok(())
    }
}

/// The datapath's settings: from the config file and the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub snat: Snat,
    pub maglev_table_size: u32,
    pub timeouts: Timeouts,
    /// Decapsulate IP-in-IP and IPv6-in-IPv6 to this host (also on when a service is
    /// `encapsulated`).
    pub decap: bool,
    pub flood_guard: FloodGuard,
    pub icmp_echo: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            snat: Snat::default(),
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            timeouts: Timeouts::default(),
            decap: false,
            flood_guard: FloodGuard::default(),
            icmp_echo: true,
        }
    }
}

/// One service: a VIP, port and protocol, and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub backends: Vec<Backend>,
    pub session_affinity: SessionAffinity,
    pub health_check: Option<HealthCheck>,
    /// Serves packets that arrive encapsulated to this host (another node's dsr
    /// service with `via`), not clients' packets.
    pub encapsulated: bool,
    /// Only clients inside these ranges reach the service; empty: everyone.
    pub allow: Vec<IpNet>,
    /// True (the default): each flow gets a conntrack entry and stays on its backend.
    /// False (dsr and dnat only): new flows write no conntrack entry and every packet
    /// is balanced by Maglev alone, so a change of the backend set moves flows (dnat
    /// still writes the entry its replies are translated by).
    pub conntrack: bool,
}

impl Service {
    /// What its Maglev table is built from: each backend's address and weight.
    pub fn weighted_backends(&self) -> Vec<crate::maglev::WeightedBackend> {
        self.backends
            .iter()
            .map(|b| crate::maglev::WeightedBackend {
                addr: b.address,
                weight: b.weight,
            })
            .collect()
    }

    /// The ranges that apply to this service's VIP: those of its family. `None`: the
    /// service is open to everyone. `Some` and empty: it admits no one (its ranges are
    /// all of the other family).
    pub fn source_ranges(&self) -> Option<Vec<IpNet>> {
        if self.allow.is_empty() {
            return None;
        }
        Some(
            self.allow
                .iter()
                .filter(|n| n.addr().is_ipv4() == self.vip.is_ipv4())
                .copied()
                .collect(),
        )
    }

    /// What identifies the service in the datapath: two sources cannot both have it.
    pub fn slot(&self) -> (IpAddr, u16, Protocol, bool) {
        (self.vip, self.port, self.protocol, self.encapsulated)
    }
}

/// One backend: what its source says, then the facts the agent resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    pub address: SocketAddr,
    /// 0 drains the backend: no new flows, established ones stay.
    pub weight: u32,
    /// dsr: encapsulate to this address instead of the backend's own (the node that
    /// hosts the backend).
    pub via: Option<IpAddr>,
    /// On this node: reached by dnat whatever the service's mode (Kubernetes, for a dsr
    /// service's endpoints here).
    pub local: bool,
    /// Resolved: what the health checks say (true without checks).
    pub healthy: bool,
    /// Resolved: the source address the host's routing uses towards the backend, for
    /// `snat: auto`.
    pub snat: Option<IpAddr>,
}

impl Backend {
    /// A backend as a source names it, with nothing resolved yet.
    pub fn new(address: SocketAddr, weight: u32, via: Option<IpAddr>) -> Self {
        Self {
            address,
            weight,
            via,
            local: false,
            healthy: true,
            snat: None,
        }
    }

    /// Where this backend's packets are sent: `via`, else the backend itself.
    pub fn target(&self) -> IpAddr {
        self.via.unwrap_or(self.address.ip())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As written in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// As Kubernetes writes it.
    pub fn k8s_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SessionAffinity {
    #[default]
    None,
    /// New flows are placed by the client address alone.
    ClientIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Mode {
    /// Source and destination rewritten: the backend sees the LB's address, and its
    /// replies come back through the LB by plain routing.
    #[default]
    Nat,
    /// Destination rewritten only: the backend sees the client's address and port. Its
    /// replies must pass a host running xlb to be turned back into VIP → client.
    Dnat,
    /// The packet unchanged inside IP-in-IP or IPv6-in-IPv6 to the backend, which
    /// answers the client directly from the VIP.
    Dsr,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Dnat => "dnat",
            Mode::Dsr => "dsr",
        }
    }
}

/// An unhealthy backend leaves the Maglev table: no new flows. With
/// `keep_established` its established flows stay, as when draining.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port to probe; default: the backend's own.
    pub port: Option<u16>,
    /// HTTP path (default `/`).
    pub path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub keep_established: bool,
}

impl HealthCheck {
    /// The HTTP path probed.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp,
    Http,
}

/// SNAT source addresses (None: the route's, `snat: auto`) and the port range, kept
/// apart from the host's ip_local_port_range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snat {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub port_min: u16,
    pub port_max: u16,
}

impl Default for Snat {
    fn default() -> Self {
        Self {
            ipv4: None,
            ipv6: None,
            port_min: 20000,
            port_max: 32767,
        }
    }
}

impl Snat {
    /// The configured addresses: a VIP may not be one of them.
    pub fn addresses(&self) -> Vec<IpAddr> {
        [self.ipv4.map(IpAddr::from), self.ipv6.map(IpAddr::from)]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The configured address of `addr`'s family, if one is.
    pub fn configured(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.ipv4.map(Into::into),
            IpAddr::V6(_) => self.ipv6.map(Into::into),
        }
    }
}

/// Idle timeouts in seconds, checked by the datapath on each packet, and how often the
/// agent sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_idle: u32,
    pub tcp_closing: u32,
    pub udp_idle: u32,
    /// A TCP flow whose handshake never completed.
    pub tcp_syn: u32,
    pub gc_interval: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_idle: 3600,
            tcp_closing: 10,
            // Shorter than the kernel conntrack's 120 s for SYN_SENT: a SYN flood's
            // entries go within a minute.
            tcp_syn: 60,
            udp_idle: 60,
            gc_interval: 10,
        }
    }
}

/// New flows per second on one CPU above which flows get no conntrack entry; 0: off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodGuard {
    pub new_flows_per_cpu: u32,
}

impl Default for FloodGuard {
    /// Katran's default max_conn_rate.
    fn default() -> Self {
        Self {
            new_flows_per_cpu: 125_000,
        }
    }
}

/// Parses a source range: a CIDR, or one address (a /32 or /128). Host bits are
/// cleared, as Kubernetes' own parsing does (the config file refuses them:
/// `config::parse_file_source_range`).
pub fn parse_source_range(text: &str) -> std::result::Result<IpNet, String> {
    let t = text.trim();
    let net = match t.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match t.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(format!(
                    "{text:?} is not a CIDR range (e.g. 203.0.113.0/24 or 2001:db8::/48)"
                ))
            }
        },
    };
    Ok(net.trunc())
}
