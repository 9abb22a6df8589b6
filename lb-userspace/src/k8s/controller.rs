//! Watches Services and EndpointSlices and turns them into xlb services for the agent.
//!
//! - Two kube-runtime reflectors keep the objects. Their watches resume from the last
//!   resourceVersion (bookmarks keep it fresh) and relist after 410 Gone; a relist
//!   replaces a store whole only when it is complete.
//! - Nothing is sent before both stores have listed once: a restarted agent must not
//!   program an empty set over the state the pinned maps still hold.
//! - Changes are debounced (`DEBOUNCE_QUIET` after the last event, at most
//!   `DEBOUNCE_MAX` after the first), and the agent applies only the difference.
//! - While the API server is unreachable the watches retry with backoff and the last
//!   state stays programmed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    events::EventWriter,
    sink::{KubernetesSink, Wanted},
    translate::{Cache, Options, Problem},
};
use crate::{
    model::{self, Desired},
    sink::Sink,
};

pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(2);
pub const DEBOUNCE_MAX: Duration = Duration::from_millis(200);

/// What the agent is sent: the services Kubernetes wants, each already checked against
/// the agent's base config on its own, as a change to the last update.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The names of every service Kubernetes wants now, oldest Service first.
    pub order: Vec<String>,
    /// The services new or changed since the last update (every one in the first).
    /// A name in `order` and not here is the last update's service, unchanged.
    pub changed: Vec<Arc<model::Service>>,
}

impl Update {
    /// The services `order` names: `changed`, else `last`'s of that name.
    pub fn services(&self, last: &[Arc<model::Service>]) -> Vec<Arc<model::Service>> {
        let changed: BTreeMap<&str, &Arc<model::Service>> =
            self.changed.iter().map(|s| (s.name.as_str(), s)).collect();
        let last: BTreeMap<&str, &Arc<model::Service>> =
            last.iter().map(|s| (s.name.as_str(), s)).collect();
        self.order
            .iter()
            .filter_map(|n| {
                changed
                    .get(n.as_str())
                    .or_else(|| last.get(n.as_str()))
                    .map(|s| Arc::clone(s))
            })
            .collect()
    }
}

/// Starts the controller. `base` is the agent's config file as it stands, followed
/// through reloads (a channel, never a copy taken here): what a service is checked
/// against (SNAT, table size), the services the file already holds (a Kubernetes
/// service at one of their VIP, port and protocol is left out, with an Event), and the
/// room they leave. `max_services` is what the service map holds, the file's services
/// included.
pub fn spawn(
    client: Client,
    events: EventWriter,
    opts: Options,
    base: watch::Receiver<Desired>,
    max_services: usize,
) -> mpsc::UnboundedReceiver<Update> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(client, events, opts, base, max_services, tx));
    rx
}

enum Change {
    Services(bool),
    Slices(bool),
    Nodes(bool),
    Failed(String),
}

async fn run(
    client: Client,
    events: EventWriter,
    opts: Options,
    mut base_rx: watch::Receiver<Desired>,
    max_services: usize,
    tx: mpsc::UnboundedSender<Update>,
) {
    let base = base_rx.borrow_and_update().clone();
    let (svc_store, svc_writer) = reflector::store::<Service>();
    let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
    let wcfg = watcher::Config::default();
    let svc_events = watcher(Api::<Service>::all(client.clone()), wcfg.clone())
        .default_backoff()
        .reflect(svc_writer)
        .map(|e| match e {
            Ok(ev) => Change::Services(matches!(ev, watcher::Event::InitDone)),
            Err(e) => Change::Failed(format!("Services: {e}")),
        });
    let eps_events = watcher(Api::<EndpointSlice>::all(client.clone()), wcfg.clone())
        .default_backoff()
        .reflect(eps_writer)
        .map(|e| match e {
            Ok(ev) => Change::Slices(matches!(ev, watcher::Event::InitDone)),
            Err(e) => Change::Failed(format!("EndpointSlices: {e}")),
        });
    // Nodes: their addresses, where dsr across nodes sends an endpoint's packets.
    let (node_store, node_writer) = reflector::store::<Node>();
    let node_events = watcher(Api::<Node>::all(client.clone()), wcfg)
        .default_backoff()
        .reflect(node_writer)
        .map(|e| match e {
            Ok(ev) => Change::Nodes(matches!(ev, watcher::Event::InitDone)),
            Err(e) => Change::Failed(format!("Nodes: {e}")),
        });
    let mut changes = std::pin::pin!(stream::select(
        stream::select(svc_events, eps_events),
        node_events
    ));
    let mut state = State {
        sink: KubernetesSink::new(client, events),
        opts,
        base,
        max_services,
        cache: Cache::default(),
        checks: BTreeMap::new(),
        checked_snat: Vec::new(),
        sent: None,
        tx,
    };
    let (mut svc_listed, mut eps_listed, mut nodes_listed) = (false, false, false);
    let mut first_change: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut api_down = false;
    loop {
        let deadline =
            first_change.map(|first| (last_change + DEBOUNCE_QUIET).min(first + DEBOUNCE_MAX));
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            change = changes.next() => {
                let Some(change) = change else { return };
                match change {
                    Change::Services(done) => svc_listed |= done,
                    Change::Slices(done) => eps_listed |= done,
                    Change::Nodes(done) => nodes_listed |= done,
                    Change::Failed(e) => {
                        if !api_down {
                            warn!("Kubernetes API watch failed, keeping the last state and retrying: {e}");
                        }
                        api_down = true;
                        continue;
                    }
                }
                if api_down {
                    info!("Kubernetes API watch is back");
                    api_down = false;
                }
                if svc_listed && eps_listed && nodes_listed {
                    debug!("API change received");
                    last_change = Instant::now();
                    first_change.get_or_insert(last_change);
                }
            }
            () = sleep => {
                first_change = None;
                state.sync(&svc_store, &eps_store, &node_store).await;
            }
            // The file was reloaded: check and size the services against it again.
            Ok(()) = base_rx.changed() => {
                state.base = base_rx.borrow_and_update().clone();
                if svc_listed && eps_listed && nodes_listed {
                    last_change = Instant::now();
                    first_change.get_or_insert(last_change);
                }
            }
        }
    }
}

/// The services last sent to the agent: their names in order, and each by name.
type Sent = (Vec<String>, BTreeMap<String, Arc<model::Service>>);

struct State {
    opts: Options,
    base: Desired,
    max_services: usize,
    /// The last translation, kept: a change translates the Services it touches.
    cache: Cache,
    /// Each service's check on its own, against `checked_snat`, as last made: made
    /// again when the translation made the service again or the SNAT addresses moved.
    checks: BTreeMap<String, Result<(), String>>,
    checked_snat: Vec<IpAddr>,
    /// What the agent was last sent: the services in order, by name.
    sent: Option<Sent>,
    /// What is written back to the API and served for it: status, Events, health ports.
    sink: KubernetesSink,
    tx: mpsc::UnboundedSender<Update>,
}

impl State {
    async fn sync(
        &mut self,
        svcs: &Store<Service>,
        slices: &Store<EndpointSlice>,
        nodes: &Store<Node>,
    ) {
        let svcs = svcs.state();
        let slices = slices.state();
        let nodes = nodes.state();
        let svc_refs: Vec<&Service> = svcs.iter().map(|s| s.as_ref()).collect();
        let slice_refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
        let node_refs: Vec<&Node> = nodes.iter().map(|s| s.as_ref()).collect();
        let t = std::time::Instant::now();
        let mut desired = self
            .cache
            .translate(&svc_refs, &slice_refs, &node_refs, &self.opts);
        debug!(
            services = desired.services.len(),
            translated = desired.fresh.len(),
            ms = t.elapsed().as_millis() as u64,
            "Kubernetes objects translated"
        );

        // Checked one by one, so one bad Service cannot block the others; a file
        // service's VIP, port and protocol stay the file's.
        let taken: BTreeSet<_> = self
            .base
            .services
            .iter()
            .map(model::Service::slot)
            .collect();
        let snat = self.base.settings.snat.addresses();
        if snat != self.checked_snat {
            self.checks.clear();
            self.checked_snat = snat.clone();
        }
        let mut services = Vec::with_capacity(desired.services.len());
        for s in std::mem::take(&mut desired.services) {
            let checked = if taken.contains(&s.slot()) {
                Err(format!(
                    "{}:{}/{} is a service of the config file, which keeps it",
                    s.vip,
                    s.port,
                    s.protocol.name()
                ))
            } else {
                if desired.fresh.contains(&s.name) || !self.checks.contains_key(&s.name) {
                    let c = model::validate::services(std::slice::from_ref(&*s), &snat)
                        .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
                    self.checks.insert(s.name.clone(), c);
                }
                self.checks[&s.name].clone()
            };
            match checked {
                Ok(()) => services.push(s),
                Err(e) => {
                    if let Some(c) = svcs.iter().find(|c| s.name.starts_with(&sref_prefix(c))) {
                        desired.problems.push(Problem {
                            service: super::translate::service_ref_of(c),
                            reason: "InvalidService",
                            message: format!("{}: {e}", s.name),
                        });
                    }
                }
            }
        }
        if self.checks.len() > self.cache.len() * 4 + 64 {
            let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
            self.checks.retain(|n, _| names.contains(n.as_str()));
        }
        if services.len() + self.base.services.len() > self.max_services {
            let room = self.max_services.saturating_sub(self.base.services.len());
            warn!(
                wanted = services.len(),
                room, "more Service ports than the maps hold; serving the oldest"
            );
            services.truncate(room);
        }
        if let Some(update) = self.update(services) {
            debug!(
                services = update.order.len(),
                changed = update.changed.len(),
                "sending Kubernetes services to the agent"
            );
            let _ = self.tx.send(update);
        }
        let wanted = Wanted {
            status: desired.status,
            problems: desired.problems,
            health_ports: desired.health_ports,
        };
        if let Ok(written) = self.sink.apply(&wanted).await {
            debug!(?written, "Kubernetes sink applied");
        }
    }

    /// What the agent must be told of `services`, if anything: the first time every
    /// one, then those that differ from what it was last sent (the same service made
    /// again by the translation is compared by content).
    fn update(&mut self, services: Vec<Arc<model::Service>>) -> Option<Update> {
        let order: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let changed: Vec<Arc<model::Service>> = match &self.sent {
            None => services.clone(),
            Some((_, last)) => services
                .iter()
                .filter(|s| {
                    last.get(&s.name)
                        .is_none_or(|l| !Arc::ptr_eq(l, s) && **l != ***s)
                })
                .cloned()
                .collect(),
        };
        let first = self.sent.is_none();
        let same_order = self.sent.as_ref().is_some_and(|(o, _)| *o == order);
        let by_name = services.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.sent = Some((order.clone(), by_name));
        if !first && same_order && changed.is_empty() {
            return None;
        }
        Some(Update { order, changed })
    }
}

fn sref_prefix(svc: &Service) -> String {
    format!(
        "{}/{}:",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, Protocol, SessionAffinity};

    fn svc(name: &str, port: u16) -> Arc<model::Service> {
        Arc::new(model::Service {
            name: name.into(),
            vip: "192.0.2.1".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            mode: Mode::Nat,
            backends: vec![],
            session_affinity: SessionAffinity::None,
            health_check: None,
            encapsulated: false,
            allow: vec![],
            conntrack: true,
        })
    }

    /// An update names every service and carries only the changed ones: the agent
    /// rebuilds the list from its last one, in the update's order.
    #[test]
    fn an_update_is_the_last_list_with_its_changes() {
        let last = vec![svc("a", 1), svc("b", 2), svc("c", 3)];
        let b2 = svc("b", 20);
        let u = Update {
            order: vec!["d".into(), "b".into(), "a".into()],
            changed: vec![b2.clone(), svc("d", 4)],
        };
        let now = u.services(&last);
        let names: Vec<&str> = now.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["d", "b", "a"]);
        assert!(Arc::ptr_eq(&now[1], &b2));
        assert!(Arc::ptr_eq(&now[2], &last[0]), "unchanged: the same");
    }
}
