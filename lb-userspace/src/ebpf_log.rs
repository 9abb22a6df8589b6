//! The XDP program's aya-log records, forwarded into tracing as `xlb::ebpf` events.
//!
//! The eBPF side only logs when its `AYA_LOG_LEVEL` global allows, and that global
//! is fixed at load time from our tracing filter: with the default filter it is 0,
//! the verifier prunes every log call, and the hot path pays nothing. Turn it on with
//! `RUST_LOG=info,xlb::ebpf=debug` (flows xlb handles) or `=trace` (every packet).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use aya::Ebpf;
use aya_log::EbpfLogger;
use lb_common::StatIndex;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{debug, trace, warn, Level};

/// The target the program's records are logged under.
pub const TARGET: &str = "xlb::ebpf";

/// `AYA_LOG_LEVEL` for the program's per-packet records (the lowest that logs them).
/// The program then takes every packet through its pipeline, not its fast path.
pub const LEVEL_DEBUG: u8 = aya_log::Level::Debug as u8;

/// The `AYA_LOG_LEVEL` value matching what the tracing filter enables for
/// [`TARGET`]: 0 (off), or aya-log's Level number (Debug = 4, Trace = 5).
pub fn level_from_filter() -> u8 {
    if tracing::enabled!(target: "xlb::ebpf", Level::TRACE) {
        aya_log::Level::Trace as u8
    } else if tracing::enabled!(target: "xlb::ebpf", Level::DEBUG) {
        LEVEL_DEBUG
    } else {
        0
    }
}

/// Forwards each record to tracing, with the reason's counter name restored.
struct TracingBridge {
    reasons: BTreeMap<String, &'static str>,
    records: Arc<AtomicU64>,
}

impl log::Log for TracingBridge {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        self.records.fetch_add(1, Ordering::Relaxed);
        let msg = unmap_v4(&name_reason(&record.args().to_string(), &self.reasons));
        match record.level() {
            log::Level::Trace => trace!(target: "xlb::ebpf", "{msg}"),
            log::Level::Debug => debug!(target: "xlb::ebpf", "{msg}"),
            _ => warn!(target: "xlb::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// `... reason=10` → `... reason=pass_not_vip`.
fn name_reason(msg: &str, reasons: &BTreeMap<String, &'static str>) -> String {
    match msg.rsplit_once("reason=") {
        Some((head, idx)) => match reasons.get(idx.trim()) {
            Some(name) => format!("{head}reason={name}"),
            None => msg.to_owned(),
        },
        None => msg.to_owned(),
    }
}

/// `[::ffff:10.0.0.1]:80` → `10.0.0.1:80`: the program writes IPv4 IPv4-mapped so that
/// one log format serves both families.
fn unmap_v4(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(start) = rest.find("[::ffff:") {
        let after = &rest[start + "[::ffff:".len()..];
        match after.find(']') {
            Some(end) if after[..end].parse::<std::net::Ipv4Addr>().is_ok() => {
                out.push_str(&rest[..start]);
                out.push_str(&after[..end]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(&rest[..start + 1]);
                rest = &rest[start + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Starts forwarding the program's log records, if logging is on. Returns the count
/// of records forwarded so far, for tests and status.
pub fn spawn(ebpf: &mut Ebpf, level: u8) -> anyhow::Result<Option<Arc<AtomicU64>>> {
    if level == 0 {
        return Ok(None);
    }
    let records = Arc::new(AtomicU64::new(0));
    let reasons = StatIndex::ALL
        .iter()
        .map(|r| ((*r as u32).to_string(), r.name()))
        .collect();
    let bridge = TracingBridge {
        reasons,
        records: records.clone(),
    };
    let logger = EbpfLogger::init_with_logger(ebpf, bridge)?;
    // SAFETY: the logger owns the ring buffer's fd and keeps it open, unreplaced,
    // for as long as the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE)? };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                warn!("the eBPF log ring buffer can no longer be polled; eBPF logs stop");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(Some(records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_index_becomes_its_name() {
        let reasons: BTreeMap<_, _> = StatIndex::ALL
            .iter()
            .map(|r| ((*r as u32).to_string(), r.name()))
            .collect();
        let idx = StatIndex::FwdForward as u32;
        let got = name_reason(
            &format!("xdp 10.0.0.1:5 -> 10.0.0.2:80 proto=6 action=3 reason={idx}"),
            &reasons,
        );
        assert_eq!(
            got,
            format!(
                "xdp 10.0.0.1:5 -> 10.0.0.2:80 proto=6 action=3 reason={}",
                StatIndex::FwdForward.name()
            )
        );
        assert_eq!(name_reason("reason=9999", &reasons), "reason=9999");
        assert_eq!(
            unmap_v4("xdp [::ffff:10.0.0.1]:5 -> [::ffff:10.0.0.2]:80 proto=6"),
            "xdp 10.0.0.1:5 -> 10.0.0.2:80 proto=6"
        );
        assert_eq!(
            unmap_v4("xdp [fd00::1]:5 -> [::ffff:zz]:80"),
            "xdp [fd00::1]:5 -> [::ffff:zz]:80"
        );
        assert_eq!(name_reason("no reason here", &reasons), "no reason here");
    }
}
