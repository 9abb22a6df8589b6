//! Kubernetes mode: Services of type LoadBalancer, served from EndpointSlices.
//!
//! `translate` and `ipam` are pure functions of the API objects; `controller` watches
//! the API and feeds the agent; `sink` writes Service status and Events and serves the
//! health check node ports; `events` writes the Events, off the agent's loop;
//! `health_port` answers `externalTrafficPolicy: Local` health checks; `lease` makes
//! one node the L2 owner of each VIP.
pub mod controller;
pub mod events;
pub mod health_port;
pub mod ipam;
pub mod lease;
pub mod sink;
pub mod translate;

/// The controller name on every Event xlb records (`xlb uninstall` deletes them by it).
pub const REPORTING_CONTROLLER: &str = "xlb";
