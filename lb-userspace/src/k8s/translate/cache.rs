//! The translation kept between changes: a Service's piece (`serve`: its xlb services,
//! problems and health port) is made again only when what it is made from changed. An
//! EndpointSlice change at 1,000 Services then translates one Service, not 1,000.
//!
//! What is compared, whole (not hashed: a collision would leave a change unserved):
//! the Service's resourceVersion, its VIPs as conflicts and pools left them, its
//! EndpointSlices' names and resourceVersions, and the nodes' addresses (a generation
//! number, moved when any changed). An object without a resourceVersion is translated
//! every time. The rest of a translation (conflicts between Services, the pools, the
//! status to write) is made whole each time: it reads a few fields per Service.

use super::*;

/// What one Service's piece was made from.
#[derive(Debug, PartialEq, Eq)]
struct Inputs {
    resource_version: String,
    vips: (Vec<IpAddr>, Vec<IpAddr>),
    slices: Vec<(String, String)>,
    nodes: u64,
}

/// One `Options` for the cache's life (the controller's): they are not compared.
#[derive(Debug, Default)]
pub struct Cache {
    /// By the Service's uid.
    pieces: BTreeMap<String, (Option<Inputs>, Piece)>,
    /// The Services of the translation under way.
    seen: BTreeSet<String>,
    /// The names of the services made again by the translation under way.
    fresh: BTreeSet<String>,
    nodes: BTreeMap<String, Vec<IpAddr>>,
    nodes_generation: u64,
}

impl Cache {
    /// `translate`, making again only the pieces whose inputs changed since the last
    /// call; the services of the others are the last call's, shared.
    pub fn translate(
        &mut self,
        services: &[&Service],
        slices: &[&EndpointSlice],
        nodes: &[&Node],
        opts: &Options,
    ) -> Translated {
        translate_cached(self, services, slices, nodes, opts)
    }

    /// Starts a translation with these node addresses.
    pub(super) fn begin(&mut self, node_addrs: &BTreeMap<String, Vec<IpAddr>>) {
        if *node_addrs != self.nodes {
            self.nodes = node_addrs.clone();
            self.nodes_generation += 1;
        }
        self.seen.clear();
        self.fresh.clear();
    }

    /// The piece of one Service: kept, or made again.
    pub(super) fn piece(
        &mut self,
        c: &Candidate,
        my_slices: &[&EndpointSlice],
        node_addrs: &BTreeMap<String, Vec<IpAddr>>,
        opts: &Options,
    ) -> &Piece {
        let key = if c.sref.uid.is_empty() {
            format!("{}", c.sref)
        } else {
            c.sref.uid.clone()
        };
        let slices: Option<Vec<(String, String)>> = my_slices
            .iter()
            .map(|s| {
                Some((
                    s.metadata.name.clone()?,
                    s.metadata.resource_version.clone()?,
                ))
            })
            .collect();
        let inputs = match slices {
            Some(slices) if !c.sref.resource_version.is_empty() => Some(Inputs {
                resource_version: c.sref.resource_version.clone(),
                vips: (c.status_vips.clone(), c.external_vips.clone()),
                slices,
                nodes: self.nodes_generation,
            }),
            _ => None,
        };
        self.seen.insert(key.clone());
        let kept = self
            .pieces
            .get(&key)
            .is_some_and(|(was, _)| was.is_some() && *was == inputs);
        if !kept {
            let piece = serve(c, my_slices, node_addrs, opts);
            self.fresh
                .extend(piece.services.iter().map(|s| s.name.clone()));
            self.pieces.insert(key.clone(), (inputs, piece));
        }
        &self.pieces[&key].1
    }

    /// Ends a translation: the pieces of Services gone are dropped. Returns the names
    /// of the services made again.
    pub(super) fn done(&mut self) -> BTreeSet<String> {
        let seen = std::mem::take(&mut self.seen);
        self.pieces.retain(|k, _| seen.contains(k));
        std::mem::take(&mut self.fresh)
    }

    /// How many Services' pieces are kept.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
}
