//! Command-line interface. The flags here are a stable interface (see docs/design.md).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::DEFAULT_PIN_PATH;

#[derive(Parser, Debug)]
#[command(name = "xlb", version, about = "XDP Maglev L4 load balancer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the XDP program, attach it to interfaces and keep it running.
    Run(Box<RunArgs>),
    /// Show services, backends and counters from the pinned maps.
    Status(StatusArgs),
    /// Build a Maglev table and print it (--json) or a summary of its balance.
    Maglev(MaglevArgs),
    /// Remove everything xlb pinned: detach from every interface, delete the maps, and
    /// withdraw the VIPs' routes. Refused while an agent runs on the pin path.
    Detach(DetachNodeArgs),
    /// Withdraw every VIP this node announces, for maintenance; established flows keep
    /// being forwarded. `xlb undrain`, or a restart of the agent, announces again.
    Drain(DetachArgs),
    /// Announce again after `xlb drain`.
    Undrain(DetachArgs),
    /// Validate a config file, as `xlb run` and reloads do, and say what is wrong.
    CheckConfig(CheckConfigArgs),
    /// Remove everything xlb wrote: on this node as `xlb detach` (routes, pins, links)
    /// and the managed neighbour entries it made (`ip neigh show proto 248`);
    /// with --kubernetes also its Services' status addresses, its Events and its Leases.
    /// Run it after deleting the DaemonSet (docs/kubernetes.md).
    Uninstall(UninstallArgs),
}

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Also clean up in the cluster (in-cluster config or KUBECONFIG).
    #[arg(long)]
    pub kubernetes: bool,
    /// Which Services the agents served and where their Leases are, as `xlb run` was
    /// given them.
    #[command(flatten)]
    pub served: ServedArgs,
    /// Remove the pins even while an agent runs on them (it is named otherwise, and
    /// nothing is removed).
    #[arg(long)]
    pub force: bool,
}

/// Which Services are xlb's, and where its Leases live: `xlb run --kubernetes` serves
/// them, `xlb uninstall --kubernetes` cleans them up.
#[derive(clap::Args, Debug)]
pub struct ServedArgs {
    /// The spec.loadBalancerClass served.
    #[arg(long, default_value = crate::k8s::translate::DEFAULT_CLASS)]
    pub lb_class: String,
    /// Also serve LoadBalancer Services that name no class.
    #[arg(long)]
    pub default_class: bool,
    /// With --kubernetes and --announce-l2: the namespace of the per-VIP Leases that
    /// make one node the L2 owner of each VIP (the DaemonSet's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "xlb-system")]
    pub lease_namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct DetachNodeArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Detach even while an agent runs on the pin path (it is named otherwise, and
    /// nothing is removed). The agent keeps running with its maps gone.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args, Debug)]
pub struct CheckConfigArgs {
    pub file: PathBuf,
    /// The largest config file read, in bytes.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_CONFIG_BYTES)]
    pub max_config_bytes: u64,
    /// Check against maps of this size (as `xlb run --max-services`).
    #[arg(long, default_value_t = lb_common::MAX_SERVICES, env = "XLB_MAX_SERVICES")]
    pub max_services: u32,
    /// Check against maps of this size (as `xlb run --max-backends`).
    #[arg(long, default_value_t = lb_common::MAX_BACKENDS, env = "XLB_MAX_BACKENDS")]
    pub max_backends: u32,
}

#[derive(clap::Args, Debug)]
pub struct MaglevArgs {
    /// Table size M: a prime between 251 and 65537 (the largest table the datapath holds).
    #[arg(long, default_value_t = crate::maglev::DEFAULT_TABLE_SIZE)]
    pub table_size: u32,
    /// A backend as ADDR:PORT[=WEIGHT] (IPv6 as [ADDR]:PORT); repeat for each backend.
    #[arg(long = "backend", value_parser = crate::maglev::parse_backend_spec)]
    pub backends: Vec<crate::maglev::WeightedBackend>,
    /// Print {"table_size", "backends", "table"} as JSON.
    #[arg(long)]
    pub json: bool,
}

// `xlb run --help` in groups: twenty flags in one list was hard to read.
const DATAPATH: &str = "Datapath";
const SERVICES: &str = "Services and SNAT";
const ANNOUNCING: &str = "Announcing";
const KUBERNETES: &str = "Kubernetes";
const METRICS: &str = "Metrics";
const MAP_SIZES: &str = "Map sizes (fixed when the maps are first created)";

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["config", "kubernetes", "decap"])))]
pub struct RunArgs {
    /// Interfaces to attach to, comma separated or repeated.
    #[arg(
        long = "iface",
        env = "XLB_IFACE",
        value_delimiter = ',',
        required = true,
        help_heading = DATAPATH
    )]
    pub ifaces: Vec<String>,
    /// XDP attach mode. `auto` tries native and falls back to generic.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto, env = "XLB_XDP_MODE", help_heading = DATAPATH)]
    pub xdp_mode: XdpModeArg,
    /// bpffs directory for the maps (mounted if bpffs is not there yet).
    #[arg(long, default_value = DEFAULT_PIN_PATH, help_heading = DATAPATH)]
    pub pin_path: PathBuf,
    /// Static YAML config: services, backends, SNAT (see README).
    #[arg(long, help_heading = SERVICES)]
    pub config: Option<PathBuf>,
    /// Announce the VIPs this node can serve as host routes in this kernel routing
    /// table (protocol 248), for BIRD or FRR to export over BGP (docs/announce.md).
    /// Overrides `announce.routes.table` in the config.
    #[arg(long, env = "XLB_ANNOUNCE_ROUTES_TABLE", help_heading = ANNOUNCING)]
    pub announce_routes_table: Option<u32>,
    /// Answer ARP and neighbour solicitations for the VIPs this node announces on these
    /// interfaces (each also an --iface), and send gratuitous ARP / unsolicited
    /// neighbour advertisements on taking a VIP (docs/announce.md). Overrides
    /// `announce.l2.interfaces`.
    #[arg(
        long,
        value_delimiter = ',',
        env = "XLB_ANNOUNCE_L2",
        help_heading = ANNOUNCING
    )]
    pub announce_l2: Vec<String>,
    /// Decapsulate IP-in-IP and IPv6-in-IPv6 packets addressed to this host and pass
    /// the inner packet to the kernel: the backend's side of `mode: dsr`. Needs no
    /// --config (`decap: true` in a config file does the same).
    #[arg(long, help_heading = DATAPATH)]
    pub decap: bool,
    /// The largest config file read, in bytes.
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_CONFIG_BYTES, help_heading = SERVICES)]
    pub max_config_bytes: u64,
    /// Serve Kubernetes Services of type LoadBalancer, from the in-cluster config or
    /// KUBECONFIG. With --config too, the file adds its settings and static services.
    #[arg(long, help_heading = KUBERNETES)]
    pub kubernetes: bool,
    #[command(flatten, next_help_heading = KUBERNETES)]
    pub served: ServedArgs,
    /// How externalTrafficPolicy: Cluster Services reach endpoints: `nat` (source
    /// NAT; replies return through this node) or `dsr` (encapsulated to the endpoint's
    /// node, whose xlb DNATs to the pod and answers the client directly, with the
    /// client's address at the pod). The annotation xlb.dev/forwarding overrides it.
    #[arg(long, value_enum, default_value_t = ClusterForwardingArg::Nat, env = "XLB_CLUSTER_FORWARDING", help_heading = KUBERNETES)]
    pub cluster_forwarding: ClusterForwardingArg,
    /// This node's name, for externalTrafficPolicy: Local (the DaemonSet passes it
    /// from the downward API).
    #[arg(long, env = "NODE_NAME", help_heading = KUBERNETES)]
    pub node_name: Option<String>,
    /// Address pools for Services that have no VIP yet, CIDRs, comma separated or
    /// repeated (one per family at least, to allocate in that family).
    #[arg(
        long,
        env = "XLB_IPAM_POOLS",
        value_delimiter = ',',
        help_heading = KUBERNETES
    )]
    pub ipam_pool: Vec<ipnet::IpNet>,
    /// SNAT source address for IPv4, overriding the file (per node: the DaemonSet
    /// passes the node's address).
    #[arg(long, env = "XLB_SNAT_IPV4", help_heading = SERVICES)]
    pub snat_ipv4: Option<std::net::Ipv4Addr>,
    /// SNAT source address for IPv6, overriding the file.
    #[arg(long, env = "XLB_SNAT_IPV6", help_heading = SERVICES)]
    pub snat_ipv6: Option<std::net::Ipv6Addr>,
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz (read-only, GET) here;
    /// `off` to serve nothing. Default 127.0.0.1:9464 (loopback: expose it on purpose;
    /// a taken default port only warns).
    #[arg(long, value_parser = parse_metrics_addr, help_heading = METRICS)]
    pub metrics_addr: Option<MetricsAddr>,
    /// Flows the conntrack (and reverse-NAT) tables hold each, 16 to 16777216, rounded
    /// up to a power of two: 144 bytes per flow per table (288 MiB for both at the
    /// default), in kernel memory. Fixed when the maps are first created: an agent
    /// adopting pinned maps keeps their size. [default: 1048576]
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=16_777_216), help_heading = MAP_SIZES, allow_negative_numbers = true)]
    pub conntrack_max: Option<u32>,
    /// Fragmented datagrams (first fragment seen, later ones expected) followed at
    /// once, 16 to 4194304, each record about 100 bytes. An LRU map: when it is full the
    /// least recently used records go first (approximately: the kernel's LRU works per
    /// CPU). Fixed when the map is first created.
    #[arg(long, default_value_t = lb_common::FRAGMENTS_MAX, value_parser = clap::value_parser!(u32).range(16..=4_194_304), help_heading = MAP_SIZES, allow_negative_numbers = true)]
    pub fragments_max: u32,
    /// Services (VIP, port, protocol) the maps hold. A service's Maglev table takes
    /// memory only while it exists, in 4 KiB chunks of 1008 slots: 68 KiB at the
    /// default table size 16381, 264 KiB at 65537 (twice that for a moment while a new
    /// table replaces it). The per-CPU
    /// statistics take 32 bytes per CPU per slot. Fixed when the maps are first created.
    /// [default: 256]
    #[arg(long, env = "XLB_MAX_SERVICES",
          value_parser = clap::value_parser!(u32).range(1..=65_536), help_heading = MAP_SIZES, allow_negative_numbers = true)]
    pub max_services: Option<u32>,
    /// Backends, over all services, the maps hold. Fixed when the maps are first created.
    /// [default: 16384]
    #[arg(long, env = "XLB_MAX_BACKENDS",
          value_parser = clap::value_parser!(u32).range(1..=1_048_576), help_heading = MAP_SIZES, allow_negative_numbers = true)]
    pub max_backends: Option<u32>,
    /// Detach on SIGTERM too. By default SIGTERM leaves the datapath running (pinned)
    /// for a restart or an upgrade; SIGINT always detaches. Detaching removes every pin
    /// of xlb's, maps included, as `xlb detach` does.
    #[arg(long, help_heading = DATAPATH)]
    pub detach_on_exit: bool,
}

impl RunArgs {
    /// The agent's options from the flags: the one place that reads them.
    pub fn options(self) -> crate::agent::Options {
        use crate::agent::{KubernetesOptions, MetricsServing};
        let metrics = match self.metrics_addr {
            Some(MetricsAddr(Some(addr))) => MetricsServing::At(addr),
            Some(MetricsAddr(None)) => MetricsServing::Off,
            None => MetricsServing::Default(DEFAULT_METRICS_ADDR.parse().expect("a valid address")),
        };
        let kubernetes = self.kubernetes.then(|| KubernetesOptions {
            translate: crate::k8s::translate::Options {
                class: self.served.lb_class.clone(),
                default_class: self.served.default_class,
                node_name: self.node_name.clone(),
                pools: self.ipam_pool.clone(),
                cluster_forwarding: self.cluster_forwarding.into(),
            },
            lease_namespace: self.served.lease_namespace.clone(),
        });
        crate::agent::Options {
            ifaces: self.ifaces,
            xdp_mode: self.xdp_mode.into(),
            pin_path: self.pin_path,
            config: self.config,
            max_config_bytes: self.max_config_bytes,
            announce_routes_table: self.announce_routes_table,
            announce_l2: self.announce_l2,
            decap: self.decap,
            kubernetes,
            node_name: self.node_name,
            snat_ipv4: self.snat_ipv4,
            snat_ipv6: self.snat_ipv6,
            metrics,
            conntrack_max: self.conntrack_max.unwrap_or(lb_common::CONNTRACK_MAX),
            fragments_max: self.fragments_max,
            max_services: self.max_services.unwrap_or(lb_common::MAX_SERVICES),
            max_backends: self.max_backends.unwrap_or(lb_common::MAX_BACKENDS),
            sizes_asked: crate::dataplane::SizesAsked {
                conntrack_max: self.conntrack_max.is_some(),
                max_services: self.max_services.is_some(),
                max_backends: self.max_backends.is_some(),
            },
            detach_on_exit: self.detach_on_exit,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

impl From<XdpModeArg> for crate::dataplane::XdpAttachMode {
    fn from(m: XdpModeArg) -> Self {
        match m {
            XdpModeArg::Auto => Self::Auto,
            XdpModeArg::Native => Self::Native,
            XdpModeArg::Generic => Self::Generic,
        }
    }
}

/// How `externalTrafficPolicy: Cluster` traffic reaches the endpoints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClusterForwardingArg {
    /// Source NAT to the LB node's address; replies come back through it.
    #[default]
    Nat,
    /// Encapsulated to the node that hosts the endpoint, whose xlb decapsulates, DNATs
    /// to the pod and translates its reply, which goes to the client from there.
    Dsr,
}

impl From<ClusterForwardingArg> for crate::k8s::translate::ClusterForwarding {
    fn from(m: ClusterForwardingArg) -> Self {
        match m {
            ClusterForwardingArg::Nat => Self::Nat,
            ClusterForwardingArg::Dsr => Self::Dsr,
        }
    }
}

/// Where metrics are served when `--metrics-addr` is not given.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Where to serve metrics, or nowhere (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an address:port, or `off`)"))
}

/// Writes a command's output to stdout. A closed stdout (`xlb ... | head -2`, the
/// reader gone) ends the output quietly: the rest is dropped and the command carries on
/// (an uninstall still removes everything) and exits 0, where `println!` panicked.
/// Any other write error still fails loudly, as `println!` does.
pub fn write_stdout(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => panic!("failed printing to stdout: {e}"),
    }
}

/// `println!` through [`write_stdout`]: quiet on a closed stdout.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*), true)
    };
}

/// `print!` through [`write_stdout`]: quiet on a closed stdout.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*), false)
    };
}
