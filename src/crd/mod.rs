//! Custom resource types (`serin.dev/v1alpha1`): Rollout, AnalysisTemplate, ClusterAnalysisTemplate, AnalysisRun.
