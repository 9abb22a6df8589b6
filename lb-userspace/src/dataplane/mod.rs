//! The datapath: loading the XDP program (here), attaching it (`attach`), its pin
//! directory (`pins`), and the maps sink (`plan`, the pure plan; `maps`, its writes).

use std::{
    collections::BTreeSet,
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::maps::MapData;
use aya::{
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    buckets_for, DatapathConfig, FLOW_WAYS, MAGLEV_MAX_CHUNKS, MAP_BACKENDS, MAP_MAGLEV,
    MAP_SERVICES, MAX_BACKENDS, MAX_SERVICES, PROGRAM_NAME,
};
use tracing::{debug, info, warn};

mod attach;
mod carry;
mod maps;
mod pins;
pub mod plan;
pub mod traffic;

pub use attach::{driver_name, mode_name, XdpAttachMode};
pub use maps::{live_backends, Restored};
pub use pins::{
    detach_all, drop_incompatible_pins, ensure_bpffs, open_pinned, pin_lock_holder,
    try_lock_pin_path,
};
pub use plan::ApplySummary;

use attach::remove_link;
use pins::{lock_pin_path, restrict_pins};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The TC egress program's name in the object.
const EGRESS_PROGRAM: &str = "xlb_egress";

/// The loaded program and its maps. Maps and attachments (bpf links) are pinned under
/// `pin_path`, so they outlive the agent: the datapath keeps forwarding while no agent
/// runs, and the next agent adopts them (see `attach`). `detach` removes the links.
/// How to load the program.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The program's aya-log level (0 = off; see `ebpf_log`).
    pub log_level: u8,
    /// Flows each of the conntrack and reverse-NAT tables holds (rounded up to a
    /// power of two buckets of lb_common::FLOW_WAYS).
    pub conntrack_max: u32,
    /// Entries of the service map and its Maglev and statistics maps.
    pub max_services: u32,
    /// Entries of the backend map and its statistics map.
    pub max_backends: u32,
    /// Datagrams whose later fragments can be followed at once (XLB_FRAGMENTS).
    pub fragments_max: u32,
    /// Which sizes the operator asked for: an adopted map of another size is said in
    /// the log only for those (a default the pins differ from is no request).
    pub asked: SizesAsked,
}

/// Which of the operator-sized maps' sizes were asked for (a flag or its environment
/// variable) rather than left at their defaults.
#[derive(Debug, Clone, Copy)]
pub struct SizesAsked {
    pub conntrack_max: bool,
    pub max_services: bool,
    pub max_backends: bool,
}

impl Default for SizesAsked {
    /// All asked: a caller that sets sizes in code hears of every one the pins override.
    fn default() -> Self {
        Self {
            conntrack_max: true,
            max_services: true,
            max_backends: true,
        }
    }
}

impl LoadOptions {
    /// The maps these options size, and their sizes (every other map has the size the
    /// object gives it).
    pub fn map_sizes(&self) -> [(&'static str, u32); 11] {
        [
            (lb_common::MAP_CONNTRACK, buckets_for(self.conntrack_max)),
            (lb_common::MAP_FRAGMENTS, self.fragments_max),
            (lb_common::MAP_REVERSE_NAT, buckets_for(self.conntrack_max)),
            (MAP_SERVICES, self.max_services),
            (MAP_MAGLEV, self.max_services * 2 * MAGLEV_MAX_CHUNKS),
            (lb_common::MAP_SERVICE_STATS, self.max_services),
            (lb_common::MAP_SERVICE_RETIRED, self.max_services),
            (lb_common::MAP_SERVICE_NAMES, self.max_services),
            (MAP_BACKENDS, self.max_backends),
            (lb_common::MAP_BACKEND_STATS, self.max_backends),
            (lb_common::MAP_BACKEND_TUNNELS, self.max_backends),
        ]
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            log_level: 0,
            conntrack_max: lb_common::CONNTRACK_MAX,
            max_services: MAX_SERVICES,
            max_backends: MAX_BACKENDS,
            fragments_max: lb_common::FRAGMENTS_MAX,
            asked: SizesAsked::default(),
        }
    }
}

/// The size a pinned map was created with, if it is pinned.
fn pinned_size(pin_path: &Path, name: &str) -> Option<u32> {
    aya::maps::MapInfo::from_pin(pin_path.join(name))
        .ok()
        .map(|i| i.max_entries())
}

/// The sizes a load makes new maps at: the operator's, except where a map of the same
/// group is pinned already and adopted at its own size. A group's maps must agree, so a
/// map made beside an adopted one takes the adopted one's size: a flow table whose
/// pin was lost (or replaced for its layout) beside the other, and a service or
/// backend map's companions (e.g. XLB_SERVICE_RETIRED, which earlier versions lacked).
fn sized_by_pins(pin_path: &Path, opts: &LoadOptions) -> LoadOptions {
    let mut o = *opts;
    let ct = pinned_size(pin_path, lb_common::MAP_CONNTRACK);
    let rev = pinned_size(pin_path, lb_common::MAP_REVERSE_NAT);
    if let Some(buckets) = ct.or(rev) {
        o.conntrack_max = buckets * FLOW_WAYS as u32;
        if ct.is_none() || rev.is_none() {
            let (adopted, made) = if ct.is_some() {
                (lb_common::MAP_CONNTRACK, lb_common::MAP_REVERSE_NAT)
            } else {
                (lb_common::MAP_REVERSE_NAT, lb_common::MAP_CONNTRACK)
            };
            warn!(
                adopted,
                made,
                flows = o.conntrack_max,
                "one flow table is pinned and the other is not (a pin removed, or replaced for its layout): the missing one is made afresh at the adopted one's size, and the flows it held are lost (they are re-created on their next packets)"
            );
        }
    }
    // The first of a group's maps that is pinned gives its size: the services map may
    // be replaced for its layout while its companions are adopted. (The Maglev map is
    // left out: its size is a multiple of the services', by a factor versions chose.)
    let group = |names: &[&str]| -> Option<u32> {
        let sizes: Vec<(&str, u32)> = names
            .iter()
            .filter_map(|n| pinned_size(pin_path, n).map(|s| (*n, s)))
            .collect();
        let &(first, size) = sizes.first()?;
        if let Some(&(other, other_size)) = sizes.iter().find(|(_, s)| *s != size) {
            warn!(
                first,
                size,
                other,
                other_size,
                "pinned maps of one group have different sizes (pins of different starts): new ones are made at the first's"
            );
        }
        Some(size)
    };
    if let Some(n) = group(&[
        MAP_SERVICES,
        lb_common::MAP_SERVICE_STATS,
        lb_common::MAP_SERVICE_NAMES,
        lb_common::MAP_SERVICE_RETIRED,
    ]) {
        o.max_services = n;
    }
    if let Some(n) = group(&[
        MAP_BACKENDS,
        lb_common::MAP_BACKEND_STATS,
        lb_common::MAP_BACKEND_TUNNELS,
    ]) {
        o.max_backends = n;
    }
    o
}

/// The fewest flows the agent falls back to when the kernel cannot allocate more.
const FLOWS_FLOOR: u32 = 65_536;

fn load_object(pin_path: &Path, opts: &LoadOptions) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_path).override_global(
        "AYA_LOG_LEVEL",
        &opts.log_level,
        true,
    );
    for (name, size) in opts.map_sizes() {
        loader.map_max_entries(name, size);
    }
    loader.load(crate::EBPF_OBJECT).with_context(|| {
        format!(
            "loading the XDP program (maps pinned in {})",
            pin_path.display()
        )
    })
}

/// Whether a load failed for want of kernel memory (ENOMEM creating a map).
fn out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOMEM))
    }) || format!("{e:#}").contains("Cannot allocate memory")
}

pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pin_path: PathBuf,
    /// Interface, and whether the attachment was adopted from an earlier agent.
    pub attached: Vec<(String, bool)>,
    links: Vec<PinnedLink>,
    /// What the maps hold as the last apply left them, so an update neither reads
    /// 100k entries back through syscalls nor rewrites what is there. None until the
    /// first apply reads the maps (they may be adopted), and after a failed apply.
    applied: Option<plan::Applied>,
    /// The tunnel map was created by this load, so it holds zeros (`Applied::tunnels_zeroed`).
    tunnels_created: bool,
    /// Table generations replaced by the last apply: (service id, generation, chunks).
    /// Deleted at the next apply or housekeeping pass, by when no packet that read the
    /// old service entry can still be looking them up.
    retired: Vec<(u32, u8, u32)>,
    /// The sizes of the service and backend maps as created (pinned maps keep theirs).
    pub max_services: u32,
    pub max_backends: u32,
    /// Flows each flow table holds (its buckets × FLOW_WAYS).
    pub conntrack_max: u32,
    /// The flow tables' buckets, as created or adopted (the datapath reads them from
    /// its config: `with_geometry`).
    pub conntrack_buckets: u32,
    pub reverse_buckets: u32,
    /// The pins end with this process (see `ensure_bpffs`).
    pub private_pins: bool,
    /// The redirect-failure tracepoints are attached (see `watch_redirects`).
    watching_redirects: bool,
    /// The pin directory's lock, held while the agent runs.
    _lock: std::fs::File,
}

impl Dataplane {
    /// Loads the program, reusing maps already pinned under `pin_path` (their sizes
    /// are the ones they were created with).
    pub fn load(pin_path: &Path, opts: &LoadOptions) -> Result<Self> {
        let private_pins = ensure_bpffs(pin_path)?;
        let lock = lock_pin_path(pin_path)?;
        let carried = carry::take(pin_path);
        drop_incompatible_pins(pin_path)?;
        let tunnels_created = !pin_path.join(lb_common::MAP_BACKEND_TUNNELS).exists();
        // The flow tables are the largest allocation (288 MiB at the default): if the
        // kernel cannot make them, half the size is tried, down to FLOWS_FLOOR, unless
        // they are pinned already (adopted at their size).
        let tables_pinned = pin_path.join(lb_common::MAP_CONNTRACK).exists()
            || pin_path.join(lb_common::MAP_REVERSE_NAT).exists();
        let asked = *opts;
        let mut opts = sized_by_pins(pin_path, opts);
        let ebpf = loop {
            match load_object(pin_path, &opts) {
                Ok(ebpf) => break ebpf,
                Err(e)
                    if !tables_pinned && opts.conntrack_max > FLOWS_FLOOR && out_of_memory(&e) =>
                {
                    let half = (opts.conntrack_max / 2).max(FLOWS_FLOOR);
                    warn!(
                        asked = opts.conntrack_max,
                        trying = half,
                        "the kernel could not allocate the flow tables (out of memory): trying half the flows (--conntrack-max)"
                    );
                    // A table made by the failed attempt is of the size that failed.
                    for name in [lb_common::MAP_CONNTRACK, lb_common::MAP_REVERSE_NAT] {
                        let _ = std::fs::remove_file(pin_path.join(name));
                    }
                    opts.conntrack_max = half;
                }
                Err(e) => return Err(e),
            }
        };
        let mut dp = Self {
            ebpf,
            pin_path: pin_path.to_owned(),
            attached: Vec::new(),
            links: Vec::new(),
            applied: None,
            tunnels_created,
            retired: Vec::new(),
            max_services: 0,
            max_backends: 0,
            conntrack_max: 0,
            conntrack_buckets: 0,
            reverse_buckets: 0,
            private_pins,
            watching_redirects: false,
            _lock: lock,
        };
        dp.max_services = dp.map_size(MAP_SERVICES)?;
        dp.max_backends = dp.map_size(MAP_BACKENDS)?;
        dp.conntrack_buckets = dp.map_size(lb_common::MAP_CONNTRACK)?;
        dp.reverse_buckets = dp.map_size(lb_common::MAP_REVERSE_NAT)?;
        dp.conntrack_max = dp.conntrack_buckets * FLOW_WAYS as u32;
        // Against what the operator asked for (not a default the pins differ from, as
        // after a start that fell back to smaller tables). Tables made afresh at less
        // than asked were said above (out of memory).
        let asked_flows = buckets_for(asked.conntrack_max) * FLOW_WAYS as u32;
        let given = asked.asked;
        for (flag, asked, in_force, said) in [
            (
                "--max-services",
                asked.max_services,
                dp.max_services,
                given.max_services,
            ),
            (
                "--max-backends",
                asked.max_backends,
                dp.max_backends,
                given.max_backends,
            ),
            (
                "--conntrack-max",
                asked_flows,
                dp.conntrack_max,
                given.conntrack_max && tables_pinned,
            ),
        ] {
            if said && asked != in_force {
                warn!(
                    flag,
                    asked,
                    in_force,
                    "the pinned maps were created with another size and are kept (with their flows): {flag} is ignored; `xlb detach` and a restart apply it, losing established flows"
                );
            }
        }
        let prog = dp.program()?;
        debug!("loading the XDP program (the verifier takes about a second)");
        prog.load().context("the kernel rejected the XDP program")?;
        match prog.info() {
            Ok(info) => info!(
                instructions = info.size_translated().map(|b| b / 8),
                verified_instructions = info.verified_instruction_count(),
                "XDP program loaded"
            ),
            Err(e) => warn!(error = %e, "XDP program loaded; its info is unavailable"),
        }
        dp.sync_geometry()?;
        // New tables, and adopted ones of this version: their flows are bucketed by
        // this version's hash (carry.rs).
        dp.conntrack()?.stamp()?;
        dp.reverse_nat()?.stamp()?;
        dp.put_carried(carried)?;
        let restored = dp.restore_derived_state()?;
        // Counters an earlier version's datapath left (traffic.rs).
        dp.convert_service_counters()?;
        if restored.filter_words > 0 {
            info!(
                words = restored.filter_words,
                "VIP filter rebuilt from the pinned services (it was replaced or incomplete)"
            );
        }
        restrict_pins(pin_path)?;
        Ok(dp)
    }

    /// `cfg` with the flow tables' geometry, which only the maps know.
    pub fn with_geometry(&self, mut cfg: DatapathConfig) -> DatapathConfig {
        cfg.conntrack_buckets = self.conntrack_buckets;
        cfg.reverse_buckets = self.reverse_buckets;
        cfg
    }

    /// Gives a running datapath's config the geometry of the tables this load holds
    /// (one of them may have been replaced: another layout). A config never written
    /// is left for the first apply.
    fn sync_geometry(&mut self) -> Result<()> {
        use aya::maps::Array;
        let (conntrack_buckets, reverse_buckets) = (self.conntrack_buckets, self.reverse_buckets);
        let map = self
            .ebpf
            .map_mut(lb_common::MAP_CONFIG)
            .context("config map")?;
        let mut config = Array::<&mut MapData, DatapathConfig>::try_from(map)?;
        let running = config.get(&0, 0)?;
        let cfg = DatapathConfig {
            conntrack_buckets,
            reverse_buckets,
            ..running
        };
        if running != DatapathConfig::default() && cfg != running {
            config.set(0, cfg, 0)?;
        }
        Ok(())
    }

    /// The conntrack table, mapped.
    pub fn conntrack(&self) -> Result<crate::flows::Conntrack> {
        crate::flows::FlowTable::new(self.map_data(lb_common::MAP_CONNTRACK)?)
    }

    /// The reverse-NAT table, mapped.
    pub fn reverse_nat(&self) -> Result<crate::flows::ReverseTable> {
        crate::flows::FlowTable::new(self.map_data(lb_common::MAP_REVERSE_NAT)?)
    }

    fn map_data(&self, name: &str) -> Result<&MapData> {
        match self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?
        {
            aya::maps::Map::Array(m) => Ok(m),
            _ => bail!("map {name} is not an array"),
        }
    }

    fn map_size(&self, name: &str) -> Result<u32> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let data: &MapData = match map {
            aya::maps::Map::HashMap(m)
            | aya::maps::Map::LruHashMap(m)
            | aya::maps::Map::Array(m) => m,
            _ => anyhow::bail!("map {name} is neither a hash map nor an array"),
        };
        Ok(data.info()?.max_entries())
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .context("XDP program missing from the object")?
            .try_into()?)
    }
}
