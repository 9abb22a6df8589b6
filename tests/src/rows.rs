//! Datapath fixtures as rows, as Katran's KatranTestFixtures.h has them: each case a
//! row with its name, its map state (a config), the frames it sends and, per frame,
//! the verdict and the output expected. [`run`] runs every row of a table through
//! the real program (BPF_PROG_TEST_RUN, [`Fixture`]), each row on a fixture of its
//! own, and fails naming every row that failed, not only the first.
//!
//! A row's input is usually one frame; a case that is a short sequence (a flow then
//! its reply, a config change between two packets) is one row of several steps.

use std::{
    collections::BTreeMap,
    panic::{catch_unwind, AssertUnwindSafe},
};

use xlb::{
    config::Config,
    counters::{read_global_counters, CounterView},
};

use crate::testrun::{Fixture, RunResult, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// One case.
pub struct Row<'a> {
    name: String,
    config: Option<Config>,
    steps: Vec<Step<'a>>,
    totals: Vec<(&'static str, u64)>,
}

/// A check of the fixture between steps, given the results of the packets so far.
type FixtureCheck<'a> = Box<dyn Fn(&mut Fixture, &[RunResult]) + 'a>;

/// A check of what came out of a packet.
type OutputCheck<'a> = Box<dyn Fn(&[u8]) + 'a>;

enum Step<'a> {
    Packet(Packet<'a>),
    Apply(Box<Config>),
    Check(FixtureCheck<'a>),
}

/// One frame in, and what must come out of it.
pub struct Packet<'a> {
    note: &'static str,
    frame: Vec<u8>,
    ifindex: Option<u32>,
    egress: bool,
    verdict: Verdict,
    output: Output<'a>,
    moved: Vec<&'static str>,
    only_moved: bool,
}

/// The verdict expected.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    Any,
    Is(u32),
    /// BPF_PROG_TEST_RUN refuses the input.
    Refused,
}

enum Output<'a> {
    Any,
    /// The frame, byte for byte.
    Unchanged,
    Exact(Vec<u8>),
    Check(OutputCheck<'a>),
}

impl<'a> Row<'a> {
    /// A row with no map state yet: the program as loaded, no config applied.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            config: None,
            steps: Vec::new(),
            totals: Vec::new(),
        }
    }

    /// The map state the row starts from: `cfg` applied to a fresh fixture.
    pub fn config(mut self, cfg: Config) -> Self {
        self.config = Some(cfg);
        self
    }

    /// Sends a frame.
    pub fn packet(mut self, p: Packet<'a>) -> Self {
        self.steps.push(Step::Packet(p));
        self
    }

    /// Applies another config between two packets.
    pub fn apply(mut self, cfg: Config) -> Self {
        self.steps.push(Step::Apply(Box::new(cfg)));
        self
    }

    /// A check of the fixture (its maps, its counters) at this point, given the results
    /// of the packets sent so far.
    pub fn check(mut self, f: impl Fn(&mut Fixture, &[RunResult]) + 'a) -> Self {
        self.steps.push(Step::Check(Box::new(f)));
        self
    }

    /// Over the whole row, the global counter `name` moves by `packets`.
    pub fn total(mut self, name: &'static str, packets: u64) -> Self {
        self.totals.push((name, packets));
        self
    }

    fn run(self) {
        let mut f = Fixture::new().expect("loading the program");
        if let Some(cfg) = &self.config {
            f.apply(cfg).expect("applying the row's config");
        }
        let start = counters(&f);
        let mut results = Vec::new();
        for (k, step) in self.steps.into_iter().enumerate() {
            match step {
                Step::Packet(p) => {
                    if let Some(r) = p.run(&mut f, k) {
                        results.push(r);
                    }
                }
                Step::Apply(cfg) => {
                    f.apply(&cfg)
                        .unwrap_or_else(|e| panic!("step {k}: apply: {e:#}"));
                }
                Step::Check(check) => check(&mut f, &results),
            }
        }
        let end = counters(&f);
        for (name, want) in self.totals {
            assert_eq!(
                end[name].packets - start[name].packets,
                want,
                "counter {name} over the row"
            );
        }
    }
}

impl<'a> Packet<'a> {
    /// `frame`, run as if it arrived on no interface in particular.
    pub fn new(frame: Vec<u8>) -> Self {
        Self {
            note: "",
            frame,
            ifindex: None,
            egress: false,
            verdict: Verdict::Any,
            output: Output::Any,
            moved: Vec::new(),
            only_moved: false,
        }
    }

    /// `frame`, arriving on interface `ifindex` (of the thread's namespace).
    pub fn on(ifindex: u32, frame: Vec<u8>) -> Self {
        Self {
            ifindex: Some(ifindex),
            ..Self::new(frame)
        }
    }

    /// `frame`, leaving the host: through the TC egress program.
    pub fn egress(frame: Vec<u8>) -> Self {
        Self {
            egress: true,
            ..Self::new(frame)
        }
    }

    /// What the step shows, for its failure messages.
    pub fn note(mut self, note: &'static str) -> Self {
        self.note = note;
        self
    }

    /// The verdict must be `v` (XDP's, or TC's for [`Packet::egress`]).
    pub fn verdict(mut self, v: u32) -> Self {
        self.verdict = Verdict::Is(v);
        self
    }

    /// BPF_PROG_TEST_RUN must refuse the frame.
    pub fn refused(mut self) -> Self {
        self.verdict = Verdict::Refused;
        self
    }

    /// The frame must come out untouched.
    pub fn unchanged(mut self) -> Self {
        self.output = Output::Unchanged;
        self
    }

    /// These bytes must come out.
    pub fn output(mut self, bytes: Vec<u8>) -> Self {
        self.output = Output::Exact(bytes);
        self
    }

    /// What comes out must pass `check`.
    pub fn output_check(mut self, check: impl Fn(&[u8]) + 'a) -> Self {
        self.output = Output::Check(Box::new(check));
        self
    }

    /// Each of these global counters moves by one packet.
    pub fn moves(mut self, counters: &[&'static str]) -> Self {
        self.moved = counters.to_vec();
        self
    }

    /// Exactly these global counters move, each by one packet and the frame's length;
    /// no other counter moves.
    pub fn moves_only(mut self, counters: &[&'static str]) -> Self {
        self.moved = counters.to_vec();
        self.only_moved = true;
        self
    }

    fn run(self, f: &mut Fixture, k: usize) -> Option<RunResult> {
        let k = if self.note.is_empty() {
            k.to_string()
        } else {
            format!("{k} ({})", self.note)
        };
        let before = counters(f);
        let res = if self.egress {
            f.run_egress(&self.frame)
        } else if let Some(i) = self.ifindex {
            f.run_on(&self.frame, i)
        } else {
            f.run(&self.frame)
        };
        let res = match (res, self.verdict) {
            (Err(_), Verdict::Refused) => return None,
            (Ok(r), Verdict::Refused) => {
                panic!(
                    "step {k}: ran ({}), the run should be refused",
                    name(r.verdict)
                )
            }
            (Err(e), _) => panic!("step {k}: the run failed: {e:#}"),
            (Ok(r), _) => r,
        };
        match self.verdict {
            Verdict::Is(v) => assert!(
                res.verdict == v,
                "step {k}: verdict {}, want {}",
                name(res.verdict),
                name(v)
            ),
            Verdict::Any | Verdict::Refused => {}
        }
        match &self.output {
            Output::Any => {}
            Output::Unchanged => assert!(
                res.data == self.frame,
                "step {k}: the frame must come out untouched\n in:  {:02x?}\n out: {:02x?}",
                self.frame,
                res.data
            ),
            Output::Exact(want) => assert!(
                res.data == *want,
                "step {k}: output\n got:  {:02x?}\n want: {want:02x?}",
                res.data
            ),
            Output::Check(check) => check(&res.data),
        }
        let after = counters(f);
        for (name, c) in &after {
            let packets = c.packets - before[name].packets;
            let bytes = c.bytes - before[name].bytes;
            if self.moved.contains(name) {
                if self.only_moved {
                    assert_eq!(
                        (packets, bytes),
                        (1, self.frame.len() as u64),
                        "step {k}: counter {name} (packets, bytes)"
                    );
                } else {
                    assert_eq!(packets, 1, "step {k}: counter {name}");
                }
            } else if self.only_moved {
                assert_eq!(
                    packets, 0,
                    "step {k}: counter {name} moved but only {:?} should",
                    self.moved
                );
            }
        }
        Some(res)
    }
}

fn counters(f: &Fixture) -> BTreeMap<&'static str, CounterView> {
    read_global_counters(f.pin_path()).expect("reading the counters")
}

/// A verdict's name.
pub fn name(v: u32) -> String {
    match v {
        XDP_ABORTED => "XDP_ABORTED (or TC_ACT_OK)".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        v => format!("verdict {v}"),
    }
}

/// Runs every row, each on a fixture of its own; then, if any failed, fails naming each
/// failed row with its message.
pub fn run(rows: Vec<Row<'_>>) {
    let total = rows.len();
    let mut failed = Vec::new();
    for row in rows {
        let name = row.name.clone();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| row.run())) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            failed.push(format!("row {name:?}: {msg}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} rows failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
