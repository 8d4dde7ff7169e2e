//! The pure planner: decides, from a Rollout and an observed snapshot, what should change next.
