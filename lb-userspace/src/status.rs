//! Reads the pinned maps back: what `xlb status` prints.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    maglev_chunks, Backend, MaglevChunk, MaglevKey, ServiceKey, ServiceName, ServiceValue,
    TrafficStats, BACKEND_F_SVC_DNAT, BACKEND_F_SVC_DSR, BACKEND_F_UNHEALTHY, MAP_BACKENDS,
    MAP_BACKEND_STATS, MAP_MAGLEV, MAP_SERVICES, MAP_SERVICE_NAMES, MAP_SERVICE_STATS, PROTO_TCP,
    SVC_KEY_ENCAPSULATED,
};

use crate::{
    codec::{backend_addr, words_to_addr},
    counters::{read_global_counters, CounterView},
    dataplane::{live_backends, open_pinned},
};
use serde::Serialize;

#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrafficView {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets refused by the service's source ranges (always 0 per backend).
    pub denied: u64,
}

#[derive(Serialize, Debug)]
pub struct ServiceView {
    pub id: u32,
    /// The config's name (in Kubernetes `namespace/name:port/proto@vip`).
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: &'static str,
    /// nat, dnat or dsr.
    pub mode: &'static str,
    /// Serves packets that arrive encapsulated to this host (dsr across nodes).
    pub encapsulated: bool,
    pub table_size: u32,
    /// The source ranges it admits (`allow:`, `loadBalancerSourceRanges`); None:
    /// everyone.
    pub allow: Option<Vec<String>>,
    /// `conntrack: false` (`xlb.dev/conntrack: "false"`): its flows get no conntrack
    /// entry, each packet is balanced by Maglev alone.
    pub stateless: bool,
    pub stats: TrafficView,
    pub backends: Vec<BackendView>,
}

#[derive(Serialize, Debug)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    /// False while the backend fails its health check.
    pub healthy: bool,
    pub weight: u32,
    /// Weight 0: takes no new flows; its established flows stay.
    pub draining: bool,
    /// The SNAT source of new flows to it (configured, or from the route); None: no
    /// address known, and its new flows are dropped (drop_no_snat_address).
    pub snat: Option<String>,
    /// dsr: the address the packets are encapsulated to, when not the backend's own.
    pub via: Option<String>,
    /// Reached by dnat although the service is dsr (an endpoint on this host).
    pub dnat_here: bool,
    pub stats: TrafficView,
}

/// An interface the program is attached to (a pinned link), and how, as the kernel
/// reports it.
#[derive(Serialize, Debug)]
pub struct AttachmentView {
    pub iface: String,
    /// native, generic or offload: the mode in which the kernel runs the pinned link's
    /// program on the interface; unknown when it cannot be told from here, and then
    /// `xdp_mode_unknown` says why.
    pub xdp_mode: String,
    pub xdp_mode_unknown: Option<String>,
    /// The TC egress program (dnat replies from backends on this host) is attached.
    pub tc_egress: bool,
}

/// How full a map is.
#[derive(Serialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FillView {
    pub entries: u64,
    pub max: u32,
}

/// Entries in a pinned hash map (one syscall per key: for status, not a hot path).
/// Zero when the map is absent (pins from an older version).
pub fn fragment_fill(pin_path: &Path) -> FillView {
    let Ok(map) = open_pinned(pin_path, lb_common::MAP_FRAGMENTS) else {
        return FillView::default();
    };
    let max = map.info().map(|i| i.max_entries()).unwrap_or(0);
    let entries = HashMap::<_, lb_common::FragmentKey, lb_common::FragmentValue>::try_from(
        Map::LruHashMap(map),
    )
    .map(|m| m.keys().filter(|k| k.is_ok()).count() as u64)
    .unwrap_or(0);
    FillView { entries, max }
}

/// The conntrack table's flows (its buckets' header lines, through its mapping).
/// Zero when it cannot be mapped (pins from an older version).
pub fn flow_fill(pin_path: &Path) -> FillView {
    crate::flows::Conntrack::from_pin(&pin_path.join(lb_common::MAP_CONNTRACK))
        .map(|t| FillView {
            entries: t.occupied() as u64,
            max: t.capacity() as u32,
        })
        .unwrap_or_default()
}

/// A VIP announced as a route (docs/announce.md).
#[derive(Serialize, Debug)]
pub struct AnnouncedView {
    pub vip: String,
    /// The kernel routing table the host route is in.
    pub table: u32,
    /// Seconds since the epoch.
    pub since: u64,
    /// The same, as a UTC time (RFC 3339).
    pub since_utc: String,
    /// Seconds since then.
    pub age_s: u64,
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub pin_path: String,
    /// What this node announces, and whether `xlb drain` is in force.
    pub announced: Vec<AnnouncedView>,
    pub drained: bool,
    pub attachments: Vec<AttachmentView>,
    /// Sizes of the maps in force (fixed when they were created).
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_max: u32,
    /// Flows in the conntrack table now (expired ones included, until the sweep or a
    /// full bucket takes them), and how many it holds; read through its mapping.
    pub flows: FillView,
    /// Datagrams whose later fragments xlb can follow now, and how many it can hold
    /// (`--fragments-max`); a table near full loses the oldest records first.
    pub fragments: FillView,
    pub services: Vec<ServiceView>,
    /// Datapath counters by reason, summed over CPUs.
    pub counters: BTreeMap<&'static str, CounterView>,
}

impl From<TrafficStats> for TrafficView {
    fn from(s: TrafficStats) -> Self {
        Self {
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
            denied: s.denied,
        }
    }
}

fn traffic(map: &PerCpuArray<MapData, TrafficStats>, idx: u32) -> Result<TrafficView> {
    Ok(crate::dataplane::traffic::summed(map, idx)?.into())
}

pub fn read_services(pin_path: &Path) -> Result<Vec<ServiceView>> {
    let services = HashMap::<_, ServiceKey, ServiceValue>::try_from(Map::HashMap(open_pinned(
        pin_path,
        MAP_SERVICES,
    )?))?;
    let backends = live_backends(&Array::<_, Backend>::try_from(Map::Array(open_pinned(
        pin_path,
        MAP_BACKENDS,
    )?))?)?;
    let svc_stats =
        PerCpuArray::try_from(Map::PerCpuArray(open_pinned(pin_path, MAP_SERVICE_STATS)?))?;
    let be_stats =
        PerCpuArray::try_from(Map::PerCpuArray(open_pinned(pin_path, MAP_BACKEND_STATS)?))?;
    // A service's traffic is its backends' and its retired backends'
    // (dataplane/traffic.rs); in pins from before, the datapath counted it per service.
    let by_service = match open_pinned(pin_path, lb_common::MAP_SERVICE_RETIRED) {
        Ok(m) => Some(crate::dataplane::traffic::service_traffic(
            &Array::<_, TrafficStats>::try_from(Map::Array(m))?,
            &be_stats,
            &backends,
            services.iter().filter_map(|e| e.ok()).map(|(_, v)| v.id),
        )?),
        Err(_) => None,
    };
    let all_backends: Vec<(u32, Backend)> = backends.into_iter().collect();
    let tunnels = open_pinned(pin_path, lb_common::MAP_BACKEND_TUNNELS)
        .ok()
        .and_then(|m| Array::<_, lb_common::Addr>::try_from(Map::Array(m)).ok());
    // Absent in pins from before names were kept: status still works, without them.
    let names: std::collections::HashMap<u32, ServiceName> =
        open_pinned(pin_path, MAP_SERVICE_NAMES)
            .ok()
            .and_then(|m| HashMap::<_, u32, ServiceName>::try_from(Map::HashMap(m)).ok())
            .map(|m| m.iter().filter_map(|e| e.ok()).collect())
            .unwrap_or_default();
    // Absent in pins from before source ranges: nothing is restricted there.
    let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    if let Ok(m) = open_pinned(pin_path, lb_common::MAP_SOURCE_RANGES) {
        let trie = aya::maps::lpm_trie::LpmTrie::<_, lb_common::SourceRangeKey, u32>::try_from(
            Map::LpmTrie(m),
        )?;
        for key in trie.keys() {
            if let Some((id, net)) = crate::source_ranges::decode(&key?) {
                ranges.entry(id).or_default().push(net.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for entry in services.iter() {
        let (k, v) = entry?;
        let mut bes = Vec::new();
        // The mode is kept on the backend entries: a service without backends shows "-".
        let mut mode = "-";
        for (id, b) in all_backends.iter().filter(|(_, b)| b.service_id == v.id) {
            mode = if b.flags & BACKEND_F_SVC_DSR != 0 {
                "dsr"
            } else if b.flags & BACKEND_F_SVC_DNAT != 0 {
                "dnat"
            } else {
                "nat"
            };
            bes.push(BackendView {
                id: *id,
                address: backend_addr(b).to_string(),
                healthy: b.flags & BACKEND_F_UNHEALTHY == 0,
                weight: b.weight,
                draining: b.weight == 0,
                via: tunnels
                    .as_ref()
                    .and_then(|t| t.get(id, 0).ok())
                    .filter(|a| *a != [0; 4])
                    .map(|a| words_to_addr(&a, b.family).to_string()),
                dnat_here: b.flags & lb_common::BACKEND_F_DNAT != 0,
                snat: (b.snat != [0; 4]).then(|| words_to_addr(&b.snat, b.family).to_string()),
                stats: traffic(&be_stats, *id)?,
            });
        }
        bes.sort_by_key(|b| b.id);
        out.push(ServiceView {
            id: v.id,
            name: names
                .get(&v.id)
                .map(crate::codec::service_name_str)
                .unwrap_or_default(),
            vip: words_to_addr(&k.vip, k.family & !SVC_KEY_ENCAPSULATED).to_string(),
            port: u16::from_be(k.port),
            protocol: if k.proto == PROTO_TCP { "tcp" } else { "udp" },
            mode,
            encapsulated: k.family & SVC_KEY_ENCAPSULATED != 0,
            table_size: v.table_size,
            allow: (v.flags & lb_common::SVC_F_SOURCE_RANGES != 0)
                .then(|| ranges.get(&v.id).cloned().unwrap_or_default()),
            stateless: v.flags & lb_common::SVC_F_STATELESS != 0,
            stats: {
                let counted = traffic(&svc_stats, v.id)?;
                match by_service.as_ref().and_then(|t| t.get(&v.id)) {
                    Some(t) => TrafficView {
                        denied: counted.denied,
                        ..(*t).into()
                    },
                    None => counted,
                }
            },
            backends: bes,
        });
    }
    out.sort_by_key(|s| s.id);
    Ok(out)
}

/// The programmed Maglev tables by `vip:port/proto`, each slot as its backend's
/// address: comparable across agents, whose backend ids may differ.
pub fn read_tables(pin_path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let services = HashMap::<_, ServiceKey, ServiceValue>::try_from(Map::HashMap(open_pinned(
        pin_path,
        MAP_SERVICES,
    )?))?;
    let backends = live_backends(&Array::<_, Backend>::try_from(Map::Array(open_pinned(
        pin_path,
        MAP_BACKENDS,
    )?))?)?;
    let tables = HashMap::<_, MaglevKey, MaglevChunk>::try_from(Map::HashMap(open_pinned(
        pin_path, MAP_MAGLEV,
    )?))?;
    let names: BTreeMap<u32, String> = backends
        .iter()
        .map(|(id, b)| (*id, backend_addr(b).to_string()))
        .collect();
    let mut out = BTreeMap::new();
    for entry in services.iter() {
        let (k, v) = entry?;
        let name = format!(
            "{}/{}{}",
            std::net::SocketAddr::new(
                words_to_addr(&k.vip, k.family & !SVC_KEY_ENCAPSULATED),
                u16::from_be(k.port)
            ),
            if k.proto == PROTO_TCP { "tcp" } else { "udp" },
            if k.family & SVC_KEY_ENCAPSULATED != 0 {
                " (from the tunnel)"
            } else {
                ""
            }
        );
        let slots = if v.table_size == 0 {
            Vec::new()
        } else {
            lookup_table(&tables, &v)?
                .iter()
                .map(|id| names.get(id).cloned().unwrap_or_else(|| format!("#{id}")))
                .collect()
        };
        out.insert(name, slots);
    }
    Ok(out)
}

/// One Maglev table (the service's live generation), read chunk by chunk.
fn lookup_table(
    chunks: &HashMap<MapData, MaglevKey, MaglevChunk>,
    v: &ServiceValue,
) -> Result<Vec<u32>> {
    let mut slots = Vec::with_capacity(v.table_size as usize);
    for chunk in 0..maglev_chunks(v.table_size) {
        let key = MaglevKey {
            service_id: v.id,
            chunk: chunk as u16,
            generation: v.generation,
            _pad: 0,
        };
        let part = chunks
            .get(&key, 0)
            .with_context(|| format!("reading Maglev chunk {chunk} of service {}", v.id))?;
        slots.extend_from_slice(&part.slots);
    }
    slots.truncate(v.table_size as usize);
    Ok(slots)
}

pub async fn read(pin_path: &Path) -> Result<Status> {
    // First: its error says what is missing, and asks whether an agent runs there.
    let services = read_services(pin_path)?;
    let mut attachments = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(pin_path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("link_").map(str::to_owned))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for iface in names {
        let (xdp_mode, xdp_mode_unknown) = match attachment_mode(pin_path, &iface).await {
            Ok(mode) => (mode.to_owned(), None),
            Err(why) => ("unknown".to_owned(), Some(why)),
        };
        let tc_egress = pin_path.join(format!("tclink_{iface}")).exists();
        attachments.push(AttachmentView {
            iface,
            xdp_mode,
            xdp_mode_unknown,
            tc_egress,
        });
    }
    let size = |name: &str| -> Result<u32> {
        let path = pin_path.join(name);
        Ok(aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading the size of {} (not pinned? a pin removed by hand is made afresh by the next `xlb run`)", path.display()))?
            .max_entries())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let announced = crate::announce::read_announced(pin_path)
        .into_iter()
        .map(|(vip, table, since)| AnnouncedView {
            vip: vip.to_string(),
            table,
            since,
            since_utc: utc(since),
            age_s: now.saturating_sub(since),
        })
        .collect();
    Ok(Status {
        pin_path: pin_path.display().to_string(),
        announced,
        drained: crate::announce::is_drained(pin_path),
        attachments,
        max_services: size(MAP_SERVICES)?,
        max_backends: size(MAP_BACKENDS)?,
        conntrack_max: size(lb_common::MAP_CONNTRACK)? * lb_common::FLOW_WAYS as u32,
        flows: flow_fill(pin_path),
        fragments: fragment_fill(pin_path),
        services,
        counters: read_global_counters(pin_path)?,
    })
}

/// The mode in which the kernel runs the program of the pinned link `link_<iface>` on
/// `iface`: the mode whose program id is the link's. Err: why that cannot be told here.
async fn attachment_mode(
    pin_path: &Path,
    iface: &str,
) -> std::result::Result<&'static str, String> {
    let pin = pin_path.join(format!("link_{iface}"));
    let prog = aya::programs::links::PinnedLink::from_pin(&pin)
        .map(aya::programs::links::FdLink::from)
        .and_then(|l| l.info())
        .map(|i| i.program_id())
        .map_err(|e| format!("reading the pinned link {}: {e}", pin.display()))?;
    // Where the agent runs, when it is in another network namespace than this command.
    let elsewhere = || -> Option<String> {
        let pid = crate::dataplane::pin_lock_holder(pin_path)?;
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
        let ours = std::fs::read_link("/proc/self/ns/net").ok()?;
        (theirs != ours).then(|| {
            format!(
                "the agent (pid {pid}) runs in another network namespace ({}); run `nsenter --net=/proc/{pid}/ns/net xlb status --pin-path {}` there",
                theirs.display(),
                pin_path.display()
            )
        })
    };
    let progs = match crate::nexthop::xdp_progs(iface).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(match elsewhere() {
                Some(hint) => format!("no interface {iface} in this network namespace: {hint}"),
                None => format!(
                    "no interface {iface} in this network namespace (it was deleted, or the agent attached it in another namespace)"
                ),
            })
        }
        Err(e) => return Err(format!("{e:#}")),
    };
    match prog {
        0 => Err("the pinned link holds no program".to_owned()),
        id if id == progs.native => Ok("native"),
        id if id == progs.generic => Ok("generic"),
        id if id == progs.offload => Ok("offload"),
        id => Err(match elsewhere() {
            Some(hint) => format!(
                "the interface {iface} here does not run xlb's program (id {id}): {hint}"
            ),
            None => format!(
                "the interface {iface} here does not run xlb's program (id {id}; its XDP programs: native {}, generic {}): it was replaced, or the link is in another network namespace",
                progs.native, progs.generic
            ),
        }),
    }
}

/// Seconds since the epoch as a UTC time, RFC 3339 ("2026-12-06T05:58:04Z").
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A duration for people: "42 s", "3 min 5 s", "2 h 10 min", "3 d 4 h".
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s / 60 % 60),
        s => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

/// The human view: non-zero counters, one per line.
pub fn render_text(status: &Status) -> String {
    let mut s = format!("xlb status ({})\n", status.pin_path);
    for a in &status.attachments {
        let egress = if a.tc_egress { ", TC egress" } else { "" };
        match &a.xdp_mode_unknown {
            None => s.push_str(&format!(
                "attached to {} ({} XDP{egress})\n",
                a.iface, a.xdp_mode
            )),
            Some(why) => s.push_str(&format!(
                "attached to {} (XDP mode unknown{egress}): {why}\n",
                a.iface
            )),
        }
    }
    if status.attachments.is_empty() {
        s.push_str("attached to no interface\n");
    }
    if status.drained {
        s.push_str("DRAINED: no VIP is announced (xlb undrain)\n");
    }
    for a in &status.announced {
        s.push_str(&format!(
            "announced {} (route in table {}, since {}, {} ago)\n",
            a.vip,
            a.table,
            a.since_utc,
            age(a.age_s)
        ));
    }
    s.push_str(&format!(
        "map sizes: {} services, {} backends, {} flows\n",
        status.max_services, status.max_backends, status.conntrack_max
    ));
    s.push_str(&format!(
        "flows in the conntrack table: {} of {}\n",
        status.flows.entries, status.flows.max
    ));
    s.push_str(&format!(
        "fragment records in use: {} of {} (datagrams whose later fragments can be followed)\n",
        status.fragments.entries, status.fragments.max
    ));
    for svc in &status.services {
        let allow = match &svc.allow {
            None => String::new(),
            Some(r) if r.is_empty() => ", allow: no one".to_owned(),
            Some(r) => format!(", allow: {}", r.join(" ")),
        };
        let denied = if svc.stats.denied > 0 {
            format!(", {} denied", svc.stats.denied)
        } else {
            String::new()
        };
        // Last on the line: what scripts read before it stays where it was.
        let stateless = if svc.stateless {
            ", stateless (no conntrack)"
        } else {
            ""
        };
        s.push_str(&format!(
            "service #{} {} {}:{}/{} (M={}): {} pkts, {} new flows{denied}{allow}{stateless}\n",
            svc.id,
            if svc.name.is_empty() { "-" } else { &svc.name },
            svc.vip,
            svc.port,
            svc.protocol,
            svc.table_size,
            svc.stats.packets,
            svc.stats.new_flows
        ));
        for b in &svc.backends {
            let health = if b.healthy { "" } else { " UNHEALTHY" };
            let draining = if b.draining { " DRAINING" } else { "" };
            s.push_str(&format!(
                "  backend #{} {:<40} weight {:<5} {:>10} pkts {:>8} new flows{health}{draining}\n",
                b.id, b.address, b.weight, b.stats.packets, b.stats.new_flows
            ));
        }
    }
    s.push_str("counters:\n");
    for (name, c) in &status.counters {
        if c.packets > 0 {
            s.push_str(&format!(
                "  {name:<28} {:>12} pkts {:>14} bytes\n",
                c.packets, c.bytes
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_and_ages_read_as_durations() {
        // Against Python's datetime.fromtimestamp(t, UTC): the epoch, leap days of a
        // century year and of 2024, the issue's own figure, the end of a century.
        for (t, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_164_800, "2024-02-29T00:00:00Z"),
            (1_796_531_762, "2026-12-06T04:36:02Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(utc(t), want, "{t}");
        }
        assert_eq!(age(42), "42 s");
        assert_eq!(age(185), "3 min 5 s");
        assert_eq!(age(7_800), "2 h 10 min");
        assert_eq!(age(3 * 86_400 + 4 * 3600 + 59), "3 d 4 h");
    }

    fn service_view(id: u32, name: &str, stateless: bool) -> ServiceView {
        ServiceView {
            id,
            name: name.into(),
            vip: "192.0.2.10".into(),
            port: 53,
            protocol: "udp",
            mode: "dsr",
            encapsulated: false,
            table_size: 251,
            allow: None,
            stateless,
            stats: TrafficView {
                packets: 7,
                new_flows: 3,
                ..Default::default()
            },
            backends: Vec::new(),
        }
    }

    /// A stateless service says so at the end of its line (what came before stays
    /// where scripts read it) and in --json; a service with conntrack says nothing.
    #[test]
    fn a_stateless_service_is_shown_as_such() {
        let st = Status {
            pin_path: "/sys/fs/bpf/xlb".into(),
            announced: Vec::new(),
            drained: false,
            attachments: Vec::new(),
            max_services: 256,
            max_backends: 4096,
            conntrack_max: 1 << 20,
            flows: FillView::default(),
            fragments: FillView::default(),
            services: vec![service_view(0, "dns", true), service_view(1, "web", false)],
            counters: BTreeMap::new(),
        };
        let text = render_text(&st);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.contains(&format!(" {name} ")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        assert_eq!(
            line("dns"),
            "service #0 dns 192.0.2.10:53/udp (M=251): 7 pkts, 3 new flows, stateless (no conntrack)"
        );
        assert_eq!(
            line("web"),
            "service #1 web 192.0.2.10:53/udp (M=251): 7 pkts, 3 new flows"
        );
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["services"][0]["stateless"], true);
        assert_eq!(json["services"][1]["stateless"], false);
    }
}
