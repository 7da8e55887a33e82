//! The tests of one binary run on parallel threads, and every agent sees the whole host.
//! A few tests must not share the machine with the rest of their binary: timing tests (a
//! busy neighbour on 2 cores stretches their sleeps across a bucket bound) and load tests
//! (thousands of sockets and a burst of handshakes). Those hold [`exclusive`]; the others of
//! such a binary hold [`shared`], so they still run in parallel among themselves.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

static MACHINE: RwLock<()> = RwLock::new(());

/// Runs alongside the other `shared` tests of this binary, never beside an `exclusive` one.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(PoisonError::into_inner)
}

/// Runs alone among this binary's tests that hold a guard.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(PoisonError::into_inner)
}
