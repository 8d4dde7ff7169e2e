//! Analysis: templates to runs, Prometheus measurements, and the pure verdict rules.
