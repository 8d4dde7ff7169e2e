//! The simulated Kubernetes cluster: API server, workload and traffic simulators, fault injection.
pub mod traffic;
pub mod workload;
