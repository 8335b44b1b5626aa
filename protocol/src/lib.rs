//! Wire types shared by the gManager (in the operator) and the workers. JSON over HTTP, with the
//! cluster token as a bearer token; the hot path between workers is binary and lives in the
//! worker crate. `secret` holds the one token comparison both sides use.

pub mod gmanager;
pub mod secret;
