//! Replication client (in progress).
