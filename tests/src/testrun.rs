//! BPF_PROG_TEST_RUN through aya's `TestRun`: run one crafted frame through the real
//! XDP program in the kernel and get back the verdict and the bytes it left.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::PROGRAM_NAME;
use xlb::{
    config::Config,
    dataplane::{ApplySummary, Dataplane},
};

use crate::unique_name;

/// XDP verdicts, as the kernel returns them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The program loaded (not attached) with its own maps, pinned in a private directory
/// that is removed on drop.
pub struct Fixture {
    pub dp: Dataplane,
    pin: PathBuf,
    /// Leave the pins when dropped (`keep_pins`).
    keep: bool,
}

#[derive(Debug)]
pub struct RunResult {
    pub verdict: u32,
    pub data: Vec<u8>,
    pub duration: std::time::Duration,
}

impl Fixture {
    pub fn new() -> Result<Self> {
        Self::with_options(&Default::default())
    }

    /// Loaded with map sizes of the caller's choice.
    pub fn with_options(opts: &xlb::dataplane::LoadOptions) -> Result<Self> {
        let pin = PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("xlbt")));
        Self::on_pins(pin, opts)
    }

    /// Loaded on pins another fixture left (`keep_pins`), as a restarted agent loads
    /// on its predecessor's; removed on drop.
    pub fn on_pins(pin: PathBuf, opts: &xlb::dataplane::LoadOptions) -> Result<Self> {
        // A failed load may already have pinned maps: remove them, there is no Fixture
        // to drop.
        let dp = Dataplane::load(&pin, opts).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&pin);
        })?;
        Ok(Self {
            dp,
            pin,
            keep: false,
        })
    }

    /// Drops the program and the pin lock but leaves the pinned maps, for `on_pins`.
    pub fn keep_pins(mut self) -> PathBuf {
        self.keep = true;
        self.pin.clone()
    }

    pub fn pin_path(&self) -> &std::path::Path {
        &self.pin
    }

    /// Programs `cfg` into the fixture's maps (see [`apply`]).
    pub fn apply(&mut self, cfg: &Config) -> Result<ApplySummary> {
        apply(&mut self.dp, cfg)
    }

    fn program(&mut self) -> Result<&mut Xdp> {
        self.named_program(PROGRAM_NAME)
    }

    fn named_program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .dp
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    /// Runs `frame` through the XDP_PASS baseline program (loaded on first use), as if
    /// it arrived on `ifindex`: the reference for per-packet cost.
    pub fn run_baseline_on(&mut self, frame: &[u8], ifindex: u32) -> Result<RunResult> {
        let prog = self.named_program(BASELINE_PROGRAM)?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        run_program(prog, frame, 1, Some(ifindex))
    }

    /// Runs `frame` through the TC egress program (loaded on first use), as a packet
    /// leaving the host. Returns the TC verdict and the packet as it leaves.
    pub fn run_egress(&mut self, frame: &[u8]) -> Result<RunResult> {
        let prog: &mut aya::programs::SchedClassifier = self
            .dp
            .ebpf
            .program_mut("xlb_egress")
            .context("no program xlb_egress")?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN (egress)")?;
        out.truncate(res.data_size_out as usize);
        Ok(RunResult {
            verdict: res.return_value,
            data: out,
            duration: res.duration,
        })
    }

    /// Runs `frame` once through the program.
    pub fn run(&mut self, frame: &[u8]) -> Result<RunResult> {
        self.run_repeat(frame, 1)
    }

    /// Runs `frame` `repeat` times (the kernel reports the mean duration). Beware: the
    /// program sees its own output from the second run on (see docs/datapath.md).
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<RunResult> {
        self.run_full(frame, repeat, None)
    }

    /// Runs `frame` as if it arrived on interface `ifindex` (of the calling thread's
    /// network namespace), so that bpf_fib_lookup routes it from there.
    pub fn run_on(&mut self, frame: &[u8], ifindex: u32) -> Result<RunResult> {
        self.run_full(frame, 1, Some(ifindex))
    }

    fn run_full(&mut self, frame: &[u8], repeat: u32, ifindex: Option<u32>) -> Result<RunResult> {
        run_program(self.program()?, frame, repeat, ifindex)
    }

    /// [`Fixture::run_on`] through a shared reference, for threads that run packets at
    /// once (BPF_PROG_TEST_RUN runs the program on the calling thread's CPU).
    pub fn run_shared_on(&self, frame: &[u8], ifindex: u32) -> Result<RunResult> {
        let prog: &Xdp = self
            .dp
            .ebpf
            .program(PROGRAM_NAME)
            .with_context(|| format!("no program {PROGRAM_NAME}"))?
            .try_into()?;
        run_program(prog, frame, 1, Some(ifindex))
    }
}

/// Programs `cfg` into `dp`'s maps. Every test and bench that applies a config to a
/// `Dataplane` of its own does it through here: the one place to change when
/// `Dataplane::apply` changes.
pub fn apply(dp: &mut Dataplane, cfg: &Config) -> Result<ApplySummary> {
    dp.apply(&cfg.desired())
}

/// The XDP_PASS program in the same object (see lb-ebpf's main.rs).
pub const BASELINE_PROGRAM: &str = "xlb_baseline_pass";

fn run_program(prog: &Xdp, frame: &[u8], repeat: u32, ifindex: Option<u32>) -> Result<RunResult> {
    // Room for encapsulation the program might add later.
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex.unwrap_or(0), 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    if ifindex.is_some() {
        opts.ctx_in = Some(&ctx);
    }
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok(RunResult {
        verdict: res.return_value,
        data: out,
        duration: res.duration,
    })
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}
