//! The simulated Kubernetes cluster: API server, workload and traffic simulators, fault injection.
pub mod patch;
pub mod schema;
