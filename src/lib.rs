//! Serin: a progressive-delivery operator for Kubernetes (canary and blue-green rollouts with analysis).
#![forbid(unsafe_code)]

pub mod analysis;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod demo;
pub mod sim;
pub mod strategy;
pub mod traffic;
