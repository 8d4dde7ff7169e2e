//! Serin: a progressive-delivery operator for Kubernetes (canary and blue-green rollouts with analysis).
//! This crate is the product: the API types, the planner, the traffic routers, analysis, the controller and
//! the user operations behind the CLI. It knows nothing of the simulated cluster it is tested on.

pub mod analysis;
pub mod controller;
pub mod crd;
pub mod events;
pub mod ops;
pub mod strategy;
pub mod traffic;

/// Picks rustls' process-wide crypto provider. The operator links both `ring` (kube) and `aws-lc-rs`
/// (reqwest), and with two candidates rustls refuses to choose one itself and panics on first use.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
