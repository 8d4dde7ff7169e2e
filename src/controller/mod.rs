//! The reconciler: observe the cluster, call the pure planner, apply its actions in safe order, write status.
pub mod leader;
