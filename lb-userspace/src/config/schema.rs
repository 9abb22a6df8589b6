//! The config file's schema: what a file may say, with serde. It builds the model's
//! types (`crate::model`), which hold no serde of their own: the types of the model
//! that the file names directly are described here for serde (`#[serde(remote)]`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::model::{
    self, parse_source_range, CheckKind, FloodGuard, HealthCheck, Mode, Protocol, SessionAffinity,
    Snat, Timeouts,
};

#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Static services. With `--kubernetes` the file may hold none: it then only sets
    /// SNAT, timeouts and the table size, and the services come from the API.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// `snat: auto` (the default) or `snat: {ipv4, ipv6, port_min, port_max}`.
    #[serde(default, deserialize_with = "snat_or_auto")]
    pub snat: Snat,
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u32,
    #[serde(default, with = "TimeoutsDef")]
    pub timeouts: Timeouts,
    /// Decapsulate IP-in-IP and IPv6-in-IPv6 packets addressed to this host in XDP and
    /// pass the inner packet to the kernel: the backend's side of `mode: dsr`.
    #[serde(default, deserialize_with = "boolean")]
    pub decap: bool,
    /// How this node announces the VIPs it can serve (docs/announce.md).
    #[serde(default)]
    pub announce: Announce,
    /// Above a rate of new flows, stop making conntrack entries (docs/robustness.md).
    #[serde(default, with = "FloodGuardDef")]
    pub flood_guard: FloodGuard,
    /// Answer ICMP echo (ping) to a VIP from XDP while one of its services can take new
    /// flows. On by default; `icmp_echo: false` leaves echo requests to the host.
    #[serde(default = "yes", deserialize_with = "boolean")]
    pub icmp_echo: bool,
}

impl Default for Config {
    /// No services, and every setting at its default.
    fn default() -> Self {
        let s = model::Settings::default();
        Config {
            services: Vec::new(),
            snat: s.snat,
            maglev_table_size: s.maglev_table_size,
            timeouts: s.timeouts,
            decap: s.decap,
            announce: Announce::default(),
            flood_guard: s.flood_guard,
            icmp_echo: s.icmp_echo,
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
    #[serde(with = "ProtocolDef")]
    pub protocol: Protocol,
    #[serde(default, with = "ModeDef")]
    pub mode: Mode,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// `client_ip`: new flows are placed by the client address alone, so one client
    /// reaches one backend on every source port (Kubernetes' sessionAffinity: ClientIP).
    #[serde(default, with = "SessionAffinityDef")]
    pub session_affinity: SessionAffinity,
    /// Active health checks of this service's backends (static mode).
    #[serde(default, deserialize_with = "health_check")]
    pub health_check: Option<HealthCheck>,
    /// This service serves packets that arrive encapsulated to this host (from another
    /// node's dsr service with `via`: this host), not clients' packets. Turns on
    /// decapsulation.
    #[serde(default, deserialize_with = "boolean")]
    pub encapsulated: bool,
    /// Only clients inside these ranges reach the service (Kubernetes'
    /// `loadBalancerSourceRanges`); the rest are dropped in XDP and counted. Empty or
    /// absent: everyone. Only the ranges of the VIP's family apply.
    #[serde(default, deserialize_with = "source_ranges")]
    pub allow: Vec<IpNet>,
    /// `false` (dsr and dnat only): new flows write no conntrack entry and every
    /// packet is balanced by Maglev alone, Katran's LRU bypass: for services such as
    /// DNS over UDP, whose flows need not stay on a backend when the backend set
    /// changes. dnat still writes the entry its replies are translated by. Refused on a
    /// nat service: its replies come back to a SNAT port only the flow's entry maps.
    #[serde(default = "yes", deserialize_with = "boolean")]
    pub conntrack: bool,
}

impl ServiceConfig {
    /// The service as the model has it: nothing resolved yet.
    pub fn to_model(&self) -> model::Service {
        model::Service {
            name: self.name.clone(),
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
            mode: self.mode,
            backends: self
                .backends
                .iter()
                .map(|b| model::Backend::new(b.address, b.weight, b.via))
                .collect(),
            session_affinity: self.session_affinity,
            health_check: self.health_check.clone(),
            encapsulated: self.encapsulated,
            allow: self.allow.clone(),
            conntrack: self.conntrack,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: SocketAddr,
    #[serde(default = "one", deserialize_with = "weight")]
    pub weight: u32,
    /// dsr: encapsulate to this address instead of the backend's own: the node that
    /// hosts the backend, and DNATs to it after decapsulating (its service has
    /// `encapsulated: true`).
    #[serde(default)]
    pub via: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(remote = "Protocol", rename_all = "lowercase")]
enum ProtocolDef {
    Tcp,
    Udp,
}

#[derive(Deserialize)]
#[serde(remote = "SessionAffinity", rename_all = "snake_case")]
enum SessionAffinityDef {
    None,
    ClientIp,
}

#[derive(Deserialize)]
#[serde(remote = "Mode", rename_all = "lowercase")]
enum ModeDef {
    Nat,
    Dnat,
    Dsr,
}

#[derive(Deserialize)]
#[serde(remote = "CheckKind", rename_all = "lowercase")]
enum CheckKindDef {
    Tcp,
    Http,
}

/// An unhealthy backend leaves the Maglev table: no new flows. With
/// `keep_established` (the default) its established flows stay, as when draining;
/// without, it is removed and its flows are re-balanced.
#[derive(Deserialize)]
#[serde(remote = "HealthCheck", deny_unknown_fields)]
struct HealthCheckDef {
    #[serde(rename = "type", with = "CheckKindDef")]
    kind: CheckKind,
    /// Port to probe; default: the backend's own.
    #[serde(default, deserialize_with = "opt_port")]
    port: Option<u16>,
    /// HTTP path (default `/`); a 2xx or 3xx status is healthy. Only for `type: http`.
    path: Option<String>,
    #[serde(default = "default_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    /// Consecutive successes to become healthy, failures to become unhealthy.
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
    #[serde(default = "yes", deserialize_with = "boolean")]
    keep_established: bool,
}

fn health_check<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<HealthCheck>, D::Error> {
    #[derive(Deserialize)]
    struct Checked(#[serde(with = "HealthCheckDef")] HealthCheck);
    Ok(Option::<Checked>::deserialize(d)?.map(|Checked(h)| h))
}

/// Source addresses for SNAT and the port range, kept apart from the host's
/// ip_local_port_range (32768-60999 by default) so that replies to the host's own
/// connections are never taken for NAT replies.
///
/// An address left out, or `auto` (the default), is taken per backend from the host's
/// routing: the source address the kernel would use to reach that backend, as
/// MASQUERADE does, followed as addresses and routes change.
#[derive(Deserialize)]
#[serde(remote = "Snat", deny_unknown_fields)]
struct SnatDef {
    /// None: `auto`.
    #[serde(default, deserialize_with = "auto_or_addr")]
    ipv4: Option<Ipv4Addr>,
    #[serde(default, deserialize_with = "auto_or_addr")]
    ipv6: Option<Ipv6Addr>,
    #[serde(default = "default_port_min", deserialize_with = "port")]
    port_min: u16,
    #[serde(default = "default_port_max", deserialize_with = "port")]
    port_max: u16,
}

/// Idle timeouts in seconds, checked by the datapath on each packet.
#[derive(Deserialize)]
#[serde(remote = "Timeouts", deny_unknown_fields)]
struct TimeoutsDef {
    tcp_idle: u32,
    tcp_closing: u32,
    udp_idle: u32,
    /// A TCP flow whose handshake never completed (the client never sent an ACK).
    #[serde(default = "default_tcp_syn")]
    tcp_syn: u32,
    /// How often the agent sweeps expired and orphaned conntrack entries.
    #[serde(default = "default_gc_interval")]
    gc_interval: u32,
}

/// The flood guard: new flows per second on one CPU above which dsr and dnat flows are
/// forwarded by Maglev alone and nat flows get no entry (dropped). 0 turns it off.
#[derive(Deserialize)]
#[serde(remote = "FloodGuard", deny_unknown_fields)]
struct FloodGuardDef {
    new_flows_per_cpu: u32,
}

fn default_tcp_syn() -> u32 {
    Timeouts::default().tcp_syn
}
fn default_gc_interval() -> u32 {
    Timeouts::default().gc_interval
}
fn default_table_size() -> u32 {
    crate::maglev::DEFAULT_TABLE_SIZE
}
fn default_port_min() -> u16 {
    Snat::default().port_min
}
fn default_port_max() -> u16 {
    Snat::default().port_max
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
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

/// A boolean: `true` or `false` (and what the parser itself reads as one unquoted:
/// YAML 1.1's `yes`, `no`, `on`, `off`, `y`, `n` in any case, or a `!!bool` tag). A
/// quoted value is a string in every YAML version, so `conntrack: "no"` is refused here
/// rather than read as false: the parser's own boolean would take it.
fn boolean<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<bool, E> {
            Err(E::custom(not_a_boolean(format!("the string {v:?}"))))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> std::result::Result<bool, E> {
            Err(E::custom(not_a_boolean(n)))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<bool, E> {
            Err(E::custom(not_a_boolean(n)))
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> std::result::Result<bool, E> {
            Err(E::custom(not_a_boolean(n)))
        }
        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<bool, E> {
            Err(E::custom(not_a_boolean(
                "null (leave the field out for its default)",
            )))
        }
        fn visit_none<E: serde::de::Error>(self) -> std::result::Result<bool, E> {
            self.visit_unit()
        }
    }
    d.deserialize_any(Visitor)
}

fn not_a_boolean(v: impl std::fmt::Display) -> String {
    format!("{v} is not a boolean: write true or false, unquoted")
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

/// `snat: auto`, the same as leaving it out, or the whole table. A visitor, not an
/// untagged enum: errors inside the table keep their field and line.
fn snat_or_auto<'de, D>(d: D) -> std::result::Result<Snat, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Snat;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("`auto` or a table {ipv4, ipv6, port_min, port_max}")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Snat, E> {
            if v == "auto" {
                Ok(Snat::default())
            } else {
                Err(E::custom(format!(
                    "snat: {v:?} is neither `auto` nor a table {{ipv4, ipv6, port_min, port_max}}"
                )))
            }
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            map: M,
        ) -> std::result::Result<Snat, M::Error> {
            SnatDef::deserialize(serde::de::value::MapAccessDeserializer::new(map))
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
