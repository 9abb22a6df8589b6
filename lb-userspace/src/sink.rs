//! The shape every sink has. A sink owns one part of the world (the maps, the announced
//! routes, the L2 answers, the Kubernetes objects), keeps what it last applied there,
//! and brings it to a new desired state by writing the difference. The agent's loop
//! hands the maps, routes and L2 sinks the same `Desired`, in order: the maps first (a
//! VIP is served before it is announced). The Kubernetes sink (`k8s::sink`) takes the
//! Kubernetes-facing part of the state, which the controller's translation makes.

use crate::model::Desired;

#[allow(async_fn_in_trait)]
pub trait Sink<D = Desired> {
    /// What an apply changed, for the log and for Events.
    type Changes: std::fmt::Debug;

    /// Brings what this sink owns to `desired`. On error what was applied before stays
    /// (a sink never leaves half of a change it can undo).
    async fn apply(&mut self, desired: &D) -> anyhow::Result<Self::Changes>;
}
