//! Bridges between HTTP bodies and the store's blocking pack codec, in both
//! directions, with bounded memory.
//!
//! The store reads and writes packs through `std::io` on a blocking thread; hyper
//! moves bytes as async streams. Uploads go body stream → `StreamReader` →
//! `SyncIoBridge` → `BufReader` → `ingest_pack`; downloads go `write_pack` →
//! `ChannelWriter` → bounded channel → body stream. Neither side ever holds more than
//! a few chunks, whatever the size of the blobs. The one exception is bounded too: a
//! commit body of known length up to 1 MiB (a small push's) is read whole first.

use std::io::{self, BufReader, Read, Write};
use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tracing::warn;
use vdsync_proto::wire::{CommitRequest, VersionInfo, COMMIT_PREFIX_LEN_BYTES};
use vdsync_proto::Hash;
use vdsync_store::{ingest_pack, write_pack};

use crate::http::{run_blocking, JSON_BODY_LIMIT};
use crate::{RepoError, Repository};

/// Size of the read buffer in front of `ingest_pack` and of the chunks a download
/// sends: large enough that per-chunk overhead vanishes next to disk and network.
const CHUNK_LEN: usize = 256 * 1024;

/// Chunks a download may have in flight between the blocking writer and the
/// connection. With `CHUNK_LEN` this bounds a download's buffer to about 1 MiB.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Stores every blob of a pack upload, then makes them durable. Returns how many
/// were received. Nothing is acknowledged before `sync_blobs`, so a blob the client
/// was told is stored survives a crash.
pub(crate) async fn ingest_body(repo: Arc<Repository>, body: Body) -> Result<u64, RepoError> {
    let byte_stream = body.into_data_stream().map_err(io::Error::other);
    // The bridge must be created on the runtime: it keeps a handle to block on.
    let blocking_reader = SyncIoBridge::new(StreamReader::new(byte_stream));
    run_blocking(&repo, move |repo| {
        let mut reader = BufReader::with_capacity(CHUNK_LEN, blocking_reader);
        Ok(store_pack(repo, &mut reader, None)?.len() as u64)
    })
    .await
}

/// Stores the blobs of the pack `reader` holds and makes them durable; returns
/// their hashes. With `inline`, small new blobs are kept there instead, for the
/// caller to commit with its version (see `ingest_pack`).
fn store_pack(
    repo: &Repository,
    reader: &mut dyn io::BufRead,
    inline: Option<&mut Vec<(Hash, Vec<u8>)>>,
) -> Result<Vec<Hash>, RepoError> {
    let received = ingest_pack(repo.blobs(), reader, repo.max_blob_len(), inline)
        .map_err(RepoError::PackRefused)?;
    repo.blobs()
        .sync_blobs(&received)
        .map_err(RepoError::Store)?;
    Ok(received)
}

/// `POST /v1/versions/pack`: a commit request, then a pack (see
/// [`vdsync_proto::wire::commit_prefix`]). The blobs are stored and synced, then the
/// version is committed, then acknowledged: the order of an upload followed by a
/// commit, in one round trip and one blocking task. Small blobs go into the
/// version's own database transaction: a one-file change creates no blob file and
/// waits for one flush.
pub(crate) async fn ingest_and_commit(
    repo: Arc<Repository>,
    body: Body,
) -> Result<VersionInfo, RepoError> {
    let known_length = axum::body::HttpBody::size_hint(&body).exact();
    if let Some(length) = known_length.filter(|length| *length <= WHOLE_BODY_BYTES) {
        let bytes = axum::body::to_bytes(body, length as usize)
            .await
            .map_err(|err| RepoError::InvalidRequest(format!("the request body: {err}")))?;
        return run_blocking(&repo, move |repo| commit_from(repo, &mut &bytes[..])).await;
    }
    let byte_stream = body.into_data_stream().map_err(io::Error::other);
    let blocking_reader = SyncIoBridge::new(StreamReader::new(byte_stream));
    run_blocking(&repo, move |repo| {
        commit_from(
            repo,
            &mut BufReader::with_capacity(CHUNK_LEN, blocking_reader),
        )
    })
    .await
}

/// A commit body of known length up to this is read whole before the blocking work
/// starts, so that work does not wait on the connection read by read (each read a
/// hand-over between threads). Larger bodies stream, so memory stays bounded.
const WHOLE_BODY_BYTES: u64 = 1024 * 1024;

/// The blocking half of [`ingest_and_commit`]: the commit request, the pack, then
/// the version.
fn commit_from(repo: &Repository, reader: &mut dyn io::BufRead) -> Result<VersionInfo, RepoError> {
    let request = read_commit_prefix(reader)?;
    let mut inline = Vec::new();
    store_pack(repo, reader, Some(&mut inline))?;
    repo.commit_with_inline(&request, &inline).inspect_err(|_| {
        if let Err(err) = repo.store_inline(&inline) {
            warn!("cannot store the small blobs of a refused commit: {err}");
        }
    })
}

/// Reads the length-prefixed commit request at the start of a commit-with-pack body.
fn read_commit_prefix(reader: &mut dyn Read) -> Result<CommitRequest, RepoError> {
    fn invalid(error: impl std::fmt::Display) -> RepoError {
        RepoError::InvalidRequest(format!("the commit request before the pack: {error}"))
    }
    let mut length = [0u8; COMMIT_PREFIX_LEN_BYTES];
    reader.read_exact(&mut length).map_err(invalid)?;
    let length = u32::from_le_bytes(length) as usize;
    if length > JSON_BODY_LIMIT {
        return Err(RepoError::BodyTooLarge {
            limit: JSON_BODY_LIMIT,
        });
    }
    let mut json = vec![0u8; length];
    reader.read_exact(&mut json).map_err(invalid)?;
    serde_json::from_slice(&json).map_err(invalid)
}

/// A response body that streams the pack of `hashes`, written on a blocking thread.
///
/// The caller checks that every hash is stored first. If writing still fails (a
/// disk error), the body ends with an error so hyper aborts the response: a pack
/// that simply stopped between records would look complete to the client.
pub(crate) fn stream_pack(repo: Arc<Repository>, hashes: Vec<Hash>) -> Body {
    let (chunk_sender, chunk_receiver) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter::new(chunk_sender);
        let written = write_pack(repo.blobs(), &hashes, &mut writer)
            .map_err(|error| io::Error::other(vdsync_proto::display::error_chain(&error)))
            .and_then(|()| writer.flush());
        if let Err(error) = written {
            // A client that stopped reading is not worth a warning of its own.
            if error.kind() != io::ErrorKind::BrokenPipe {
                warn!("fetch of {} blob(s) failed: {error}", hashes.len());
            }
            writer.fail(error);
        }
    });
    let chunk_stream = futures_util::stream::unfold(chunk_receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    Body::from_stream(chunk_stream)
}

/// A blocking `Write` that forwards what it is given, in chunks, over a bounded
/// channel. `blocking_send` waits while the channel is full, which is what keeps a
/// slow client from making the server buffer a whole blob.
struct ChannelWriter {
    chunk_sender: mpsc::Sender<io::Result<Bytes>>,
    pending: BytesMut,
}

impl ChannelWriter {
    fn new(chunk_sender: mpsc::Sender<io::Result<Bytes>>) -> ChannelWriter {
        ChannelWriter {
            chunk_sender,
            pending: BytesMut::with_capacity(CHUNK_LEN),
        }
    }

    fn send_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.pending.split().freeze();
        self.pending.reserve(CHUNK_LEN);
        self.chunk_sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client stopped reading"))
    }

    /// Ends the stream with an error; the receiver may already be gone, which needs
    /// no further handling.
    fn fail(self, error: io::Error) {
        let _ = self.chunk_sender.blocking_send(Err(error));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let room = CHUNK_LEN.saturating_sub(self.pending.len());
        let taken = buffer.len().min(room.max(1));
        self.pending.extend_from_slice(&buffer[..taken]);
        if self.pending.len() >= CHUNK_LEN {
            self.send_pending()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_pending()
    }
}

// Tests fail by panicking; `unwrap` is the clearest way to say "this must work".
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn channel_writer_chunks_and_flushes_everything() {
        let (sender, mut receiver) = mpsc::channel(1024);
        let content: Vec<u8> = (0..(CHUNK_LEN * 2 + 1000)).map(|i| i as u8).collect();
        let mut writer = ChannelWriter::new(sender);
        writer.write_all(&content[..10]).unwrap();
        writer.write_all(&content[10..]).unwrap();
        writer.flush().unwrap();
        drop(writer);
        let mut received = Vec::new();
        let mut chunk_lengths = Vec::new();
        while let Some(chunk) = receiver.blocking_recv() {
            let chunk = chunk.unwrap();
            chunk_lengths.push(chunk.len());
            received.extend_from_slice(&chunk);
        }
        assert_eq!(received, content);
        assert_eq!(chunk_lengths, [CHUNK_LEN, CHUNK_LEN, 1000]);
    }

    #[test]
    fn channel_writer_reports_a_gone_reader() {
        let (sender, receiver) = mpsc::channel(1);
        drop(receiver);
        let mut writer = ChannelWriter::new(sender);
        let error = writer.write_all(&vec![0u8; CHUNK_LEN]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }
}
