//! Loading, attaching and pinning the XDP program, and access to its maps.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::PROGRAM_NAME;
use tracing::{info, warn};

use crate::cli::XdpModeArg;

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
    /// Entries of the conntrack and reverse-NAT LRU maps.
    pub conntrack_max: u32,
    /// Entries of the service map and its Maglev and statistics maps.
    pub max_services: u32,
    /// Entries of the backend map and its statistics map.
    pub max_backends: u32,
    /// Datagrams whose later fragments can be followed at once (XLB_FRAGMENTS).
    pub fragments_max: u32,
}

impl LoadOptions {
    /// The maps these options size, and their sizes (every other map has the size the
    /// object gives it).
    pub fn map_sizes(&self) -> [(&'static str, u32); 10] {
        [
            (lb_common::MAP_CONNTRACK, self.conntrack_max),
            (lb_common::MAP_FRAGMENTS, self.fragments_max),
            (lb_common::MAP_REVERSE_NAT, self.conntrack_max),
            (MAP_SERVICES, self.max_services),
            (MAP_MAGLEV, self.max_services * 2 * MAGLEV_MAX_CHUNKS),
            (lb_common::MAP_SERVICE_STATS, self.max_services),
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
        }
    }
}

pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pin_path: PathBuf,
    /// Interface, and whether the attachment was adopted from an earlier agent.
    pub attached: Vec<(String, bool)>,
    links: Vec<PinnedLink>,
    /// The Maglev table last written per service id (backend ids per slot), so an
    /// unchanged table is not rewritten. Empty after a restart: the first apply
    /// rewrites every table, with identical contents, which is harmless.
    written_tables: BTreeMap<u32, WrittenTable>,
    /// The service names last written, by id (empty after a restart, as above).
    written_names: BTreeMap<u32, String>,
    /// dsr tunnel destinations last written, by backend id (empty after a restart:
    /// the first apply writes every backend's, zeros too).
    written_tunnels: BTreeMap<u32, Addr>,
    /// The source ranges as last written (None after a restart: the first apply reads
    /// the pinned trie).
    written_ranges: Option<BTreeSet<source_ranges::Entry>>,
    /// XLB_VIPS as last written (None after a restart: read back at the first apply).
    written_vips: Option<crate::vips::Wanted>,
    /// The VIP filter's words as last written (None after a restart: the first apply
    /// writes every word).
    written_filter: Option<Vec<lb_common::VipFilterWord>>,
    /// What the service and backend maps hold, as last written by `apply`, so an
    /// update does not read 100k entries back through syscalls. None until the first
    /// apply reads the maps (they may be adopted), and after a failed apply.
    mirror: Option<Mirror>,
    /// Table generations replaced by the last apply: (service id, generation, chunks).
    /// Deleted at the next apply or housekeeping pass, by when no packet that read the
    /// old service entry can still be looking them up.
    retired: Vec<(u32, u8, u32)>,
    /// The sizes of the service and backend maps as created (pinned maps keep theirs).
    pub max_services: u32,
    pub max_backends: u32,
    pub conntrack_max: u32,
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
        drop_incompatible_pins(pin_path)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_path).override_global(
            "AYA_LOG_LEVEL",
            &opts.log_level,
            true,
        );
        for (name, size) in opts.map_sizes() {
            loader.map_max_entries(name, size);
        }
        let ebpf = loader.load(crate::EBPF_OBJECT).with_context(|| {
            format!(
                "loading the XDP program (maps pinned in {})",
                pin_path.display()
            )
        })?;
        let mut dp = Self {
            ebpf,
            pin_path: pin_path.to_owned(),
            attached: Vec::new(),
            links: Vec::new(),
            written_tables: BTreeMap::new(),
            written_names: BTreeMap::new(),
            written_tunnels: BTreeMap::new(),
            written_filter: None,
            written_ranges: None,
            written_vips: None,
            mirror: None,
            retired: Vec::new(),
            max_services: 0,
            max_backends: 0,
            conntrack_max: 0,
            private_pins,
            watching_redirects: false,
            _lock: lock,
        };
        dp.max_services = dp.map_size(MAP_SERVICES)?;
        dp.max_backends = dp.map_size(MAP_BACKENDS)?;
        dp.conntrack_max = dp.map_size(lb_common::MAP_CONNTRACK)?;
        for (flag, asked, in_force) in [
            ("--max-services", opts.max_services, dp.max_services),
            ("--max-backends", opts.max_backends, dp.max_backends),
            ("--conntrack-max", opts.conntrack_max, dp.conntrack_max),
        ] {
            if asked != in_force {
                warn!(
                    flag,
                    asked,
                    in_force,
                    "the pinned maps were created with another size and are kept (with their flows): {flag} is ignored; `xlb detach` and a restart apply it, losing established flows"
                );
            }
        }
        let prog = dp.program()?;
        prog.load().context("the kernel rejected the XDP program")?;
        match prog.info() {
            Ok(info) => info!(
                instructions = info.size_translated().map(|b| b / 8),
                verified_instructions = info.verified_instruction_count(),
                "XDP program loaded"
            ),
            Err(e) => warn!(error = %e, "XDP program loaded; its info is unavailable"),
        }
        let restored = dp.restore_derived_state()?;
        if restored.backend_modes > 0 {
            info!(
                backends = restored.backend_modes,
                "backend entries written by an older agent given their service's mode"
            );
        }
        if restored.filter_words > 0 {
            info!(
                words = restored.filter_words,
                "VIP filter rebuilt from the pinned services (it was replaced or incomplete)"
            );
        }
        restrict_pins(pin_path)?;
        Ok(dp)
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

    fn link_pin(&self, iface: &str) -> PathBuf {
        self.pin_path.join(format!("link_{iface}"))
    }

    /// Attaches to `iface` and pins the link. If an earlier agent left a pinned link
    /// there, the new program replaces the old one on that link atomically
    /// (bpf_link_update): there is no moment without a program, and the attach mode is
    /// the link's. Otherwise, in `auto` mode, native first, then generic with a log line.
    pub fn attach(&mut self, iface: &str, mode: XdpModeArg) -> Result<()> {
        let pin = self.link_pin(iface);
        if pin.exists() {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?
                .into();
            let link = XdpLink::try_from(fd_link).context("pinned link is not an XDP link")?;
            self.program()?
                .attach_to_link(link)
                .with_context(|| format!("replacing the program on {iface}'s existing link"))?;
            info!(
                iface,
                "adopted the existing attachment: program replaced in place"
            );
            self.attached.push((iface.to_owned(), true));
            self.watch_redirects(iface);
            self.attach_egress(iface)?;
            return Ok(());
        }
        let prog = self.program()?;
        let (id, used) = match mode {
            XdpModeArg::Native => (
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("attaching to {iface} in native mode"))?,
                XdpMode::Driver,
            ),
            XdpModeArg::Generic => (
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching to {iface} in generic mode"))?,
                XdpMode::Skb,
            ),
            XdpModeArg::Auto if driver_name(iface).as_deref() == Some("veth") => {
                // Native XDP on veth delivers a redirected frame only when the peer has
                // NAPI (GRO on, or an XDP program of its own) and loses the frame's
                // partial checksum when the sender offloads it: with the defaults of
                // kind, k3d or containerlab every forwarded frame is dropped. Generic
                // mode has neither limit.
                info!(
                    iface,
                    "veth: choosing generic XDP (native mode drops redirected frames unless the peer has GRO on and TX checksum offload off; --xdp-mode native to force it)"
                );
                (
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching to {iface} in generic mode"))?,
                    XdpMode::Skb,
                )
            }
            XdpModeArg::Auto => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, XdpMode::Driver),
                Err(e) => {
                    warn!(iface, error = %e, "native XDP unavailable, falling back to generic mode");
                    let id = prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching to {iface} in generic mode"))?;
                    (id, XdpMode::Skb)
                }
            },
        };
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link)
            .context("the kernel attached without a bpf link; cannot pin it")?;
        let pinned = fd_link
            .pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        self.links.push(pinned);
        restrict_pins(&self.pin_path)?;
        info!(iface, mode = mode_name(used), "attached");
        self.attached.push((iface.to_owned(), false));
        self.watch_redirects(iface);
        self.attach_egress(iface)?;
        Ok(())
    }

    fn egress_pin(&self, iface: &str) -> PathBuf {
        self.pin_path.join(format!("tclink_{iface}"))
    }

    /// The TC egress program (dnat replies from backends on this host, see the eBPF
    /// crate's egress.rs) on `iface`, at TCX egress, pinned like the XDP link and
    /// replaced in place when an earlier agent left one.
    fn attach_egress(&mut self, iface: &str) -> Result<()> {
        let pin = self.egress_pin(iface);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(EGRESS_PROGRAM)
            .context("TC egress program missing from the object")?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .context("the kernel rejected the TC egress program")?;
        }
        if pin.exists() {
            let fd_link: FdLink = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?
                .into();
            let link =
                SchedClassifierLink::try_from(fd_link).context("pinned link is not a TC link")?;
            prog.attach_to_link(link)
                .with_context(|| format!("replacing the egress program on {iface}"))?;
            return Ok(());
        }
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching the egress program to {iface} (TCX)"))?;
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link).context("TCX attached without a bpf link")?;
        let pinned = fd_link
            .pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        self.links.push(pinned);
        restrict_pins(&self.pin_path)?;
        Ok(())
    }

    /// Counts the frames redirected from `iface` that the kernel then fails to send
    /// (`event_redirect_failed`), through two raw tracepoints loaded on first use. They
    /// are not pinned: they count while this agent runs. Failing here only warns, as
    /// forwarding does not depend on it.
    fn watch_redirects(&mut self, iface: &str) {
        if let Err(e) = self.try_watch_redirects(iface) {
            warn!(
                iface,
                error = format!("{e:#}"),
                "redirect failures will not be counted"
            );
        }
    }

    fn try_watch_redirects(&mut self, iface: &str) -> Result<()> {
        let name = CString::new(iface)?;
        // SAFETY: if_nametoindex reads a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "{iface} has no ifindex");
        if !self.watching_redirects {
            let off = crate::btf::kernel_member_offset;
            let layout = lb_common::NetdevLayout {
                ifindex: off("net_device", "ifindex")?,
                nd_net: off("net_device", "nd_net")?,
                net_inum: off("net", "ns")? + off("ns_common", "inum")?,
                _pad: 0,
            };
            let mut map: aya::maps::Array<_, lb_common::NetdevLayout> = aya::maps::Array::try_from(
                self.ebpf
                    .map_mut("XLB_NETDEV_LAYOUT")
                    .context("map XLB_NETDEV_LAYOUT missing")?,
            )?;
            map.set(0, layout, 0)?;
            for (prog, tracepoint) in [
                ("xlb_devmap_xmit", "xdp_devmap_xmit"),
                ("xlb_redirect_err", "xdp_redirect_err"),
            ] {
                let p: &mut aya::programs::RawTracePoint = self
                    .ebpf
                    .program_mut(prog)
                    .with_context(|| format!("program {prog} missing"))?
                    .try_into()?;
                p.load().with_context(|| format!("loading {prog}"))?;
                p.attach(tracepoint)
                    .with_context(|| format!("attaching to the {tracepoint} tracepoint"))?;
            }
            self.watching_redirects = true;
        }
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino() as u32;
        let mut watch: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("XLB_REDIRECT_WATCH")
                .context("map XLB_REDIRECT_WATCH missing")?,
        )?;
        watch.insert(lb_common::watch_key(netns, ifindex), 1, 0)?;
        Ok(())
    }

    /// Removes this agent's attachments (the pinned links). The maps stay pinned.
    pub fn detach(&mut self) -> Result<()> {
        for (iface, _) in std::mem::take(&mut self.attached) {
            remove_link(&self.link_pin(&iface))?;
            remove_link(&self.egress_pin(&iface))?;
        }
        self.links.clear();
        Ok(())
    }
}

fn remove_link(pin: &Path) -> Result<()> {
    if pin.exists() {
        let fd_link = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening pinned link {}", pin.display()))?
            .unpin()
            .with_context(|| format!("unpinning {}", pin.display()))?;
        // Closing the last reference to the link detaches the program.
        drop(fd_link);
    }
    Ok(())
}

/// Whether `name` is one xlb pins: a map of its object (`maps`), a map of another
/// version (`XLB_` prefix), or `link_<iface>` / `tclink_<iface>`.
fn is_xlb_pin(name: &str, maps: &BTreeSet<String>) -> bool {
    if let Some(iface) = name
        .strip_prefix("link_")
        .or_else(|| name.strip_prefix("tclink_"))
    {
        return !iface.is_empty() && iface.len() < 16;
    }
    maps.contains(name) || name.starts_with("XLB_")
}

/// `xlb detach`: removes everything xlb pinned under `pin_path`: the links (which
/// detaches the program from every interface), then the maps, then the directory.
/// Only on a bpffs, and only when the directory holds nothing but xlb's pins: a
/// mistyped path must never lose someone else's files.
pub fn detach_all(pin_path: &Path) -> Result<Vec<String>> {
    if !pin_path.is_dir() {
        bail!(
            "{}: no such directory (nothing is pinned there)",
            pin_path.display()
        );
    }
    if !is_bpffs(pin_path) {
        bail!(
            "{} is not on a bpf filesystem: it cannot hold xlb's pins, and nothing was removed",
            pin_path.display()
        );
    }
    let mut removed = Vec::new();
    let entries =
        std::fs::read_dir(pin_path).with_context(|| format!("reading {}", pin_path.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let maps: BTreeSet<String> = aya_obj::Object::parse(crate::EBPF_OBJECT)
        .context("parsing the eBPF object")?
        .maps
        .into_keys()
        .collect();
    let foreign: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !is_xlb_pin(n, &maps))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "{} holds pins that are not xlb's ({}): refusing to remove anything; is this the right --pin-path?",
            pin_path.display(),
            foreign.join(", ")
        );
    }
    let (links, maps): (Vec<_>, Vec<_>) = paths.into_iter().partition(|p| {
        p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with("link_") || n.starts_with("tclink_")
        })
    });
    for p in links.iter().chain(&maps) {
        if links.contains(p) {
            remove_link(p)?;
        } else {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
        removed.push(
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    // remove_dir fails on a directory that is not empty (something appeared meanwhile).
    std::fs::remove_dir(pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
    Ok(removed)
}

/// Root only: the pin directory 0700 and every pin in it 0600. The maps hold the
/// flows of every client; anyone who can open them can read or rewrite the datapath.
fn restrict_pins(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

/// The interface's driver as `ethtool -i` names it (SIOCETHTOOL, ETHTOOL_GDRVINFO).
pub fn driver_name(iface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    if iface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket only used for this ioctl and closed at once; `req`
    // and the buffer it points at outlive the call and have the kernel's layout.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL, &mut req);
        libc::close(fd);
        rc == 0
    };
    if !ok {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Unpins the maps under `pin_path` that this program cannot use: created by another
/// xlb version with another layout (map type, key or value size). aya would adopt them
/// as they are, and the verifier would then reject the program, or a value of the same
/// size but another layout would be read wrong. A fresh map replaces each; what it held
/// (flows, for conntrack and reverse NAT) is lost, and said so. Returns their names.
pub fn drop_incompatible_pins(pin_path: &Path) -> Result<Vec<String>> {
    let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).context("parsing the eBPF object")?;
    let operator_sized = LoadOptions::default().map_sizes().map(|(name, _)| name);
    let mut dropped = Vec::new();
    for (name, def) in &obj.maps {
        let pin = pin_path.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin)
            .with_context(|| format!("reading the pinned map {}", pin.display()))?;
        // Maps sized by the operator keep the size they were created with (load warns
        // of it); any other map of another size was left by a version with another
        // fixed size, e.g. fewer counters, whose new entries would not exist.
        let sized_here = !operator_sized.contains(&name.as_str());
        let pinned = (
            info.map_type().map(|t| t as u32).ok(),
            info.key_size(),
            info.value_size(),
            sized_here.then(|| info.max_entries()),
        );
        let wanted = (
            Some(def.map_type()),
            def.key_size(),
            def.value_size(),
            sized_here.then(|| def.max_entries()),
        );
        if pinned != wanted {
            warn!(
                map = %name,
                ?pinned,
                ?wanted,
                "pinned map has another layout (type, key size, value size, fixed size): replacing it, its contents are lost"
            );
            std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            dropped.push(name.clone());
        }
    }
    Ok(dropped)
}

/// Makes sure `dir` exists on a bpffs, mounting one at `/sys/fs/bpf` if the machine
/// has none (containers and minimal hosts often don't).
///
/// Returns whether the pins will vanish with this process: the bpffs was mounted here,
/// in a mount namespace of this process's own (`ip netns exec` gives every command a
/// private one, with a fresh /sys), so nothing outside it can keep the pins alive.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let root = Path::new("/sys/fs/bpf");
    let mut private = false;
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        mount_bpffs(root)?;
        private = private_mount_namespace();
        if private {
            warn!(
                "mounted a bpffs at /sys/fs/bpf in a mount namespace of this process's own (as `ip netns exec` makes, \
                 with a fresh /sys that hides the host's bpffs whether or not one is mounted there): the pins, and with \
                 them the datapath, end when xlb exits. To run xlb in a network namespace and keep its pins, join only \
                 the network namespace: `nsenter --net=/run/netns/NAME xlb run ...`"
            );
        } else {
            info!("mounted bpffs at /sys/fs/bpf");
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem; choose a --pin-path under a bpffs mount",
            dir.display()
        );
    }
    Ok(private)
}

/// Whether this process runs in another mount namespace than PID 1's.
fn private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(me), Ok(init)) => me != init,
        // `ip netns exec` leaves PID 1's namespace unreadable from inside: not ours.
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

/// Takes an exclusive lock on the pin directory for this agent's lifetime: a second
/// agent on the same pins would take the links over and the first one's reloads would
/// silently apply to nothing. The error names the agent holding it.
fn lock_pin_path(dir: &Path) -> Result<std::fs::File> {
    match try_lock_pin_path(dir)? {
        Ok(f) => Ok(f),
        Err(who) => bail!(
            "another xlb agent runs on {}: {who}. One agent per pin path: stop it, or give this one another --pin-path",
            dir.display()
        ),
    }
}

/// The pin directory's lock, if no one holds it; otherwise who does ("pid N (cmdline)").
pub fn try_lock_pin_path(dir: &Path) -> Result<std::result::Result<std::fs::File, String>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Ok(f));
    }
    Ok(Err(match pin_lock_holder(dir) {
        Some(pid) => {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default();
            format!("pid {pid} ({cmd})")
        }
        None => "another process (in another PID namespace?)".to_owned(),
    }))
}

/// The process holding the pin directory's lock (the agent running on it), read from
/// /proc/locks without taking the lock. None: no one, or one in another PID namespace.
pub fn pin_lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    std::fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|l| {
            // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
                .then(|| f.get(4)?.parse().ok())?
        })
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; c is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fstype = CString::new("bpf")?;
    // SAFETY: all pointers are valid C strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "{} is not a BPF filesystem, and mounting one there needs CAP_SYS_ADMIN: mount the host's (in Kubernetes a hostPath volume of /sys/fs/bpf, as the DaemonSet has; with podman -v /sys/fs/bpf:/sys/fs/bpf)",
                path.display()
            );
        }
        bail!("mounting bpffs at {}: {err}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Programming the maps from a config.
// ---------------------------------------------------------------------------------

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use lb_common::{
    maglev_chunks, Addr, Backend, DatapathConfig, MaglevChunk, MaglevKey, ServiceKey, ServiceName,
    ServiceValue, VipFilterWord, BACKEND_F_SVC_DNAT, BACKEND_F_SVC_DSR,
    BACKEND_F_SVC_SOURCE_RANGES, BACKEND_F_UNHEALTHY, FAMILY_V4, FAMILY_V6, MAGLEV_CHUNK_SLOTS,
    MAGLEV_MAX_CHUNKS, MAP_BACKENDS, MAP_CONFIG, MAP_MAGLEV, MAP_SERVICES, MAP_SERVICE_NAMES,
    MAX_BACKENDS, MAX_SERVICES, MODE_DNAT, MODE_DSR, MODE_NAT, PROTO_TCP, PROTO_UDP,
    SVC_F_CLIENT_AFFINITY, SVC_F_SOURCE_RANGES,
};

use crate::{
    config::{Config, Mode, Protocol, SessionAffinity},
    maglev, source_ranges,
};

pub fn addr_to_words(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

pub fn words_to_addr(words: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

pub fn service_key(vip: IpAddr, port: u16, proto: Protocol) -> ServiceKey {
    let (vip, family) = addr_to_words(vip);
    ServiceKey {
        vip,
        port: port.to_be(),
        proto: match proto {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        family,
    }
}

/// The key of a service as configured: `encapsulated` services have their own keys.
pub fn config_service_key(svc: &crate::config::ServiceConfig) -> ServiceKey {
    let mut key = service_key(svc.vip, svc.port, svc.protocol);
    if svc.encapsulated {
        key.family |= lb_common::SVC_KEY_ENCAPSULATED;
    }
    key
}

pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(words_to_addr(&b.addr, b.family), u16::from_be(b.port))
}

/// What one `apply` changed, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_written: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// What `Dataplane::restore_derived_state` rewrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub backend_modes: usize,
    pub filter_words: usize,
}

impl Dataplane {
    /// Puts right what an upgrade may have left in the maps it kept, from the pinned
    /// services, before the new program is attached. With Kubernetes as the source the
    /// first apply comes only after the attach, and until then the new program would:
    /// - NAT dsr and dnat flows, whose backend entries an agent older than
    ///   `BACKEND_F_SVC_DNAT`/`_DSR` wrote without the mode the program now reads
    ///   there: each such entry is given its service's mode;
    /// - pass every packet for a VIP to the kernel, when the VIP filter was replaced
    ///   (another layout or hash) and so is empty: every service's bit is set again
    ///   (bits already set stay; a spare bit only costs a lookup).
    ///
    /// A no-op once both are right.
    pub fn restore_derived_state(&mut self) -> Result<Restored> {
        let services = self.pinned_services()?;
        let mut restored = Restored::default();
        if services.is_empty() {
            return Ok(restored);
        }
        let modes: BTreeMap<u32, u8> = services
            .iter()
            .filter_map(|(_, svc)| match svc.mode {
                MODE_DNAT => Some((svc.id, BACKEND_F_SVC_DNAT)),
                MODE_DSR => Some((svc.id, BACKEND_F_SVC_DSR)),
                _ => None,
            })
            .collect();
        if !modes.is_empty() {
            let mut map = self.backends_map()?;
            for (id, mut b) in live_backends(&map)? {
                let Some(&flag) = modes.get(&b.service_id) else {
                    continue;
                };
                if b.flags & (BACKEND_F_SVC_DNAT | BACKEND_F_SVC_DSR) != 0 {
                    continue;
                }
                b.flags |= flag;
                map.set(id, b, 0)
                    .with_context(|| format!("writing backend {id}'s mode"))?;
                restored.backend_modes += 1;
            }
        }
        let wanted = vip_filter(services.into_iter().map(|(k, _)| k));
        let map = self
            .ebpf
            .map_mut(lb_common::MAP_VIP_FILTER)
            .context("VIP filter map")?;
        let mut map = Array::<&mut MapData, VipFilterWord>::try_from(map)?;
        // Only the words that hold a service's bit: a read each, not one per word.
        for (i, want) in wanted.iter().enumerate().filter(|(_, w)| **w != 0) {
            let i = i as u32;
            let have = map.get(&i, 0)?;
            if have | want != have {
                map.set(i, have | want, 0)?;
                restored.filter_words += 1;
            }
        }
        Ok(restored)
    }

    /// Writes the datapath's settings from `base` (the config without the services yet
    /// to come) when the pinned settings are empty while services are pinned: the
    /// settings map was replaced by an upgrade. Zeroed settings would time every flow
    /// out and give new ones SNAT port 0 until the first apply, which with Kubernetes
    /// as the source comes after the program is attached. The settings that depend on
    /// the services (dnat in use, decapsulation) are read from the pinned services and
    /// backends. Returns whether it wrote.
    pub fn seed_config(&mut self, base: &Config) -> Result<bool> {
        let config_map: Array<&MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map(MAP_CONFIG).context("config map")?)?;
        if config_map.get(&0, 0)? != DatapathConfig::default() {
            return Ok(false);
        }
        let pinned = self.pinned_services()?;
        if pinned.is_empty() {
            return Ok(false);
        }
        let mut dp_cfg = datapath_config(base);
        let dnat_here = live_backends(&self.backends_map()?)?
            .values()
            .any(|b| b.flags & lb_common::BACKEND_F_DNAT != 0);
        if dnat_here || pinned.iter().any(|(_, v)| v.mode == MODE_DNAT) {
            dp_cfg.dnat_in_use = 1;
        }
        if pinned
            .iter()
            .any(|(k, _)| k.family & lb_common::SVC_KEY_ENCAPSULATED != 0)
        {
            dp_cfg.decap = 1;
        }
        let mut config_map: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).context("config map")?)?;
        config_map.set(0, dp_cfg, 0)?;
        Ok(true)
    }

    /// The services in the pinned map, as the running program sees them.
    fn pinned_services(&mut self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
            .iter()
            .collect::<Result<_, _>>()
            .context("reading the pinned services")
    }

    fn backends_map(&mut self) -> Result<Array<&mut MapData, Backend>> {
        let map = self
            .ebpf
            .map_mut(MAP_BACKENDS)
            .with_context(|| format!("map {MAP_BACKENDS} missing"))?;
        Ok(Array::try_from(map)?)
    }

    /// The backends by id: as the last apply wrote them, or read from the map.
    pub fn backends(&mut self) -> Result<BTreeMap<u32, Backend>> {
        match &self.mirror {
            Some(m) => Ok(m.backends.clone()),
            None => live_backends(&self.backends_map()?),
        }
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<BpfHashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing"))?;
        Ok(BpfHashMap::try_from(map)?)
    }

    /// Deletes the table generations that the last apply replaced.
    pub fn collect_retired(&mut self) -> Result<()> {
        for (id, generation, chunks) in std::mem::take(&mut self.retired) {
            self.delete_table(id, generation, chunks)?;
        }
        Ok(())
    }

    fn write_table(&mut self, id: u32, generation: u8, slots: &[u32]) -> Result<()> {
        let mut map = self.hash_map::<MaglevKey, MaglevChunk>(MAP_MAGLEV)?;
        for (chunk, part) in slots.chunks(MAGLEV_CHUNK_SLOTS).enumerate() {
            let mut value = MaglevChunk {
                slots: [0; MAGLEV_CHUNK_SLOTS],
            };
            value.slots[..part.len()].copy_from_slice(part);
            let key = MaglevKey {
                service_id: id,
                chunk: chunk as u16,
                generation,
                _pad: 0,
            };
            map.insert(key, value, 0)
                .with_context(|| format!("writing Maglev chunk {chunk} of service {id}"))?;
        }
        Ok(())
    }

    /// Removes a table generation's chunks; ones that are not there are fine.
    fn delete_table(&mut self, id: u32, generation: u8, chunks: u32) -> Result<()> {
        let mut map = self.hash_map::<MaglevKey, MaglevChunk>(MAP_MAGLEV)?;
        for chunk in 0..chunks {
            let key = MaglevKey {
                service_id: id,
                chunk: chunk as u16,
                generation,
                _pad: 0,
            };
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Programs the maps to match `cfg`, changing only what differs. Ids of services
    /// and backends that already exist (also ones adopted from pinned maps left by an
    /// earlier agent) are kept, so conntrack entries stay valid. Each new Maglev table
    /// is written whole before the service entry that points at it, and a removed
    /// backend is deleted only after no table refers to it any more.
    pub fn apply(&mut self, cfg: &Config) -> Result<ApplySummary> {
        // Before anything is written: a config the maps cannot hold changes nothing.
        cfg.check_capacity(self.max_services, self.max_backends)?;
        self.collect_retired()?;
        // What is programmed now. Taken, not borrowed: if this apply fails midway, the
        // next one reads the maps again.
        let Mirror {
            services: services_now,
            backends: backends_now,
        } = match self.mirror.take() {
            Some(m) => m,
            None => Mirror {
                services: self
                    .hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
                    .iter()
                    .collect::<Result<_, _>>()?,
                backends: live_backends(&self.backends_map()?)?,
            },
        };
        // The filter holds every service there is and will be before the config says
        // it is complete, or before a new service's entry exists; it loses the
        // removed ones' bits only after their entries are gone (below).
        let wanted_filter = vip_filter(cfg.services.iter().map(config_service_key));
        let mut superset = vip_filter(services_now.keys().copied());
        for (word, wanted) in superset.iter_mut().zip(&wanted_filter) {
            *word |= wanted;
        }
        self.write_filter(&superset)?;
        let mut summary = ApplySummary::default();
        let dp_cfg = datapath_config(cfg);
        let mut config_map: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).context("config map")?)?;
        config_map.set(0, dp_cfg, 0)?;

        let mut after = Mirror {
            services: services_now.clone(),
            backends: backends_now.clone(),
        };
        let mut service_ids = IdAllocator::new(
            services_now.values().map(|v| v.id).collect(),
            self.max_services,
        );
        let mut backend_ids =
            IdAllocator::new(backends_now.keys().copied().collect(), self.max_backends);
        let backend_id_of: BTreeMap<(u32, SocketAddr), u32> = backends_now
            .iter()
            .map(|(id, b)| ((b.service_id, backend_addr(b)), *id))
            .collect();

        let mut written_ranges = match self.written_ranges.take() {
            Some(w) => w,
            None => source_ranges::read(&source_ranges::trie(&mut self.ebpf)?)?,
        };
        let mut wanted_ranges = BTreeSet::new();
        let mut wanted_vips = crate::vips::Wanted::new();
        let echo = if cfg.icmp_echo {
            lb_common::VIP_F_ECHO
        } else {
            0
        };
        let mut wanted_keys = BTreeSet::new();
        let mut wanted_backend_ids = BTreeSet::new();
        for svc in &cfg.services {
            let key = config_service_key(svc);
            wanted_keys.insert(key);
            let old = services_now.get(&key).copied();
            let id = match old {
                Some(v) => v.id,
                None => {
                    let id = service_ids.alloc().context("no free service id")?;
                    summary.services_added += 1;
                    id
                }
            };
            // The ranges before the flags that make the datapath read them (on the
            // service, and on its backends for established flows).
            let ranges = svc.source_ranges();
            let restricted = ranges.is_some();
            let mine: BTreeSet<source_ranges::Entry> =
                ranges.into_iter().flatten().map(|net| (id, net)).collect();
            let new: Vec<_> = mine.difference(&written_ranges).copied().collect();
            source_ranges::add(&mut source_ranges::trie(&mut self.ebpf)?, &new)?;
            written_ranges.extend(new);
            wanted_ranges.extend(mine);
            // Backends: keep ids of known ones, allocate the rest.
            let mut ids = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let (addr, family) = addr_to_words(b.address.ip());
                let mut flags = if b.healthy { 0 } else { BACKEND_F_UNHEALTHY };
                if b.dnat_here {
                    flags |= lb_common::BACKEND_F_DNAT;
                }
                flags |= match svc.mode {
                    Mode::Nat => 0,
                    Mode::Dnat => BACKEND_F_SVC_DNAT,
                    Mode::Dsr => BACKEND_F_SVC_DSR,
                };
                if restricted {
                    flags |= BACKEND_F_SVC_SOURCE_RANGES;
                }
                // A configured address wins; otherwise the route's source (`snat: auto`).
                let configured: Option<IpAddr> = match b.address.ip() {
                    IpAddr::V4(_) => cfg.snat.ipv4.map(Into::into),
                    IpAddr::V6(_) => cfg.snat.ipv6.map(Into::into),
                };
                let snat = configured.or(b.snat).map_or([0; 4], |a| addr_to_words(a).0);
                let value = Backend {
                    addr,
                    port: b.address.port().to_be(),
                    family,
                    flags,
                    service_id: id,
                    snat,
                    weight: b.weight,
                };
                let tunnel = b.via.map_or([0; 4], |a| addr_to_words(a).0);
                let bid = match backend_id_of.get(&(id, b.address)) {
                    Some(bid) => {
                        if backends_now.get(bid) != Some(&value) {
                            self.backends_map()?.set(*bid, value, 0)?;
                            after.backends.insert(*bid, value);
                        }
                        *bid
                    }
                    None => {
                        let bid = backend_ids.alloc().context("no free backend id")?;
                        self.backends_map()?.set(bid, value, 0)?;
                        after.backends.insert(bid, value);
                        summary.backends_added += 1;
                        bid
                    }
                };
                // Before the table names the backend: its first packet finds it.
                if self.written_tunnels.get(&bid) != Some(&tunnel) {
                    let map = self
                        .ebpf
                        .map_mut(lb_common::MAP_BACKEND_TUNNELS)
                        .context("tunnel map")?;
                    Array::<&mut MapData, Addr>::try_from(map)?.set(bid, tunnel, 0)?;
                    self.written_tunnels.insert(bid, tunnel);
                }
                wanted_backend_ids.insert(bid);
                ids.push(bid);
            }
            let weighted: Vec<_> = svc
                .backends
                .iter()
                .map(|b| maglev::WeightedBackend {
                    addr: b.address,
                    weight: b.weight,
                })
                .collect();
            let input = TableInput {
                backends: weighted,
                table_size: cfg.maglev_table_size,
                ids,
            };
            // The same backends, weights, ids and size give the same table: an update
            // that touches one service rebuilds one table, not all of them.
            let unchanged = self
                .written_tables
                .get(&id)
                .is_some_and(|w| w.input == input);
            let built = if unchanged {
                Ok(Vec::new())
            } else {
                maglev::build(&input.backends, input.table_size)
            };
            let live = old.map_or(0, |v| v.generation);
            let (table_size, generation) = match built {
                Ok(_) if unchanged => (input.table_size, live),
                Ok(table) => {
                    let ids = &input.ids;
                    let slots: Vec<u32> = table.iter().map(|idx| ids[*idx as usize]).collect();
                    let previous = self.written_tables.get(&id);
                    let generation = if previous.is_some_and(|w| w.slots == slots) {
                        live
                    } else {
                        // The other generation, written whole before the service entry
                        // names it; the live one is deleted once no packet can be
                        // reading it (`collect_retired`).
                        let next = if old.is_some() { live ^ 1 } else { 0 };
                        let old_chunks = previous
                            .map_or(MAGLEV_MAX_CHUNKS, |w| maglev_chunks(w.slots.len() as u32));
                        self.write_table(id, next, &slots)?;
                        if old.is_some() {
                            self.retired.push((id, live, old_chunks));
                        }
                        summary.tables_written += 1;
                        next
                    };
                    self.written_tables
                        .insert(id, WrittenTable { input, slots });
                    (cfg.maglev_table_size, generation)
                }
                // No backends, or all draining: established flows keep going through
                // conntrack, new ones are dropped and counted.
                Err(maglev::MaglevError::NoBackends | maglev::MaglevError::AllDrained) => (0, live),
                Err(e) => return Err(e).with_context(|| format!("service {}", svc.name)),
            };
            let value = ServiceValue {
                id,
                table_size,
                mode: match svc.mode {
                    Mode::Nat => MODE_NAT,
                    Mode::Dnat => MODE_DNAT,
                    Mode::Dsr => MODE_DSR,
                },
                flags: match svc.session_affinity {
                    SessionAffinity::None => 0,
                    SessionAffinity::ClientIp => SVC_F_CLIENT_AFFINITY,
                } | if restricted { SVC_F_SOURCE_RANGES } else { 0 },
                generation,
                _pad: 0,
            };
            // A VIP answers for itself while one of its services takes new flows; echo
            // only for a service open to everyone: a VIP whose every service restricts
            // its clients tells a refused one nothing, not even that it is there.
            if table_size > 0 && !svc.encapsulated {
                let (addr, family) = addr_to_words(svc.vip);
                let flags = if restricted { 0 } else { echo };
                *wanted_vips.entry((family as u32, addr)).or_insert(0) |= flags;
            }
            if self.written_names.get(&id) != Some(&svc.name) {
                self.hash_map::<u32, ServiceName>(MAP_SERVICE_NAMES)?
                    .insert(id, service_name(&svc.name), 0)?;
                self.written_names.insert(id, svc.name.clone());
            }
            if old != Some(value) {
                self.hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
                    .insert(key, value, 0)?;
                after.services.insert(key, value);
            }
        }
        // Removals come last: nothing points at them any more.
        for (key, value) in &services_now {
            if !wanted_keys.contains(key) {
                self.hash_map::<ServiceKey, ServiceValue>(MAP_SERVICES)?
                    .remove(key)?;
                for generation in [0, 1] {
                    self.delete_table(value.id, generation, MAGLEV_MAX_CHUNKS)?;
                }
                self.written_tables.remove(&value.id);
                let _ = self
                    .hash_map::<u32, ServiceName>(MAP_SERVICE_NAMES)?
                    .remove(&value.id);
                self.written_names.remove(&value.id);
                after.services.remove(key);
                summary.services_removed += 1;
            }
        }
        for id in backends_now.keys() {
            if !wanted_backend_ids.contains(id) {
                self.backends_map()?.set(*id, Backend::default(), 0)?;
                after.backends.remove(id);
                summary.backends_removed += 1;
            }
        }
        // Ranges no service wants any more, once no flag makes the datapath read them.
        let stale = source_ranges::plan(&written_ranges, &wanted_ranges).remove;
        source_ranges::remove(&mut source_ranges::trie(&mut self.ebpf)?, &stale)?;
        self.written_ranges = Some(wanted_ranges);
        let written_vips = match self.written_vips.take() {
            Some(w) => w,
            None => crate::vips::read(&mut self.ebpf)?,
        };
        crate::vips::write(&mut self.ebpf, &written_vips, &wanted_vips)?;
        self.written_vips = Some(wanted_vips);
        self.write_filter(&wanted_filter)?;
        self.mirror = Some(after);
        Ok(summary)
    }

    /// Writes the words of the VIP filter that differ from what was last written.
    fn write_filter(&mut self, words: &[VipFilterWord]) -> Result<()> {
        // Taken: if a write fails, the next call writes every word.
        let written = self.written_filter.take();
        let map = self
            .ebpf
            .map_mut(lb_common::MAP_VIP_FILTER)
            .context("VIP filter map")?;
        let mut map = Array::<&mut MapData, VipFilterWord>::try_from(map)?;
        for (i, word) in words.iter().enumerate() {
            if written.as_ref().is_none_or(|w| w[i] != *word) {
                map.set(i as u32, *word, 0)?;
            }
        }
        self.written_filter = Some(words.to_vec());
        Ok(())
    }
}

/// The datapath's settings for `cfg`.
fn datapath_config(cfg: &Config) -> DatapathConfig {
    DatapathConfig {
        snat_v4: cfg
            .snat
            .ipv4
            .map(|a| addr_to_words(a.into()).0)
            .unwrap_or_default(),
        snat_v6: cfg
            .snat
            .ipv6
            .map(|a| addr_to_words(a.into()).0)
            .unwrap_or_default(),
        snat_port_min: cfg.snat.port_min,
        snat_port_max: cfg.snat.port_max,
        tcp_idle_timeout_s: cfg.timeouts.tcp_idle,
        udp_idle_timeout_s: cfg.timeouts.udp_idle,
        tcp_closing_timeout_s: cfg.timeouts.tcp_closing,
        tcp_syn_timeout_s: cfg.timeouts.tcp_syn,
        decap: (cfg.decap || cfg.services.iter().any(|s| s.encapsulated)) as u32,
        new_flow_limit: cfg.flood_guard.new_flows_per_cpu,
        dnat_in_use: cfg
            .services
            .iter()
            .any(|s| s.mode == Mode::Dnat || s.backends.iter().any(|b| b.dnat_here))
            as u32,
        vip_filter: 1,
    }
}

/// The VIP filter's words with the bit of each of `keys` set.
pub fn vip_filter(keys: impl IntoIterator<Item = ServiceKey>) -> Vec<VipFilterWord> {
    let mut words = vec![0; lb_common::VIP_FILTER_WORDS as usize];
    for key in keys {
        let (word, mask) = lb_common::hash::vip_filter_slot(lb_common::hash::vip_filter_bit(
            &key.vip, key.port, key.proto,
        ));
        words[word as usize] |= mask;
    }
    words
}

/// A name as the XLB_SERVICE_NAMES value: cut at a character boundary to fit.
pub fn service_name(name: &str) -> ServiceName {
    let mut end = name.len().min(lb_common::SERVICE_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut bytes = [0u8; lb_common::SERVICE_NAME_MAX];
    bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
    ServiceName { bytes }
}

/// The name stored in an XLB_SERVICE_NAMES value.
pub fn service_name_str(n: &ServiceName) -> String {
    let end = n
        .bytes
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(n.bytes.len());
    String::from_utf8_lossy(&n.bytes[..end]).into_owned()
}

/// Hands out the lowest free ids below `limit`. Ids are only taken during one apply
/// (removals come after), so a cursor that never moves back finds each in turn:
/// allocating n ids is O(n log n), not the O(n²) of searching from 0 each time.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator {
    fn new(used: BTreeSet<u32>, limit: u32) -> Self {
        Self {
            used,
            next: 0,
            limit,
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        let id = (self.next..self.limit).find(|i| !self.used.contains(i))?;
        self.used.insert(id);
        self.next = id + 1;
        Some(id)
    }
}

/// The maps' contents as the last apply left them.
struct Mirror {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
}

/// The backends in a BACKENDS array, by id (free slots are zeroed).
pub fn live_backends<T: std::borrow::Borrow<MapData>>(
    map: &Array<T, Backend>,
) -> Result<BTreeMap<u32, Backend>> {
    let mut out = BTreeMap::new();
    for (id, b) in map.iter().enumerate() {
        let b = b?;
        if b.exists() {
            out.insert(id as u32, b);
        }
    }
    Ok(out)
}

/// What a service's Maglev table was built from, and what was written.
struct WrittenTable {
    input: TableInput,
    slots: Vec<u32>,
}

#[derive(PartialEq)]
struct TableInput {
    backends: Vec<maglev::WeightedBackend>,
    table_size: u32,
    /// Backend id of each entry of `backends`.
    ids: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_filter_sets_each_keys_bit_and_spreads_ports() {
        let keys: Vec<ServiceKey> = (1000..2000u16)
            .map(|p| service_key("192.0.2.10".parse().unwrap(), p, Protocol::Tcp))
            .collect();
        let words = vip_filter(keys.iter().copied());
        let mut bits = BTreeSet::new();
        for k in &keys {
            let bit = lb_common::hash::vip_filter_bit(&k.vip, k.port, k.proto);
            let (word, mask) = lb_common::hash::vip_filter_slot(bit);
            assert!(word < lb_common::VIP_FILTER_WORDS);
            assert_ne!(words[word as usize] & mask, 0);
            bits.insert(bit);
        }
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(set as usize, bits.len(), "no bit beyond the keys'");
        // 1,000 keys in 65,536 bits share about 8 by chance; many more is a poor hash.
        assert!(bits.len() >= 980, "{} distinct bits", bits.len());
        assert!(vip_filter([]).iter().all(|w| *w == 0));
    }

    /// The sets services come in share fewer bits than random keys would: n random
    /// keys in 65,536 bits take 65,536 × (1 − e^(−n/65,536)) distinct bits (9,274 of
    /// 10,000), and each shared bit sends packets for no service on to the lookup.
    #[test]
    fn vip_filter_spreads_the_key_sets_services_come_in() {
        let distinct = |keys: Vec<ServiceKey>| -> usize {
            keys.iter()
                .map(|k| lb_common::hash::vip_filter_bit(&k.vip, k.port, k.proto))
                .collect::<BTreeSet<_>>()
                .len()
        };
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        let v6 = |hi: u128, lo: u128| {
            IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | hi << 64 | lo,
            ))
        };
        let random_keys = 9_274;
        let sets: [(&str, Vec<ServiceKey>); 5] = [
            (
                "10,000 consecutive IPv4 VIPs, one port",
                (0..10_000)
                    .map(|i| service_key(v4(i), 80, Protocol::Tcp))
                    .collect(),
            ),
            (
                "5,000 IPv4 VIPs, ports 80 and 443",
                (0..5_000)
                    .flat_map(|i| [80, 443].map(|p| service_key(v4(i), p, Protocol::Tcp)))
                    .collect(),
            ),
            (
                "one VIP, 5,000 ports, TCP and UDP",
                (1..=5_000)
                    .flat_map(|p| {
                        [Protocol::Tcp, Protocol::Udp].map(|pr| service_key(v4(1), p, pr))
                    })
                    .collect(),
            ),
            (
                "10,000 consecutive IPv6 VIPs",
                (0..10_000)
                    .map(|i| service_key(v6(0, i), 443, Protocol::Tcp))
                    .collect(),
            ),
            (
                "10,000 IPv6 /64 prefixes, ::1 in each",
                (0..10_000)
                    .map(|i| service_key(v6(i, 1), 443, Protocol::Tcp))
                    .collect(),
            ),
        ];
        for (name, keys) in sets {
            let n = distinct(keys);
            assert!(n >= random_keys, "{name}: {n} distinct bits of 10,000 keys");
        }
    }
}
