//! The static YAML config (see docs/design.md) and its validation. A file is accepted whole
//! or rejected whole; every error names the file, and the field by its path.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use lb_common::{MAGLEV_MAX_TABLE_SIZE, SOURCE_RANGES_MAX};
use serde::Deserialize;

use crate::maglev;

#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Static services. With `--kubernetes` the file may hold none: it then only sets
    /// SNAT, timeouts and the table size, and the services come from the API.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// `snat: auto` (the default) or `snat: {ipv4, ipv6, port_min, port_max}`.
    #[serde(default, deserialize_with = "snat_or_auto")]
    pub snat: SnatConfig,
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u32,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Decapsulate IP-in-IP and IPv6-in-IPv6 packets addressed to this host in XDP and
    /// pass the inner packet to the kernel: the backend's side of `mode: dsr`.
    #[serde(default)]
    pub decap: bool,
    /// How this node announces the VIPs it can serve (docs/announce.md).
    #[serde(default)]
    pub announce: Announce,
    /// Above a rate of new flows, stop making conntrack entries (docs/robustness.md).
    #[serde(default)]
    pub flood_guard: FloodGuard,
    /// Answer ICMP echo (ping) to a VIP from XDP while one of its services can take new
    /// flows. On by default; `icmp_echo: false` leaves echo requests to the host.
    #[serde(default = "yes")]
    pub icmp_echo: bool,
}

/// The flood guard: new flows per second on one CPU above which dsr and dnat flows are
/// forwarded by Maglev alone and nat flows get no entry (dropped). 0 turns it off.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
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

#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// Host routes in a kernel routing table of xlb's own, for BIRD or FRR to export.
    #[serde(default)]
    pub routes: Option<RoutesAnnounce>,
    /// ARP and neighbour-discovery answers for the VIPs, on these interfaces.
    #[serde(default)]
    pub l2: Option<L2Announce>,
}

#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct L2Announce {
    pub interfaces: Vec<String>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoutesAnnounce {
    pub table: u32,
}

#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: IpAddr,
    #[serde(deserialize_with = "port")]
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// `client_ip`: new flows are placed by the client address alone, so one client
    /// reaches one backend on every source port (Kubernetes' sessionAffinity: ClientIP).
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// Active health checks of this service's backends (static mode).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// This service serves packets that arrive encapsulated to this host (from another
    /// node's dsr service with `via`: this host), not clients' packets. Turns on
    /// decapsulation.
    #[serde(default)]
    pub encapsulated: bool,
    /// Only clients inside these ranges reach the service (Kubernetes'
    /// `loadBalancerSourceRanges`); the rest are dropped in XDP and counted. Empty or
    /// absent: everyone. Only the ranges of the VIP's family apply.
    #[serde(default, deserialize_with = "source_ranges")]
    pub allow: Vec<IpNet>,
}

impl ServiceConfig {
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
}

/// Parses a source range: a CIDR, or one address (a /32 or /128). Host bits are
/// cleared, as Kubernetes' own parsing does (`parse_file_source_range` refuses them).
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

/// A range in the config file: as `parse_source_range`, but one with host bits set is
/// refused. Cleared silently, a typo widens who may reach a service
/// (`::ffff:10.0.0.0/8` would admit `::/8`); an operator writing the file can fix it.
pub fn parse_file_source_range(text: &str) -> std::result::Result<IpNet, String> {
    let net = parse_source_range(text)?;
    let written: IpNet = match text.trim().parse() {
        Ok(n) => n,
        Err(_) => return Ok(net),
    };
    if written != net {
        return Err(format!(
            "{text:?} has bits set past its prefix length: did you mean {net} (the range) or {}/{} (that one address)?",
            written.addr(),
            written.max_prefix_len()
        ));
    }
    Ok(net)
}

fn source_ranges<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<IpNet>, D::Error> {
    // `allow:` with no value is the same as no allow: everyone.
    let texts = Option::<Vec<String>>::deserialize(d)?.unwrap_or_default();
    texts
        .iter()
        .enumerate()
        .map(|(k, t)| {
            parse_file_source_range(t)
                .map_err(|e| serde::de::Error::custom(format!("allow[{k}]: {e}")))
        })
        .collect()
}

/// An unhealthy backend leaves the Maglev table: no new flows. With
/// `keep_established` (the default) its established flows stay, as when draining;
/// without, it is removed and its flows are re-balanced.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to probe; default: the backend's own.
    #[serde(default, deserialize_with = "opt_port")]
    pub port: Option<u16>,
    /// HTTP path (default `/`); a 2xx or 3xx status is healthy. Only for `type: http`.
    pub path: Option<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes to become healthy, failures to become unhealthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    #[serde(default = "yes")]
    pub keep_established: bool,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
}

impl HealthCheck {
    /// The HTTP path probed.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

/// A port number, with the range in the message when it is out of it (the parser's
/// own message was "invalid u16").
fn port<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u16, D::Error> {
    let n = i64::deserialize(d)?;
    u16::try_from(n).map_err(|_| {
        serde::de::Error::custom(format!("port {n} is out of range: a port is 1 to 65535"))
    })
}

/// A backend's weight, with its range in the message (the parser's own message was
/// "invalid u32", at whatever integer or text it was given).
fn weight<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = u32;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a weight (a whole number from 0 to {})", u32::MAX)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> std::result::Result<u32, E> {
            u32::try_from(n).map_err(|_| E::custom(not_a_weight(n)))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<u32, E> {
            u32::try_from(n).map_err(|_| E::custom(not_a_weight(n)))
        }
        fn visit_i128<E: serde::de::Error>(self, n: i128) -> std::result::Result<u32, E> {
            u32::try_from(n).map_err(|_| E::custom(not_a_weight(n)))
        }
        fn visit_u128<E: serde::de::Error>(self, n: u128) -> std::result::Result<u32, E> {
            u32::try_from(n).map_err(|_| E::custom(not_a_weight(n)))
        }
        // Said here rather than as the parser's "invalid type", which points at the key.
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> std::result::Result<u32, E> {
            Err(E::custom(not_a_weight(n)))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<u32, E> {
            Err(E::custom(not_a_weight(format!("{v:?}"))))
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<u32, E> {
            Err(E::custom(not_a_weight(v)))
        }
    }
    d.deserialize_any(Visitor)
}

fn not_a_weight(n: impl std::fmt::Display) -> String {
    format!(
        "{n} is not a weight (0 to {}; 0 drains the backend)",
        u32::MAX
    )
}

fn opt_port<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<u16>, D::Error> {
    port(d).map(Some)
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn yes() -> bool {
    true
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: SocketAddr,
    #[serde(default = "one", deserialize_with = "weight")]
    pub weight: u32,
    /// Set by the health checker, never read from the file.
    #[serde(skip, default = "yes")]
    pub healthy: bool,
    /// The source address the host's routing uses towards this backend, for
    /// `snat: auto`; set by the agent (nexthop.rs), never read from the file.
    #[serde(skip)]
    pub snat: Option<IpAddr>,
    /// dsr: encapsulate to this address instead of the backend's own: the node that
    /// hosts the backend, and DNATs to it after decapsulating (its service has
    /// `encapsulated: true`).
    #[serde(default)]
    pub via: Option<IpAddr>,
    /// Reached by dnat whatever the service's mode: set by the Kubernetes translation
    /// for a dsr service's endpoints on this node; never read from the file.
    #[serde(skip)]
    pub dnat_here: bool,
}

impl BackendConfig {
    /// Where this backend's packets are sent: `via`, else the backend itself.
    pub fn target(&self) -> IpAddr {
        self.via.unwrap_or(self.address.ip())
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
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

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIp,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Source and destination rewritten: the backend sees the LB's address, and its
    /// replies come back through the LB by plain routing.
    #[default]
    Nat,
    /// Destination rewritten only: the backend sees the client's address and port. Its
    /// replies must pass a host running xlb (the LB, as the backend's route to the
    /// client) to be turned back into VIP → client.
    Dnat,
    /// The packet unchanged inside IP-in-IP (IPv4) or IPv6-in-IPv6 to the backend,
    /// which decapsulates it (`decap`, or a kernel tunnel device) and answers the
    /// client directly from the VIP. Backend port = service port.
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

/// Source addresses for SNAT and the port range, kept apart from the host's
/// ip_local_port_range (32768-60999 by default) so that replies to the host's own
/// connections are never taken for NAT replies.
///
/// An address left out, or `auto` (the default), is taken per backend from the host's
/// routing: the source address the kernel would use to reach that backend, as
/// MASQUERADE does, followed as addresses and routes change.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    /// None: `auto`.
    #[serde(default, deserialize_with = "auto_or_addr")]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default, deserialize_with = "auto_or_addr")]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default = "default_port_min", deserialize_with = "port")]
    pub port_min: u16,
    #[serde(default = "default_port_max", deserialize_with = "port")]
    pub port_max: u16,
}

impl Default for SnatConfig {
    fn default() -> Self {
        Self {
            ipv4: None,
            ipv6: None,
            port_min: default_port_min(),
            port_max: default_port_max(),
        }
    }
}

/// `snat: auto`, the same as leaving it out, or the whole table. A visitor, not an
/// untagged enum: errors inside the table keep their field and line.
fn snat_or_auto<'de, D>(d: D) -> std::result::Result<SnatConfig, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = SnatConfig;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("`auto` or a table {ipv4, ipv6, port_min, port_max}")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<SnatConfig, E> {
            if v == "auto" {
                Ok(SnatConfig::default())
            } else {
                Err(E::custom(format!(
                    "snat: {v:?} is neither `auto` nor a table {{ipv4, ipv6, port_min, port_max}}"
                )))
            }
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            map: M,
        ) -> std::result::Result<SnatConfig, M::Error> {
            SnatConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_any(Visitor)
}

/// `auto`, or an address.
fn auto_or_addr<'de, D, A>(d: D) -> std::result::Result<Option<A>, D::Error>
where
    D: serde::Deserializer<'de>,
    A: std::str::FromStr,
{
    let text = String::deserialize(d)?;
    if text == "auto" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is neither `auto` nor an address of this family"
        ))
    })
}

/// Idle timeouts in seconds, checked by the datapath on each packet.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub tcp_idle: u32,
    pub tcp_closing: u32,
    pub udp_idle: u32,
    /// A TCP flow whose handshake never completed (the client never sent an ACK).
    #[serde(default = "default_tcp_syn")]
    pub tcp_syn: u32,
    /// How often the agent sweeps expired and orphaned conntrack entries.
    #[serde(default = "default_gc_interval")]
    pub gc_interval: u32,
}

/// Shorter than the kernel conntrack's 120 s for SYN_SENT: a SYN flood's entries go
/// within a minute.
fn default_tcp_syn() -> u32 {
    60
}

fn default_gc_interval() -> u32 {
    10
}

impl Default for Config {
    /// No services, and every setting at its default.
    fn default() -> Self {
        Config {
            services: Vec::new(),
            snat: SnatConfig::default(),
            maglev_table_size: default_table_size(),
            timeouts: Timeouts::default(),
            decap: false,
            announce: Announce::default(),
            flood_guard: FloodGuard::default(),
            icmp_echo: true,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_idle: 3600,
            tcp_closing: 10,
            tcp_syn: default_tcp_syn(),
            udp_idle: 60,
            gc_interval: default_gc_interval(),
        }
    }
}

fn default_table_size() -> u32 {
    maglev::DEFAULT_TABLE_SIZE
}
fn one() -> u32 {
    1
}
fn default_port_min() -> u16 {
    20000
}
fn default_port_max() -> u16 {
    32767
}

/// The largest config file read unless --max-config-bytes says otherwise: a static
/// config of 1,000 services of 100 backends is about 6 MB.
pub const DEFAULT_MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// The parser's limits against YAML bombs, raised for large static configs: the
/// defaults (250,000 nodes) stop at about 80,000 backends, three nodes each. These
/// allow about a million; aliases and depth keep their default limits.
fn parse_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: 4_000_000,
            max_events: 8_000_000,
        },
    }
}

/// The bytes of the config file at `path`, as every reader takes them (start, SIGHUP,
/// the watcher, check-config): at most `max_bytes`, of a regular file only, and never
/// blocking. The path is checked before it is opened, so a device or a FIFO is never
/// opened; it is opened with O_NONBLOCK and checked again through the open descriptor,
/// which is the one read, so a path swapped in between is caught too.
pub fn read_limited(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let check = |meta: &std::fs::Metadata| -> Result<()> {
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        if meta.len() > max_bytes {
            bail!(
                "{}: {} bytes, more than the limit of {max_bytes} (--max-config-bytes raises it)",
                path.display(),
                meta.len()
            );
        }
        Ok(())
    };
    let cannot = || format!("{}: cannot read", path.display());
    check(&std::fs::metadata(path).with_context(cannot)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(cannot)?;
    check(&file.metadata().with_context(cannot)?)?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    if bytes.len() as u64 > max_bytes {
        bail!(
            "{}: grew past the limit of {max_bytes} bytes while being read",
            path.display()
        );
    }
    Ok(bytes)
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_limited(path, DEFAULT_MAX_CONFIG_BYTES)
    }

    /// Reads at most `max_bytes` of a regular file: a config path pointed at a device
    /// or a pipe (`/dev/zero`) must fail, not grow without end.
    pub fn load_limited(path: &Path, max_bytes: u64) -> Result<Self> {
        let bytes = read_limited(path, max_bytes)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{}: cannot read (is it UTF-8 text?)", path.display()))?;
        Self::parse_named(&text, Some(&path.display().to_string()))
            .with_context(|| format!("{}: invalid config", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        Self::parse_named(text, None)
    }

    /// Parses `text`, read from the file `source` if given (named in the snippet of a
    /// parse error).
    pub fn parse_named(text: &str, source: Option<&str>) -> Result<Self> {
        let cfg: Config = serde_saphyr::from_str_with_options(text, parse_options())
            .map_err(|e| anyhow::anyhow!("{}", describe_parse_error(&e, text, source)))?;
        // Where things are, for the messages of the checks below (the types already
        // parsed, so this cannot fail on anything the typed parse accepted).
        let located: Option<Located> =
            serde_saphyr::from_str_with_options(text, parse_options()).ok();
        cfg.validate_located(located.as_ref())?;
        Ok(cfg)
    }

    /// Checks what the types cannot: uniqueness, families, ranges, map capacities.
    pub fn validate(&self) -> Result<()> {
        self.validate_located(None)
    }

    fn validate_located(&self, located: Option<&Located>) -> Result<()> {
        // "line N: " of a service's field, or of its backend's address, when known.
        let svc_line = |i: usize, field: &str| -> String {
            located
                .and_then(|l| l.services.get(i))
                .and_then(|s| match field {
                    "port" => s.port.as_ref(),
                    "vip" => s.vip.as_ref(),
                    "health_check" => s.health_check.as_ref(),
                    "allow" => s.allow.as_ref(),
                    _ => s.name.as_ref(),
                })
                .map(|sp| format!("line {}: ", sp.referenced.line()))
                .unwrap_or_default()
        };
        let be_line = |i: usize, j: usize| -> String {
            located
                .and_then(|l| l.services.get(i))
                .and_then(|s| s.backends.get(j))
                .and_then(|b| b.address.as_ref())
                .map(|sp| format!("line {}: ", sp.referenced.line()))
                .unwrap_or_default()
        };
        let top_line = |field: &str| -> String {
            located
                .and_then(|l| match field {
                    "snat" => l.snat.as_ref(),
                    "timeouts" => l.timeouts.as_ref(),
                    _ => l.maglev_table_size.as_ref(),
                })
                .map(|sp| format!("line {}: ", sp.referenced.line()))
                .unwrap_or_default()
        };
        if let Some(r) = self.announce.routes {
            if r.table == 0 || (253..=255).contains(&r.table) {
                bail!(
                    "field announce.routes.table: {} is one of the kernel's own tables (unspec, default, main, local); pick another, e.g. 200",
                    r.table
                );
            }
        }
        let m = self.maglev_table_size;
        maglev::validate_table_size(m)
            .with_context(|| format!("{}field maglev_table_size", top_line("maglev_table_size")))?;
        if m as usize > MAGLEV_MAX_TABLE_SIZE {
            bail!("field maglev_table_size: {m} is larger than the datapath holds ({MAGLEV_MAX_TABLE_SIZE})");
        }
        if self.timeouts.gc_interval == 0 {
            bail!(
                "{}field timeouts.gc_interval: 0 seconds; at least 1",
                top_line("timeouts")
            );
        }
        if self.snat.port_min == 0 || self.snat.port_min > self.snat.port_max {
            bail!(
                "{}field snat: port range {}-{} is empty or starts at 0",
                top_line("snat"),
                self.snat.port_min,
                self.snat.port_max
            );
        }
        let snat_addrs: Vec<IpAddr> = [
            self.snat.ipv4.map(IpAddr::from),
            self.snat.ipv6.map(IpAddr::from),
        ]
        .into_iter()
        .flatten()
        .collect();
        for a in &snat_addrs {
            if let Some(why) = not_unicast(*a) {
                bail!(
                    "{}field snat: {a} is {why}, not an address packets can come from",
                    top_line("snat")
                );
            }
        }
        let mut seen = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", s.name);
            let named = format!("{}{at}", svc_line(i, "name"));
            if s.name.trim().is_empty() {
                bail!("{named}: field name: empty; every service needs a name (it labels its metrics)");
            }
            if let Some(why) = not_unicast(s.vip) {
                bail!(
                    "{}{at}: field vip: {} is {why}, not an address clients can send to",
                    svc_line(i, "vip"),
                    s.vip
                );
            }
            if snat_addrs.contains(&s.vip) {
                bail!(
                    "{}{at}: field vip: {} is also the SNAT address: replies to the LB itself would be taken for the service",
                    svc_line(i, "vip"),
                    s.vip
                );
            }
            if !names.insert(&s.name) {
                bail!("{named}: field name: duplicate service name {:?}", s.name);
            }
            if s.encapsulated && s.mode == Mode::Dsr {
                bail!("{named}: encapsulated: true serves packets already decapsulated here; give it mode nat or dnat");
            }
            if !seen.insert((s.vip, s.port, s.protocol, s.encapsulated)) {
                bail!(
                    "{named}: duplicate service {}:{}/{}",
                    s.vip,
                    s.port,
                    format!("{:?}", s.protocol).to_lowercase()
                );
            }
            if s.port == 0 {
                bail!(
                    "{}{at}: field port: port 0 is not a service port",
                    svc_line(i, "port")
                );
            }
            if s.source_ranges().is_some_and(|r| r.is_empty()) {
                bail!(
                    "{}{at}: field allow: no {} range for the {} VIP {}, so no client could reach it; add one ({} admits every {} client)",
                    svc_line(i, "allow"),
                    family(s.vip),
                    family(s.vip),
                    s.vip,
                    if s.vip.is_ipv4() { "0.0.0.0/0" } else { "::/0" },
                    family(s.vip)
                );
            }
            let mut addrs = BTreeSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                if let Some(via) = b.via {
                    if s.mode != Mode::Dsr {
                        bail!(
                            "{}{at}: backends[{j}].via: only mode dsr encapsulates; mode {} sends to the backend itself",
                            be_line(i, j),
                            s.mode.name()
                        );
                    }
                    if via.is_ipv4() != s.vip.is_ipv4() {
                        bail!(
                            "{}{at}: backends[{j}].via: {via} is {} but the VIP {} is {}",
                            be_line(i, j),
                            family(via),
                            s.vip,
                            family(s.vip)
                        );
                    }
                    if let Some(why) = not_unicast(via) {
                        bail!("{}{at}: backends[{j}].via: {via} is {why}", be_line(i, j));
                    }
                }
                if s.mode == Mode::Dsr
                    && b.via.is_none()
                    && !b.dnat_here
                    && b.address.port() != s.port
                {
                    bail!(
                        "{}{at}: backends[{j}].address: port {} differs from the service's port {}; mode dsr sends the client's packet unchanged, so the backend must listen on the service's port",
                        be_line(i, j),
                        b.address.port(),
                        s.port
                    );
                }
                if b.address.is_ipv4() != s.vip.is_ipv4() {
                    bail!(
                        "{}{at}: backends[{j}].address: {} is {} but the VIP {} is {}",
                        be_line(i, j),
                        b.address,
                        family(b.address.ip()),
                        s.vip,
                        family(s.vip)
                    );
                }
                if b.address.port() == 0 {
                    bail!(
                        "{}{at}: backends[{j}].address: port 0 is not a backend port",
                        be_line(i, j)
                    );
                }
                if b.address.ip() == s.vip && b.address.port() == s.port {
                    bail!(
                        "{}{at}: backends[{j}].address: {} is the service's own VIP and port: its packets would come back to the service",
                        be_line(i, j),
                        b.address
                    );
                }
                if !addrs.insert(b.address) {
                    bail!(
                        "{}{at}: backends[{j}].address: duplicate backend {}",
                        be_line(i, j),
                        b.address
                    );
                }
            }
            if let Some(hc) = &s.health_check {
                let at = format!("{}{at}", svc_line(i, "health_check"));
                if hc.interval_ms < 100 || hc.timeout_ms == 0 || hc.timeout_ms > hc.interval_ms {
                    bail!("{at}: field health_check: need interval_ms ≥ 100 and 0 < timeout_ms ≤ interval_ms");
                }
                if hc.rise == 0 || hc.fall == 0 {
                    bail!("{at}: field health_check: rise and fall must be at least 1");
                }
                if hc.port == Some(0) {
                    bail!("{at}: field health_check.port: port 0 cannot be probed");
                }
                match (&hc.path, hc.kind) {
                    (Some(p), CheckKind::Http) if !p.starts_with('/') => bail!(
                        "{at}: field health_check.path: {p:?} must start with /"
                    ),
                    (Some(p), CheckKind::Tcp) => bail!(
                        "{at}: field health_check.path: {p:?} given for a tcp check, which sends no request (type: http for an HTTP check)"
                    ),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Whether the maps can hold this config: the service and backend maps' sizes are
    /// set when they are created (`--max-services`, `--max-backends`).
    pub fn check_capacity(&self, max_services: u32, max_backends: u32) -> Result<()> {
        if self.services.len() > max_services as usize {
            bail!(
                "field services: {} services, the maps hold {max_services} (--max-services)",
                self.services.len()
            );
        }
        let total_backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if total_backends > max_backends as usize {
            bail!("field services: {total_backends} backends in all, the maps hold {max_backends} (--max-backends)");
        }
        let total_ranges: usize = self.services.iter().map(|s| s.allow.len()).sum();
        if total_ranges > SOURCE_RANGES_MAX as usize {
            bail!("field services: {total_ranges} source ranges (allow) in all, the datapath holds {SOURCE_RANGES_MAX}");
        }
        Ok(())
    }
}

/// The same document, keeping only where things are (for error messages).
#[derive(Deserialize)]
struct Located {
    #[serde(default)]
    services: Vec<LocatedService>,
    snat: Here,
    timeouts: Here,
    maglev_table_size: Here,
    decap: Here,
    announce: Here,
    flood_guard: Here,
}

type Here = Option<serde_saphyr::Spanned<serde::de::IgnoredAny>>;

#[derive(Deserialize)]
struct LocatedService {
    name: Here,
    vip: Here,
    port: Here,
    protocol: Here,
    mode: Here,
    session_affinity: Here,
    health_check: Here,
    encapsulated: Here,
    allow: Here,
    #[serde(default)]
    backends: Vec<LocatedBackend>,
}

#[derive(Deserialize)]
struct LocatedBackend {
    address: Here,
    weight: Here,
    via: Here,
}

impl Located {
    /// The path of the field whose value is at `at` ("services[0].backends[1].weight").
    fn field_at(&self, at: &serde_saphyr::Location) -> Option<String> {
        let is_at = |h: &Here| {
            h.as_ref().is_some_and(|sp| {
                sp.referenced.line() == at.line() && sp.referenced.column() == at.column()
            })
        };
        let top = [
            ("snat", &self.snat),
            ("timeouts", &self.timeouts),
            ("maglev_table_size", &self.maglev_table_size),
            ("decap", &self.decap),
            ("announce", &self.announce),
            ("flood_guard", &self.flood_guard),
        ];
        if let Some((name, _)) = top.iter().find(|(_, h)| is_at(h)) {
            return Some((*name).to_owned());
        }
        for (i, s) in self.services.iter().enumerate() {
            let fields = [
                ("name", &s.name),
                ("vip", &s.vip),
                ("port", &s.port),
                ("protocol", &s.protocol),
                ("mode", &s.mode),
                ("session_affinity", &s.session_affinity),
                ("health_check", &s.health_check),
                ("encapsulated", &s.encapsulated),
                ("allow", &s.allow),
            ];
            if let Some((name, _)) = fields.iter().find(|(_, h)| is_at(h)) {
                return Some(format!("services[{i}].{name}"));
            }
            for (j, b) in s.backends.iter().enumerate() {
                let fields = [
                    ("address", &b.address),
                    ("weight", &b.weight),
                    ("via", &b.via),
                ];
                if let Some((name, _)) = fields.iter().find(|(_, h)| is_at(h)) {
                    return Some(format!("services[{i}].backends[{j}].{name}"));
                }
            }
        }
        None
    }
}

/// A parse error as one location: "line L column C: FIELD: MESSAGE", then the line
/// with a caret under the value, headed "--> SOURCE:L:C" (the parser's own snippet
/// said `<input>`, and its header gave the column within its cropped window, not the
/// line's).
fn describe_parse_error(e: &serde_saphyr::Error, text: &str, source: Option<&str>) -> String {
    use serde_saphyr::MessageFormatter;
    let mut inner = e;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    let msg = clean(&serde_saphyr::DefaultMessageFormatter.format_message(inner));
    let Some(at) = e.location().filter(|l| l.line() > 0 && l.column() > 0) else {
        return msg;
    };
    let (line, col) = (at.line(), at.column());
    // Which field, when the value it points at is one the located parse knows.
    let field = serde_saphyr::from_str_with_options::<Located>(text, parse_options())
        .ok()
        .and_then(|l| l.field_at(&at));
    let head = match field {
        // The message may already name the field ("port 70000 is out of range").
        Some(f) => format!("line {line} column {col}: {f}: {msg}"),
        None => format!("line {line} column {col}: {msg}"),
    };
    let Some(src_line) = text.lines().nth(line as usize - 1) else {
        return head;
    };
    // A window of the line around the column, so a long (flow-style) line stays
    // readable; columns count characters, as the parser's do.
    let chars: Vec<char> = src_line.chars().collect();
    let c = (col as usize - 1).min(chars.len());
    let from = c.saturating_sub(60);
    let to = (c + 40).min(chars.len());
    let mut shown: String = clean(&chars[from..to].iter().collect::<String>());
    let mut caret_at = c - from;
    if from > 0 {
        shown.insert(0, '…');
        caret_at += 1;
    }
    if to < chars.len() {
        shown.push('…');
    }
    let width = (at.span().len() as usize).clamp(1, (to - c).max(1));
    let gutter = " ".repeat(line.to_string().len());
    let source = clean(source.unwrap_or("(config text)"));
    format!(
        "{head}\n{gutter}--> {source}:{line}:{col}\n{gutter} |\n{line} | {shown}\n{gutter} | {}{}",
        " ".repeat(caret_at),
        "^".repeat(width)
    )
}

/// Text from the file or the parser, safe for a terminal or a log: control characters
/// (other than tabs, shown as spaces to keep the caret aligned) are replaced.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// Why an address cannot be a VIP or a source, if it cannot.
fn not_unicast(a: IpAddr) -> Option<&'static str> {
    if a.is_unspecified() {
        return Some("the unspecified address");
    }
    if a.is_multicast() {
        return Some("a multicast address");
    }
    if a.is_loopback() {
        return Some("a loopback address");
    }
    match a {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        _ => None,
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
snat:
  ipv4: 10.0.0.1
services:
  - name: web
    vip: 192.0.2.10
    port: 80
    protocol: tcp
    backends:
      - address: 198.51.100.2:8080
        weight: 2
      - address: 198.51.100.3:8080
";

    #[test]
    fn parses_the_documented_shape() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.services[0].backends[0].weight, 2);
        assert_eq!(c.services[0].backends[1].weight, 1);
        assert_eq!(c.services[0].mode, Mode::Nat);
        assert_eq!(c.maglev_table_size, 16381);
    }

    #[test]
    fn the_example_in_deploy_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/xlb.example.yaml");
        let c = Config::load(Path::new(path)).unwrap();
        assert_eq!(c.services.len(), 3);
        assert_eq!(c.services[0].backends[2].weight, 0);
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_are_specific() {
        let e = err(&GOOD.replace("protocol: tcp", "protocol: sctp"));
        assert!(e.contains("sctp") && e.contains("line"), "{e}");
        let e = err(&GOOD.replace("198.51.100.3:8080", "198.51.100.3"));
        assert!(e.contains("line"), "{e}");
        let e = err(&GOOD.replace("198.51.100.3:8080", "\"[2001:db8::1]:80\""));
        assert!(
            e.contains("backends[1].address") && e.contains("IPv6"),
            "{e}"
        );
        let e = err(&GOOD.replace("port: 80", "port: 0"));
        assert!(e.contains("field port"), "{e}");
        let e = err(&format!("maglev_table_size: 1000\n{GOOD}"));
        assert!(
            e.contains("maglev_table_size") && e.contains("not prime"),
            "{e}"
        );
        let e = err(&GOOD.replace("198.51.100.3:8080", "198.51.100.2:8080"));
        assert!(e.contains("duplicate backend"), "{e}");
        let e = err(&GOOD.replace("ipv4: 10.0.0.1", "ipv4: 10.0.0.x"));
        assert!(e.contains("neither `auto` nor an address"), "{e}");
    }

    /// Each accepted-before piece of nonsense now gets a specific message with a line.
    #[test]
    fn nonsense_is_rejected_with_field_and_line() {
        let cases: &[(&str, &str, &str)] = &[
            ("vip: 192.0.2.10", "vip: 0.0.0.0", "unspecified"),
            ("vip: 192.0.2.10", "vip: 224.0.0.5", "multicast"),
            ("vip: 192.0.2.10", "vip: 255.255.255.255", "broadcast"),
            ("vip: 192.0.2.10", "vip: 10.0.0.1", "also the SNAT address"),
            ("ipv4: 10.0.0.1", "ipv4: 239.1.1.1", "multicast"),
            ("ipv4: 10.0.0.1", "ipv4: 0.0.0.0", "unspecified"),
            ("name: web", "name: \"\"", "field name: empty"),
            ("port: 80", "port: 70000", "port 70000 is out of range"),
            (
                "    backends:",
                "    health_check: {type: tcp, path: /healthz}\n    backends:",
                "given for a tcp check",
            ),
        ];
        for (from, to, want) in cases {
            let e = err(&GOOD.replacen(from, to, 1));
            assert!(e.contains(want), "{to}: {e}");
            assert!(e.contains("line "), "{to}: no line in {e}");
            assert!(!e.contains("error: "), "{to}: {e}");
        }
        let e = err(&format!("maglev_table_size: 131071\n{GOOD}"));
        assert!(
            e.contains("line 1") && e.contains("maglev_table_size"),
            "{e}"
        );
        let e = err(&format!(
            "timeouts: {{tcp_idle: 1, tcp_closing: 1, udp_idle: 1, gc_interval: 0}}\n{GOOD}"
        ));
        assert!(e.contains("line 1") && e.contains("gc_interval"), "{e}");
    }

    #[test]
    fn snat_auto_is_the_default_and_can_be_said() {
        let plain = GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "");
        assert_eq!(Config::parse(&plain).unwrap().snat, SnatConfig::default());
        let said = GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "snat: auto\n");
        assert_eq!(Config::parse(&said).unwrap().snat, SnatConfig::default());
        let v4 = GOOD.replace("ipv4: 10.0.0.1", "ipv4: auto");
        assert_eq!(Config::parse(&v4).unwrap().snat.ipv4, None);
        let e = err(&GOOD.replace("snat:\n  ipv4: 10.0.0.1\n", "snat: masquerade\n"));
        assert!(e.contains("neither `auto` nor a table"), "{e}");
    }

    #[test]
    fn a_backend_at_its_own_services_vip_and_port_is_rejected() {
        let e = err(&GOOD.replace("198.51.100.2:8080", "192.0.2.10:80"));
        assert!(
            e.contains("backends[0].address")
                && e.contains("192.0.2.10:80")
                && e.contains("own VIP and port"),
            "{e}"
        );
        let line = GOOD
            .lines()
            .position(|l| l.contains("198.51.100.2:8080"))
            .unwrap()
            + 1;
        assert!(e.contains(&format!("line {line}:")), "{e}");
        // The VIP on another port is a backend like any other.
        Config::parse(&GOOD.replace("198.51.100.2:8080", "192.0.2.10:8080")).unwrap();
    }

    #[test]
    fn a_fifo_is_rejected_without_blocking() {
        let fifo = std::env::temp_dir().join(format!("xlb-fifo-{}.yaml", std::process::id()));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer ever comes: a blocking open would never return.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(format!("{:#}", Config::load(&path).unwrap_err()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(5));
        std::fs::remove_file(&fifo).ok();
        let e = got.expect("reading a FIFO blocked");
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn config_reads_are_bounded_and_regular_files_only() {
        let e = format!("{:#}", Config::load(Path::new("/dev/zero")).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
        let dir = std::env::temp_dir().join(format!("xlb-big-{}.yaml", std::process::id()));
        std::fs::write(&dir, GOOD).unwrap();
        let e = format!("{:#}", Config::load_limited(&dir, 10).unwrap_err());
        std::fs::remove_file(&dir).ok();
        assert!(
            e.contains("more than the limit of 10") && e.contains("--max-config-bytes"),
            "{e}"
        );
    }

    #[test]
    fn allow_is_validated_with_its_line_and_field() {
        let base =
            "services:\n  - name: web\n    vip: 192.0.2.10\n    port: 80\n    protocol: tcp\n";
        let ok = Config::parse(&format!(
            "{base}    allow: [10.0.0.0/8, \"2001:db8::/32\", 192.0.2.7]\n"
        ))
        .unwrap();
        let nets: Vec<String> = ok.services[0]
            .allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]);
        assert_eq!(
            ok.services[0].source_ranges().unwrap().len(),
            2,
            "only IPv4 ranges for an IPv4 VIP"
        );
        let e = format!(
            "{:#}",
            Config::parse(&format!("{base}    allow: [10.0.0.0/33]\n")).unwrap_err()
        );
        assert!(
            e.contains("allow[0]") && e.contains("10.0.0.0/33") && e.contains("line 6"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::parse(&format!("{base}    allow: [\"2001:db8::/32\"]\n")).unwrap_err()
        );
        assert!(
            e.contains("field allow") && e.contains("no IPv4 range"),
            "{e}"
        );
        let open = Config::parse(&format!("{base}    allow: []\n")).unwrap();
        assert!(
            open.services[0].source_ranges().is_none(),
            "an empty list admits everyone"
        );
    }

    /// The caret's column in a rendered snippet, under the shown line's text, as the
    /// column of that text in the source line (the shown line may be cropped with "…").
    fn caret_under(e: &str, line: usize) -> String {
        let lines: Vec<&str> = e.lines().collect();
        let shown = lines
            .iter()
            .position(|l| l.starts_with(&format!("{line} | ")))
            .unwrap_or_else(|| panic!("no line {line} shown in {e}"));
        let text: Vec<char> = lines[shown].chars().collect();
        let caret: Vec<char> = lines[shown + 1].chars().collect();
        let at = caret
            .iter()
            .position(|&c| c == '^')
            .unwrap_or_else(|| panic!("no caret in {e}"));
        let len = caret[at..].iter().take_while(|&&c| c == '^').count();
        text[at..at + len].iter().collect()
    }

    #[test]
    fn parse_errors_name_the_file_and_the_field_at_the_value() {
        let flow = "services:\n  - {name: web, vip: 192.0.2.10, port: 80, protocol: tcp, backends: [{address: \"198.51.100.2:8080\", weight: -1}]}\n";
        let col = flow.lines().nth(1).unwrap().find("-1").unwrap() + 1;
        let block = GOOD.replace("weight: 2", "weight: -1");
        let bline = block
            .lines()
            .position(|l| l.contains("weight: -1"))
            .unwrap()
            + 1;
        let bcol = block.lines().nth(bline - 1).unwrap().find("-1").unwrap() + 1;
        for (text, line, col) in [(flow.to_owned(), 2, col), (block, bline, bcol)] {
            let path =
                std::env::temp_dir().join(format!("xlb-weight-{}-{line}.yaml", std::process::id()));
            std::fs::write(&path, &text).unwrap();
            let e = format!("{:#}", Config::load(&path).unwrap_err());
            std::fs::remove_file(&path).ok();
            // One location, said the same way in the message and in the snippet's header.
            assert!(
                e.contains(&format!("line {line} column {col}: ")),
                "{col}: {e}"
            );
            assert!(
                e.contains(&format!("--> {}:{line}:{col}\n", path.display())),
                "{e}"
            );
            assert!(!e.contains("<input>"), "{e}");
            assert!(
                e.contains("services[0].backends[0].weight: -1 is not a weight (0 to 4294967295"),
                "{e}"
            );
            assert_eq!(caret_under(&e, line), "-1", "{e}");
        }
        // Other values that are not weights, at the value too.
        for (bad, shown) in [
            ("abc", "\"abc\""),
            ("1.5", "1.5"),
            ("4294967296", "4294967296"),
        ] {
            let e = err(&GOOD.replace("weight: 2", &format!("weight: {bad}")));
            assert!(
                e.contains(&format!(
                    "services[0].backends[0].weight: {shown} is not a weight"
                )),
                "{e}"
            );
            assert_eq!(caret_under(&e, 11), bad, "{e}");
            assert!(e.contains("--> (config text):11:17"), "{e}");
        }
        // Other fields are named where the value is the error's location.
        let e = err(&GOOD.replace("port: 80", "port: 70000"));
        assert!(
            e.contains("services[0].port: port 70000 is out of range"),
            "{e}"
        );
        assert_eq!(caret_under(&e, 7), "70000", "{e}");
        // A weight that is one is still one.
        let ok = Config::parse(&GOOD.replace("weight: 2", "weight: 4294967295")).unwrap();
        assert_eq!(ok.services[0].backends[0].weight, u32::MAX);
    }

    #[test]
    fn parse_error_snippets_are_clean_and_cropped() {
        // A long flow line: the window around the column, with the caret still under
        // the value; control characters from the file never reach the terminal.
        let pad = "x".repeat(300);
        let text = format!(
            "services:\n  - {{name: \"{pad}\", vip: 192.0.2.10, port: 80, protocol: tcp, backends: [{{address: \"198.51.100.2:8080\", weight: -7}}], comment: \"{pad}\"}}\n"
        );
        let e = err(&text);
        assert!(e.contains("weight: -7 is not a weight"), "{e}");
        assert_eq!(caret_under(&e, 2), "-7", "{e}");
        let shown = e.lines().find(|l| l.starts_with("2 | ")).unwrap();
        assert!(
            shown.starts_with("2 | …") && shown.ends_with('…'),
            "{shown}"
        );
        assert!(shown.chars().count() < 120, "{shown}");
        let e = err("services: [\u{7}\n");
        assert!(e.contains("1 | services: [\u{fffd}"), "{e:?}");
        assert!(!e.chars().any(|c| c.is_control() && c != '\n'), "{e:?}");
    }
}
