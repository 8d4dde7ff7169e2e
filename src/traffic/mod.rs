//! Traffic routers: pure desired-state builders for each backend plus thin apply adapters.
