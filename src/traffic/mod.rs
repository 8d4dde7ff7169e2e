//! Traffic routers: pure desired-state builders for each backend plus thin apply adapters.

/// A header-based route to the canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRoute {
    /// Name from the `setHeaderRoute` step.
    pub name: String,
    /// All must match.
    pub matches: Vec<crate::crd::rollout::HeaderMatch>,
}

/// A mirror route: a share of requests copied to the canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRoute {
    /// Name from the `setMirrorRoute` step.
    pub name: String,
    /// Percentage of requests copied.
    pub percentage: i32,
}

/// What the router should carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTraffic {
    /// Service of the stable version.
    pub stable_service: String,
    /// Service of the canary version.
    pub canary_service: String,
    /// Percentage of traffic (0 to 100) to the canary Service; the rest goes to the stable Service.
    pub canary_weight: i32,
    /// Header routes in place, in step order.
    pub header_routes: Vec<HeaderRoute>,
    /// Mirror routes in place, in step order.
    pub mirror_routes: Vec<MirrorRoute>,
}

/// What the router observes in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ObservedTraffic {
    /// Weight the canary Service receives now.
    pub canary_weight: i32,
    /// Names of the Serin-managed header routes present.
    pub header_routes: Vec<String>,
    /// Names of the Serin-managed mirror routes present.
    pub mirror_routes: Vec<String>,
}
