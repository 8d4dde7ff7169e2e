//! User commands (`status`, `promote`, `abort`, ...) that talk to the API server as a kubectl plugin.
