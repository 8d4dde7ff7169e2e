//! Analysis: templates to runs, Prometheus measurements, and the pure verdict rules.

pub mod args;
pub mod condition;
pub mod run_spec;
pub mod verdict;
