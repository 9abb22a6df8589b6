//! The xlb agent: loads the XDP program, fills its maps, and reports on them.
//!
//! One module per concern: `cli` (arguments), `dataplane` (load, attach, pin, maps),
//! `maglev` (the table builder), `status` (reading the pinned maps back).

pub mod agent;
pub mod announce;
pub mod btf;
pub mod cli;
pub mod codec;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod dataplane;
pub mod ebpf_log;
pub mod flows;
pub mod fuzzing;
pub mod health;
pub mod k8s;
pub mod l2;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nexthop;
pub mod privileges;
pub mod sink;
pub mod source_ranges;
pub mod status;
pub mod uninstall;
pub mod vips;

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb"));

/// Where maps and links are pinned unless `--pin-path` says otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/xlb";
