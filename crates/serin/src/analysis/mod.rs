//! Analysis: templates to runs (`run_spec`), safe arguments (`args`), CEL conditions (`condition`), the pure
//! verdict rules (`verdict`), Prometheus measurements (`prometheus`, `builtin`), where Serin may send them
//! (`outbound`), which runs may read Secrets (`secret_access`) and the AnalysisRun controller (`runner`).

pub mod args;
pub mod builtin;
pub mod condition;
pub mod outbound;
pub mod prometheus;
pub mod run_spec;
pub mod runner;
pub mod secret_access;
pub mod verdict;

pub use run_spec::{build_run_spec, AnalysisRequest, RunSpecError, TemplateKey, TemplateSource};
pub use runner::{advance, spawn, spawn_with, Measurer, RunnerConfig, RunnerHandle, StaticSecrets};
