//! The repository server: stores versions and content-addressed blobs, serves them
//! to agents over HTTP, and keeps the fleet registry.
//!
//! [`Repository`] holds the rules (what makes a commit acceptable, how manifests are
//! folded from changesets) and does blocking I/O; [`serve`] exposes it over HTTP and
//! keeps that I/O off the async threads. Image building is not here yet.
//!
//! Architecture invariants: every version is validated against its parent's manifest
//! before the log records it; nothing is acknowledged to a client before it is
//! durable (blobs synced, log committed); request bodies that may be large (packs)
//! are streamed, never buffered whole.

mod agents;
mod error;
mod http;
mod repository;
mod streaming;

pub use agents::{validate_agent_name, MAX_AGENT_NAME_LEN};
pub use error::RepoError;
pub use http::{router, serve, DEFAULT_HEAD_WAIT, JSON_BODY_LIMIT, MAX_HEAD_WAIT};
pub use repository::{Repository, MAX_CHANGESET_BLOB_LEN};
