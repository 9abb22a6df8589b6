//! The capabilities `xlb run` needs, checked before anything is loaded: without one,
//! the kernel answers EPERM from deep inside a map creation or a program load, which
//! names neither the capability nor what it was for.
//!
//! CAP_SYS_RESOURCE is not among them: since Linux 5.11 BPF memory is charged to the
//! cgroup, not to RLIMIT_MEMLOCK, and xlb needs TCX (6.6) anyway.

use anyhow::{bail, Context, Result};

pub struct Capability {
    pub name: &'static str,
    bit: u32,
    why: &'static str,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What `xlb run` needs; deploy/kubernetes/xlb.yaml grants exactly these.
pub const REQUIRED: [Capability; 3] = [
    Capability {
        name: "CAP_BPF",
        bit: CAP_BPF,
        why: "to create and pin the maps and load the programs",
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        why: "to attach XDP and TC programs and to write routes and neighbours",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        why: "for the verifier to accept the XDP program's packet access and to attach the redirect tracepoints",
    },
];

/// The required capabilities missing from an effective set. CAP_SYS_ADMIN stands in
/// for CAP_BPF and CAP_PERFMON, as it does in the kernel's own checks.
pub fn missing(effective: u64) -> Vec<&'static Capability> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    REQUIRED
        .iter()
        .filter(|c| {
            let covered_by_admin = c.bit != CAP_NET_ADMIN && has(CAP_SYS_ADMIN);
            !has(c.bit) && !covered_by_admin
        })
        .collect()
}

/// This process's effective capability set, from /proc/self/status.
pub fn effective() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_effective(&status).context("no CapEff line in /proc/self/status")
}

fn parse_effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Fails, naming each missing capability and what it is for, or a seccomp filter that
/// refuses bpf(2) although the capabilities are there.
pub fn check() -> Result<()> {
    let missing = missing(effective()?);
    if missing.is_empty() {
        return check_bpf_syscall();
    }
    let list: Vec<String> = missing
        .iter()
        .map(|c| format!("{} ({})", c.name, c.why))
        .collect();
    let all: Vec<&str> = REQUIRED.iter().map(|c| c.name).collect();
    bail!(
        "missing capabilit{} {}. xlb run needs {} (in Kubernetes, the DaemonSet's securityContext adds exactly these; with podman or docker, --cap-add each)",
        if missing.len() == 1 { "y" } else { "ies" },
        list.join(", "),
        all.join(", ")
    )
}

/// Creates (and closes) a one-entry array map: the cheapest bpf(2) call that needs
/// CAP_BPF. Container runtimes' default seccomp profiles (podman's among them) allow
/// bpf(2) only with CAP_SYS_ADMIN and answer EPERM otherwise, which looks like a
/// missing capability.
fn check_bpf_syscall() -> Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: attr is a valid, fully initialised prefix of bpf_attr of the size given
    // (the kernel zero-extends a shorter attribute).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd >= 0 {
        // SAFETY: fd is the map's descriptor, ours alone.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let filtered = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() == "2")
        })
        .unwrap_or(false);
    if err.raw_os_error() == Some(libc::EPERM) && filtered {
        bail!(
            "the bpf(2) system call is refused ({err}) although CAP_BPF is held: a seccomp filter blocks it (the default profiles of podman and of some container runtimes allow bpf(2) only with CAP_SYS_ADMIN). Run xlb without that filter: in Kubernetes securityContext.seccompProfile.type: Unconfined, as the DaemonSet sets; with podman --security-opt seccomp=unconfined"
        );
    }
    bail!("the bpf(2) system call is refused: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);

    fn names(eff: u64) -> Vec<&'static str> {
        missing(eff).iter().map(|c| c.name).collect()
    }

    #[test]
    fn each_required_capability_is_named_when_missing() {
        assert!(names(ALL).is_empty());
        assert_eq!(names(ALL & !(1 << CAP_BPF)), ["CAP_BPF"]);
        assert_eq!(names(ALL & !(1 << CAP_NET_ADMIN)), ["CAP_NET_ADMIN"]);
        assert_eq!(names(ALL & !(1 << CAP_PERFMON)), ["CAP_PERFMON"]);
        assert_eq!(names(0).len(), 3);
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon_but_not_net_admin() {
        assert!(names((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_empty());
        assert_eq!(names(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
    }

    #[test]
    fn reads_the_effective_set_from_proc_status() {
        let status = "Name:\txlb\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\n";
        assert_eq!(parse_effective(status), Some(ALL));
        assert_eq!(parse_effective("Name:\txlb\n"), None);
        // The running process has some set; reading it must not fail.
        effective().unwrap();
    }
}
