//! Request and response bodies of the repository's HTTP API, and the pack framing
//! that carries blobs in both directions.
//!
//! A pack is a sequence of records, each a 40-byte [`PackHeader`] (hash, then the
//! uncompressed length as little-endian u64) followed by exactly one zstd frame
//! holding the blob. zstd frames end themselves, so a record needs no compressed
//! length and a sender can stream a file of many GiB without knowing how small it
//! will compress.

use serde::{Deserialize, Serialize};

use crate::Hash;

/// The limit on hashes in one `missing` or `fetch` request.
pub const MAX_HASHES_PER_REQUEST: usize = 10_000;

pub const PACK_HEADER_LEN: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackHeader {
    pub hash: Hash,
    pub len: u64,
}

impl PackHeader {
    pub fn encode(&self) -> [u8; PACK_HEADER_LEN] {
        let mut out = [0u8; PACK_HEADER_LEN];
        out[..32].copy_from_slice(&self.hash.0);
        out[32..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; PACK_HEADER_LEN]) -> PackHeader {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[..32]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[32..]);
        PackHeader {
            hash: Hash(hash),
            len: u64::from_le_bytes(len),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HashList {
    pub hashes: Vec<Hash>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackStored {
    pub stored: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Head {
    pub head: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    /// The version the changeset was computed against; `None` only for version 0.
    pub parent: Option<u64>,
    pub message: String,
    /// The changeset, already uploaded as a blob (JSON).
    pub changeset: Hash,
}

/// The length of the prefix that carries a [`CommitRequest`] in front of a pack.
pub const COMMIT_PREFIX_LEN_BYTES: usize = 4;

/// The start of a `POST /v1/versions/pack` body: the commit request as JSON,
/// preceded by its length (u32, little-endian). A pack follows, holding the blobs
/// the repository lacks (the changeset among them); the repository stores and syncs
/// them, then commits, so that a small push costs one round trip.
pub fn commit_prefix(request: &CommitRequest) -> Vec<u8> {
    // Serializing a struct of numbers, a string and a hash cannot fail.
    let json = serde_json::to_vec(request).unwrap_or_default();
    let mut prefix = Vec::with_capacity(COMMIT_PREFIX_LEN_BYTES + json.len());
    prefix.extend_from_slice(&(json.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&json);
    prefix
}

/// One version as the repository lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    pub parent: Option<u64>,
    /// Seconds since the Unix epoch at commit.
    pub time: u64,
    pub message: String,
    /// Entries that are not directories.
    pub files: u64,
    pub dirs: u64,
    pub deleted: u64,
    /// Sum of the content sizes the changeset refers to.
    pub bytes: u64,
    pub changeset: Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    Applied,
    Failed,
}

/// What an agent reports after trying a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub version: u64,
    pub status: OutcomeStatus,
    pub files: u64,
    pub removed: u64,
    pub bytes_fetched: u64,
    pub duration_ms: u64,
    /// Set when the version was finished by crash recovery rather than a fresh apply.
    #[serde(default)]
    pub recovered: bool,
    /// Things done differently from the version (a socket not recreated, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
    /// What was done to running processes for this version.
    #[serde(default)]
    pub processes: Vec<ProcessOutcome>,
}

/// What happened to one process (or one rule command) for a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOutcome {
    pub action: ProcessAction,
    /// The process acted on (0 for a rule's command).
    pub pid: i32,
    /// Its name, or the command line of a rule's command.
    pub name: String,
    /// The pid it runs as now, after a restart.
    #[serde(default)]
    pub new_pid: Option<i32>,
    /// Why this was done: which file, how the process used it.
    pub reason: String,
    /// How it went, where there is more to say (the verification, an exit status,
    /// where the restore data came from, an error).
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessAction {
    /// Stopped before the version was placed, started after it.
    Restarted,
    /// SIGHUP, and it was seen opening an updated file.
    Reloaded,
    /// SIGHUP, not seen re-reading within the window: stopped and started.
    RestartedAfterReload,
    /// Gone when its turn to stop came: its parent ended it and owns it.
    EndedByParent,
    /// Something failed; `detail` says what.
    Failed,
    /// A rule's command ran.
    Command,
}

impl ProcessAction {
    pub fn name(self) -> &'static str {
        match self {
            ProcessAction::Restarted => "restarted",
            ProcessAction::Reloaded => "reloaded",
            ProcessAction::RestartedAfterReload => "restarted after reload",
            ProcessAction::EndedByParent => "ended by its parent",
            ProcessAction::Failed => "failed",
            ProcessAction::Command => "command",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The version the agent's tree is at, if it knows.
    pub version: Option<u64>,
}

/// An agent as `vdsync fleet` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub version: Option<u64>,
    /// Seconds since the Unix epoch of the last contact.
    pub last_seen: u64,
    pub last_outcome: Option<Outcome>,
}

/// Every error response's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
