//! Kubernetes mode: Services of type LoadBalancer, served from EndpointSlices.
pub mod ipam;
pub mod translate;
