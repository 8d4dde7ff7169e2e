//! What can go wrong when a router reads, validates or writes the routing objects of a Rollout.

/// A routing object that Serin cannot route with, with the object and the field path that say why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteInvalid {
    /// An object the Rollout names does not exist.
    #[error("{object}: not found (named by the Rollout's {named_by})")]
    Missing {
        /// Kind and namespace/name, e.g. `HTTPRoute shop/checkout`.
        object: String,
        /// The Rollout field that names it.
        named_by: &'static str,
    },
    /// The object exists but one of its fields does not let Serin route.
    #[error("{object}: {field}: {problem}")]
    Field {
        /// Kind and namespace/name, e.g. `HTTPRoute shop/checkout`.
        object: String,
        /// Path of the field in the object, e.g. `spec.rules[0].backendRefs`.
        field: String,
        problem: String,
    },
    /// The desired traffic asks for something this router cannot express.
    #[error("{router} router cannot {what}")]
    Unsupported { router: &'static str, what: String },
}

impl RouteInvalid {
    pub fn category(&self) -> &'static str {
        match self {
            RouteInvalid::Missing { .. } => "missing",
            RouteInvalid::Field { .. } => "invalid_field",
            RouteInvalid::Unsupported { .. } => "unsupported",
        }
    }

    pub(crate) fn field(
        object: &str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> RouteInvalid {
        RouteInvalid::Field {
            object: object.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Why [`crate::traffic::apply`] wrote nothing (or stopped before its next write).
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// `apply` was called for a Rollout without `spec.strategy.canary.trafficRouting`.
    #[error("Rollout {rollout} has no spec.strategy.canary.trafficRouting")]
    NoTrafficRouting { rollout: String },
    /// The Rollout has no namespace (it was not read from the API).
    #[error("Rollout {rollout} has no metadata.namespace")]
    RolloutNamespaceMissing { rollout: String },
    /// The routing objects do not let Serin route (missing, not referencing the Services, ...).
    #[error(transparent)]
    RouteInvalid(#[from] RouteInvalid),
    /// The canary Service does not exist, so no traffic may be sent to it.
    #[error("Service {namespace}/{service} (the canary Service) does not exist; no traffic is sent to it")]
    CanaryServiceMissing { namespace: String, service: String },
    /// Reading an object failed.
    #[error("reading {object}: {source}")]
    Read { object: String, source: kube::Error },
    /// The object changed between our read and our write; nothing of it was overwritten.
    #[error("{object} changed since it was read; not overwritten, the next reconcile retries")]
    Conflict { object: String },
    /// Writing an object failed.
    #[error("writing {object}: {source}")]
    Write { object: String, source: kube::Error },
    /// Encoding a patch failed (a bug, never the user's input).
    #[error("encoding the patch for {object}: {reason}")]
    EncodePatch { object: String, reason: String },
}

impl TrafficError {
    pub fn category(&self) -> &'static str {
        match self {
            TrafficError::NoTrafficRouting { .. } => "no_traffic_routing",
            TrafficError::RolloutNamespaceMissing { .. } => "rollout_namespace_missing",
            TrafficError::RouteInvalid(_) => "route_invalid",
            TrafficError::CanaryServiceMissing { .. } => "canary_service_missing",
            TrafficError::Read { .. } => "read",
            TrafficError::Conflict { .. } => "conflict",
            TrafficError::Write { .. } => "write",
            TrafficError::EncodePatch { .. } => "encode_patch",
        }
    }
}
