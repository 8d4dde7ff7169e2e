//! The pure planner: decides, from a Rollout and an observed snapshot, what should change next.

pub mod types;

pub use types::{
    Action, AnalysisPurpose, Observed, ObservedAnalysisRun, ObservedReplicaSet, ObservedService,
    Plan, PlannedEvent, TemplateKey,
};
