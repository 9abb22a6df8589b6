//! The static YAML config (see docs/design.md) and its validation. A file is accepted whole
//! or rejected whole; every error names the file, and the field by its path.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lb_common::MAGLEV_MAX_TABLE_SIZE;

use crate::{
    maglev,
    model::{self, not_unicast, Place},
};

mod locate;
mod schema;
#[cfg(test)]
mod tests;

use locate::{describe_parse_error, Located};
pub use schema::{
    parse_file_source_range, Announce, BackendConfig, Config, L2Announce, RoutesAnnounce,
    ServiceConfig,
};

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

/// Whether a YAML text holds no document content: blank lines, comments and document
/// markers only.
fn is_empty_document(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

/// What changes when a file at `path` is written or replaced: its identity, size and
/// times (of what a symlink points at). None when it cannot be read.
pub fn fingerprint(path: &Path) -> Option<(u64, u64, u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
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
    let meta = file.metadata().with_context(cannot)?;
    check(&meta)?;
    // Sized once: a 3.4 MB file read into a growing buffer held twice its room.
    let mut bytes = Vec::with_capacity(meta.len().min(max_bytes) as usize + 1);
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
        // An empty file parses as the defaults, which serve nothing: almost always a
        // file cut or truncated by accident, and applied it would remove every service.
        // A config meant to serve nothing says so.
        if is_empty_document(text) {
            bail!("the file is empty (nothing but blank lines or comments): nothing applied; a config that serves nothing says `services: []`");
        }
        let mut cfg: Config = serde_saphyr::from_str_with_options(text, parse_options())
            .map_err(|e| anyhow::anyhow!("{}", describe_parse_error(&e, text, source)))?;
        // A list parsed grows by doubling: 100 backends take the room of 128. The file
        // is kept while it runs, beside the next one while that is read.
        for s in &mut cfg.services {
            s.backends.shrink_to_fit();
        }
        // Where things are, for the message, only once a check failed: parsing the
        // document a second time doubled the time of every load.
        if cfg.validate().is_err() {
            let located: Option<Located> =
                serde_saphyr::from_str_with_options(text, parse_options()).ok();
            cfg.validate_located(located.as_ref())?;
        }
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
                    "conntrack" => s.conntrack.as_ref(),
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
        let snat_addrs = self.snat.addresses();
        for a in &snat_addrs {
            if let Some(why) = not_unicast(*a) {
                bail!(
                    "{}field snat: {a} is {why}, not an address packets can come from",
                    top_line("snat")
                );
            }
        }
        // One service at a time: a model copy of 100,000 backends at once was a third of
        // a reload's memory.
        let mut set = model::validate::Set::new(&snat_addrs);
        self.services
            .iter()
            .try_for_each(|s| set.add(&s.to_model()))
            .map_err(|e| {
                let line = match e.place {
                    Place::Backend(j) => be_line(e.service, j),
                    Place::Vip => svc_line(e.service, "vip"),
                    Place::Port => svc_line(e.service, "port"),
                    Place::Allow => svc_line(e.service, "allow"),
                    Place::HealthCheck => svc_line(e.service, "health_check"),
                    Place::Conntrack => svc_line(e.service, "conntrack"),
                    Place::Name => svc_line(e.service, "name"),
                };
                anyhow::anyhow!("{line}{e}")
            })
    }

    /// The datapath's settings this file gives.
    pub fn settings(&self) -> model::Settings {
        model::Settings {
            snat: self.snat,
            maglev_table_size: self.maglev_table_size,
            timeouts: self.timeouts,
            decap: self.decap,
            flood_guard: self.flood_guard,
            icmp_echo: self.icmp_echo,
        }
    }

    /// The file as the model has it: its settings and its services.
    pub fn desired(&self) -> model::Desired {
        model::Desired {
            settings: self.settings(),
            services: self.services.iter().map(|s| s.to_model()).collect(),
            announce: Default::default(),
        }
    }
}
