//! Events on Services, written by a task of their own.
//!
//! Two reasons for the task and its per-note recorders:
//! - kube's `Recorder` folds a repeat into the first Event's series by reason, action
//!   and object, not by note. Two different problems of one reason on a Service, or two
//!   VIPs of one Service announced, would read as the first one repeated. One recorder
//!   per distinct note keeps them apart; the same note again is still a series.
//! - The agent's loop must not wait on the API server for a report: a slow or
//!   unreachable server would hold up reloads, health changes and the sweeps. Events
//!   are queued (bounded) and the loop goes on.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, Recorder, Reporter},
    Client,
};
use tokio::sync::mpsc;
use tracing::warn;

/// Events waiting to be written; past this, new ones are dropped (and said so).
const QUEUE: usize = 1024;
/// Recorders kept (one per distinct note); past this they are all let go, and a
/// repeat after that starts a new Event rather than a series.
const RECORDERS: usize = 4096;

#[derive(Clone)]
pub struct EventWriter {
    tx: mpsc::Sender<(Event, ObjectReference)>,
}

impl EventWriter {
    /// Starts the writing task on the current runtime.
    pub fn spawn(client: Client, node: Option<String>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let reporter = Reporter {
            controller: super::REPORTING_CONTROLLER.into(),
            instance: node,
        };
        tokio::spawn(write(client, reporter, rx));
        Self { tx }
    }

    /// Queues an Event on `regarding`; never waits.
    pub fn publish(&self, ev: Event, regarding: ObjectReference) {
        if let Err(e) = self.tx.try_send((ev, regarding)) {
            let (ev, r) = match e {
                mpsc::error::TrySendError::Full(x) | mpsc::error::TrySendError::Closed(x) => x,
            };
            warn!(
                service = r.name.as_deref().unwrap_or_default(),
                reason = ev.reason,
                "an Event was dropped: {QUEUE} are already waiting for the API server"
            );
        }
    }
}

async fn write(
    client: Client,
    reporter: Reporter,
    mut rx: mpsc::Receiver<(Event, ObjectReference)>,
) {
    let mut recorders: HashMap<(String, String, String, Option<String>), Recorder> = HashMap::new();
    while let Some((ev, regarding)) = rx.recv().await {
        let key = (
            regarding.namespace.clone().unwrap_or_default(),
            regarding.name.clone().unwrap_or_default(),
            ev.reason.clone(),
            ev.note.clone(),
        );
        if recorders.len() >= RECORDERS && !recorders.contains_key(&key) {
            recorders.clear();
        }
        let recorder = recorders
            .entry(key)
            .or_insert_with(|| Recorder::new(client.clone(), reporter.clone()));
        if let Err(e) = recorder.publish(&ev, &regarding).await {
            warn!(
                service = regarding.name.as_deref().unwrap_or_default(),
                reason = ev.reason,
                "could not create an Event: {e}"
            );
        }
    }
}
