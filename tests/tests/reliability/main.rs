//! Issue 9: reliability under faults. Each module injects one kind of fault
//! (server restarts, a cluster node lost, agent crashes, an offline boot,
//! floods, status conflicts, power loss, lost hints) into real agents and a
//! real nats-server, a bounded number of times, and checks what survives.
//!
//! Run with `cargo test -p harmony-e2e --test reliability` (the agent
//! binary must be built: `cargo build --workspace --bins`).

mod bad_input;
mod cluster;
mod crashes;
mod flood;
mod hints_lost;
mod offline_boot;
mod power_loss;
mod server_restarts;
mod status_conflicts;
