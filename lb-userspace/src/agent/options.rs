//! What `xlb run` is asked to do, as the agent reads it: plain values, with no parser
//! attached. The CLI builds it (`cli::RunArgs::options`); the agent never sees flags.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use crate::dataplane::XdpAttachMode;

/// Where to serve /metrics, /healthz and /readyz.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsServing {
    /// Asked for: failing to serve there fails the start.
    At(SocketAddr),
    /// Nothing asked: the default address, where a failure is a warning only (the port
    /// may be another agent's, one per network namespace).
    Default(SocketAddr),
    Off,
}

/// The Kubernetes side of the agent, when it serves Services.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    pub translate: crate::k8s::translate::Options,
    /// The namespace of the per-VIP Leases (L2 ownership).
    pub lease_namespace: String,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub ifaces: Vec<String>,
    pub xdp_mode: XdpAttachMode,
    pub pin_path: PathBuf,
    pub config: Option<PathBuf>,
    pub max_config_bytes: u64,
    /// Overrides the file's `announce.routes.table`.
    pub announce_routes_table: Option<u32>,
    /// Overrides the file's `announce.l2.interfaces` when not empty.
    pub announce_l2: Vec<String>,
    pub decap: bool,
    pub kubernetes: Option<KubernetesOptions>,
    pub node_name: Option<String>,
    pub snat_ipv4: Option<Ipv4Addr>,
    pub snat_ipv6: Option<Ipv6Addr>,
    pub metrics: MetricsServing,
    pub conntrack_max: u32,
    pub fragments_max: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Which of the three sizes above were given rather than defaults.
    pub sizes_asked: crate::dataplane::SizesAsked,
    /// Detach on SIGTERM too (SIGINT always detaches).
    pub detach_on_exit: bool,
}
