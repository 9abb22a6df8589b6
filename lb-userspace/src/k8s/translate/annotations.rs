//! The `xlb.dev/...` annotations a Service may carry: a value that is not one of the
//! annotation's is a problem (an InvalidAnnotation Event), and the default applies.

use super::{
    Candidate, ClusterForwarding, Options, Problem, CONNTRACK_ANNOTATION, FORWARDING_ANNOTATION,
};

fn annotation<'a>(c: &'a Candidate, name: &str) -> Option<&'a str> {
    c.svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(String::as_str)
}

/// `xlb.dev/forwarding`: how a Cluster policy Service reaches other nodes' endpoints.
pub(super) fn forwarding(
    c: &Candidate,
    opts: &Options,
    problems: &mut Vec<Problem>,
) -> ClusterForwarding {
    match annotation(c, FORWARDING_ANNOTATION) {
        None => opts.cluster_forwarding,
        Some("dsr") => ClusterForwarding::Dsr,
        Some("nat") => ClusterForwarding::Nat,
        Some(other) => {
            problems.push(Problem {
                service: c.sref.clone(),
                reason: "InvalidAnnotation",
                message: format!(
                    "{FORWARDING_ANNOTATION}: {other:?} is neither dsr nor nat; using {:?}",
                    opts.cluster_forwarding
                ),
            });
            opts.cluster_forwarding
        }
    }
}

/// `xlb.dev/conntrack`: "false" makes the Service's services stateless.
pub(super) fn conntrack(c: &Candidate, problems: &mut Vec<Problem>) -> bool {
    match annotation(c, CONNTRACK_ANNOTATION) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            problems.push(Problem {
                service: c.sref.clone(),
                reason: "InvalidAnnotation",
                message: format!(
                    "{CONNTRACK_ANNOTATION}: {other:?} is neither \"true\" nor \"false\"; keeping conntrack on"
                ),
            });
            true
        }
    }
}
