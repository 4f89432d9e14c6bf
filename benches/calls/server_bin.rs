//! `call-notifier-bench-server`: the calls bench's server role
//! (`server_role.rs`) as a binary of its own, built from the library with
//! the features the product is built with. The bench binary runs its server
//! role from its own build, whose dependencies carry the dev-dependencies'
//! features (tokio's `test-util` among them), and whose library is compiled
//! apart from the `call-notifier` binary's; this one shares the product's.
//! contrib/pgo-build trains the product's profile on it, and the generator
//! measures it when `CALL_NOTIFIER_BENCH_SERVER_EXE` names it.
//!
//! Built only with the `bench-server` feature, so neither `cargo install`
//! nor the package carries it: `cargo build --release --features
//! bench-server --bin call-notifier-bench-server`.

// The modules are the bench's own files; the generator's half of them
// (the role's variable, the report's readings) is unused here.
#[allow(dead_code)]
#[path = "polling.rs"]
mod polling;
#[allow(dead_code)]
#[path = "server_role.rs"]
mod server_role;
#[allow(dead_code)]
#[path = "sys.rs"]
mod sys;

fn main() -> std::process::ExitCode {
    server_role::main()
}
