//! Content-addressed blobs: the [`BlobStore`] interface, the local-disk store, and
//! the pack codec that moves blobs over the wire with their hashes checked.
//!
//! A stored blob is `[uncompressed length: u64 LE][one zstd frame]`, exactly the
//! part of a pack record after the hash, so serving a blob copies bytes and storing
//! one needs only a hash check, never a re-compression.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vdsync_proto::wire::{PackHeader, PACK_HEADER_LEN};
use vdsync_proto::Hash;

use crate::StoreError;

/// Where blobs live. The embedded default is [`LocalBlobStore`]; an object-store
/// backend (S3-compatible) implements the same four calls.
pub trait BlobStore: Send + Sync {
    fn contains(&self, hash: &Hash) -> Result<bool, StoreError>;
    /// The stored form: length prefix then the zstd frame.
    fn open_stored(&self, hash: &Hash) -> Result<Box<dyn Read + Send>, StoreError>;
    /// A writer for a new blob's stored form; nothing is visible until `finish`.
    fn create(&self) -> Result<Box<dyn BlobWriter>, StoreError>;
    /// Makes every finished blob durable.
    fn sync(&self) -> Result<(), StoreError>;
    /// Makes the finished blobs `hashes` durable. A store where one flush of
    /// everything costs more than flushing a few blobs does the latter.
    fn sync_blobs(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        let _ = hashes;
        self.sync()
    }
}

pub trait BlobWriter: Write + Send {
    /// Publishes the written bytes under `hash`. Dropping without finishing discards.
    fn finish(self: Box<Self>, hash: &Hash) -> Result<(), StoreError>;
}

/// Blobs as files under `DIR/blobs/ab/abcdef…`, written to `DIR/tmp` then renamed.
pub struct LocalBlobStore {
    blobs: PathBuf,
    temp: PathBuf,
    counter: AtomicU64,
}

impl LocalBlobStore {
    pub fn open(dir: &Path) -> Result<LocalBlobStore, StoreError> {
        let blobs = dir.join("blobs");
        let temp = dir.join("tmp");
        for path in [&blobs, &temp] {
            std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(LocalBlobStore {
            blobs,
            temp,
            counter: AtomicU64::new(0),
        })
    }

    fn path_of(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.blobs.join(&hex[..2]).join(&hex)
    }
}

impl BlobStore for LocalBlobStore {
    fn contains(&self, hash: &Hash) -> Result<bool, StoreError> {
        let path = self.path_of(hash);
        path.try_exists()
            .map_err(|source| StoreError::Io { path, source })
    }

    fn open_stored(&self, hash: &Hash) -> Result<Box<dyn Read + Send>, StoreError> {
        let path = self.path_of(hash);
        match File::open(&path) {
            Ok(file) => Ok(Box::new(file)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob(*hash))
            }
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    fn create(&self) -> Result<Box<dyn BlobWriter>, StoreError> {
        let number = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.temp.join(format!("{}-{number}", std::process::id()));
        let file = File::create(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Box::new(LocalBlobWriter {
            file: io::BufWriter::with_capacity(256 * 1024, file),
            temp: path,
            blobs: self.blobs.clone(),
            finished: false,
        }))
    }

    fn sync(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.blobs).map_err(|source| StoreError::Io {
            path: self.blobs.clone(),
            source,
        })?;
        vdsync_sys::syncfs(dir.as_fd()).map_err(|source| StoreError::Io {
            path: self.blobs.clone(),
            source,
        })
    }

    /// `syncfs` writes back everything dirty on the file system and flushes the disk
    /// once; a sync per blob flushes once per file and once per directory. With
    /// little dirty, one flush wins, even for two blobs. With much dirty (a build, a
    /// burst of logs) `syncfs` waits for all of it, milliseconds that have nothing to
    /// do with these blobs: then a few blobs are synced one by one. Of a few blobs,
    /// those that are not files here are left alone: a store in front of this one
    /// (the repository's small blobs) holds them, durably already.
    fn sync_blobs(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        if hashes.len() > SYNC_EACH_BLOB_LIMIT {
            return self.sync();
        }
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let mut files = Vec::with_capacity(hashes.len());
        for hash in hashes {
            let path = self.path_of(hash);
            match File::open(&path) {
                Ok(file) => files.push((file, path)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_error(&path)(err)),
            }
        }
        if files.is_empty() {
            return Ok(());
        }
        let directories: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|(_, path)| path.parent().map(Path::to_path_buf))
            .collect();
        let flushes = (files.len() + directories.len()) as u64;
        if dirty_bytes().is_some_and(|dirty| dirty <= flushes * WRITEBACK_BYTES_PER_FLUSH) {
            return self.sync();
        }
        for (file, path) in &files {
            file.sync_data().map_err(io_error(path))?;
        }
        // The shard directories are not among them: `finish` syncs a new one.
        for directory in &directories {
            vdsync_sys::fsync_dir(directory).map_err(io_error(directory))?;
        }
        Ok(())
    }
}

/// Up to this many blobs, [`LocalBlobStore::sync_blobs`] may sync each file rather
/// than the whole file system.
const SYNC_EACH_BLOB_LIMIT: usize = 8;

/// What one disk flush costs, as bytes `syncfs` would write back in the same time
/// (measured on a virtio disk: a flush about 0.15 ms, writing back small files
/// about 1 ms per MiB). Only a cost estimate: both ways are equally durable.
const WRITEBACK_BYTES_PER_FLUSH: u64 = 128 << 10;

/// Bytes waiting to be written back, machine-wide (`Dirty` and `Writeback` in
/// /proc/meminfo): an upper bound on what a `syncfs` of one file system writes.
fn dirty_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kibibytes = |field: &str| -> Option<u64> {
        let line = meminfo.lines().find(|line| line.starts_with(field))?;
        line[field.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((kibibytes("Dirty:")? + kibibytes("Writeback:")?) * 1024)
}

struct LocalBlobWriter {
    file: io::BufWriter<File>,
    temp: PathBuf,
    blobs: PathBuf,
    finished: bool,
}

impl Write for LocalBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter for LocalBlobWriter {
    fn finish(mut self: Box<Self>, hash: &Hash) -> Result<(), StoreError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        self.file.flush().map_err(io_error(&self.temp))?;
        let hex = hash.to_hex();
        let dir = self.blobs.join(&hex[..2]);
        match std::fs::create_dir(&dir) {
            // A new shard directory: its name must be durable before any blob in it
            // can be, and `sync_blobs` syncs only the shard directories.
            Ok(()) => vdsync_sys::fsync_dir(&self.blobs).map_err(io_error(&self.blobs))?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(io_error(&dir)(err)),
        }
        let target = dir.join(&hex);
        std::fs::rename(&self.temp, &target).map_err(io_error(&target))?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for LocalBlobWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Compresses everything `content` yields into a new blob and returns its hash.
/// Used where the repository itself produces blobs (`repo init`, changesets).
pub fn put_reader(
    store: &dyn BlobStore,
    content: &mut dyn Read,
    len: u64,
) -> Result<Hash, StoreError> {
    let mut writer = store.create()?;
    writer
        .write_all(&len.to_le_bytes())
        .map_err(StoreError::Stream)?;
    let mut hasher = blake3::Hasher::new();
    let mut counted = 0u64;
    {
        let mut encoder = zstd::stream::write::Encoder::new(&mut writer, ZSTD_LEVEL)
            .map_err(StoreError::Stream)?;
        encoder
            .set_pledged_src_size(Some(len))
            .map_err(StoreError::Stream)?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = content.read(&mut buffer).map_err(StoreError::Stream)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            counted += n as u64;
            encoder
                .write_all(&buffer[..n])
                .map_err(StoreError::Stream)?;
        }
        encoder.finish().map_err(StoreError::Stream)?;
    }
    if counted != len {
        return Err(StoreError::LengthMismatch {
            hash: None,
            declared: len,
            actual: counted,
        });
    }
    let hash = Hash::from(hasher.finalize());
    writer.finish(&hash)?;
    Ok(hash)
}

pub fn put_bytes(store: &dyn BlobStore, bytes: &[u8]) -> Result<Hash, StoreError> {
    put_reader(store, &mut &bytes[..], bytes.len() as u64)
}

/// The zstd level for blobs the repository compresses itself and for pushes:
/// level 1 keeps compression faster than a disk writes.
pub const ZSTD_LEVEL: i32 = 1;

/// Reads one blob's content, checking its hash and length at the end.
pub fn read_blob(store: &dyn BlobStore, hash: &Hash) -> Result<Vec<u8>, StoreError> {
    let mut stored = io::BufReader::new(store.open_stored(hash)?);
    let mut content = Vec::new();
    let len = read_len(&mut stored)?;
    decode_frame(&mut stored, *hash, len, &mut content)?;
    Ok(content)
}

fn read_len(reader: &mut dyn Read) -> Result<u64, StoreError> {
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).map_err(StoreError::Stream)?;
    Ok(u64::from_le_bytes(len))
}

/// Decodes one zstd frame from `input` into `output`, verifying that it holds `len`
/// bytes hashing to `hash`. Consumes exactly the frame from `input`.
pub fn decode_frame(
    input: &mut dyn BufRead,
    hash: Hash,
    len: u64,
    output: &mut dyn Write,
) -> Result<(), StoreError> {
    read_frame(input, hash, len, &mut |content| {
        io::copy(content, output).map(|_| ())
    })
}

/// Decodes one zstd frame from `input` and hands the content to `consume` as a
/// stream, then checks that it held `len` bytes hashing to `hash`. The consumer sees
/// unverified bytes: it must treat what it wrote as provisional until this returns
/// `Ok` (the agent writes into staging, never into the tree).
pub fn read_frame(
    input: &mut dyn BufRead,
    hash: Hash,
    len: u64,
    consume: &mut dyn FnMut(&mut dyn Read) -> io::Result<()>,
) -> Result<(), StoreError> {
    let decoder = zstd::stream::read::Decoder::with_buffer(input)
        .map_err(StoreError::Stream)?
        .single_frame();
    // One byte more than declared, so that a frame holding too much is noticed.
    let mut verifying = HashingReader::new(decoder.take(len + 1));
    consume(&mut verifying).map_err(StoreError::Stream)?;
    io::copy(&mut verifying, &mut io::sink()).map_err(StoreError::Stream)?;
    if verifying.bytes_read() != len {
        return Err(StoreError::LengthMismatch {
            hash: Some(hash),
            declared: len,
            actual: verifying.bytes_read(),
        });
    }
    let actual = verifying.finish();
    if actual != hash {
        return Err(StoreError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    Ok(())
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes_read: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: blake3::Hasher::new(),
            bytes_read: 0,
        }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn finish(&self) -> Hash {
        Hash::from(self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes_read += n as u64;
        Ok(n)
    }
}

/// A `BufRead` that copies every byte its consumer consumes into `copy`: lets the
/// repository store a zstd frame byte for byte while decoding it to check the hash.
struct TeeBufRead<'a> {
    inner: &'a mut dyn BufRead,
    copy: &'a mut dyn Write,
    error: Option<io::Error>,
}

impl Read for TeeBufRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for TeeBufRead<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        if amount == 0 {
            return;
        }
        match self.inner.fill_buf() {
            Ok(buffer) => {
                if let Err(err) = self.copy.write_all(&buffer[..amount]) {
                    self.error = Some(err);
                }
            }
            Err(err) => self.error = Some(err),
        }
        self.inner.consume(amount);
    }
}

/// Blobs of at most this many content bytes can be kept with the version that
/// brings them (see [`ingest_pack`]) instead of as files of their own.
pub const INLINE_BLOB_LEN: u64 = 4096;
/// The stored form of an inline blob may not exceed this: zstd adds a few bytes to
/// incompressible content, never kilobytes; a frame padded with empty blocks is
/// refused instead of buffered.
const INLINE_STORED_LIMIT: usize = 16 * 1024;

/// Reads pack records from `input` until it ends, storing each blob after checking
/// its hash. Returns the hash of every record, in order. A blob the store already
/// holds is checked and not written again. The caller makes them durable with
/// [`BlobStore::sync_blobs`] before acknowledging: all of them, since one already
/// present may have been stored by another pack whose sync has not finished.
///
/// With `inline`, a new blob of at most [`INLINE_BLOB_LEN`] content bytes is not
/// written to the store but appended there, (hash, stored form), for the caller to
/// record with the version (see `VersionLog::commit`).
pub fn ingest_pack(
    store: &dyn BlobStore,
    input: &mut dyn BufRead,
    max_blob_len: u64,
    mut inline: Option<&mut Vec<(Hash, Vec<u8>)>>,
) -> Result<Vec<Hash>, StoreError> {
    let mut received = Vec::new();
    while let Some(header) = read_pack_header(input)? {
        if header.len > max_blob_len {
            return Err(StoreError::TooLarge {
                hash: header.hash,
                len: header.len,
                limit: max_blob_len,
            });
        }
        let held_inline = inline
            .as_ref()
            .is_some_and(|blobs| blobs.iter().any(|(hash, _)| *hash == header.hash));
        if held_inline || store.contains(&header.hash)? {
            decode_frame(input, header.hash, header.len, &mut io::sink())?;
            received.push(header.hash);
            continue;
        }
        if let Some(blobs) = inline.as_mut().filter(|_| header.len <= INLINE_BLOB_LEN) {
            let mut stored = CappedBuffer(Vec::new());
            copy_stored(input, &header, &mut stored)?;
            blobs.push((header.hash, stored.0));
        } else {
            let mut writer = store.create()?;
            copy_stored(input, &header, &mut writer)?;
            writer.finish(&header.hash)?;
        }
        received.push(header.hash);
    }
    Ok(received)
}

/// Writes the stored form of the pack record whose header was just read (length
/// prefix, then the zstd frame byte for byte) to `stored`, checking the frame's
/// content against the header while it passes.
fn copy_stored(
    input: &mut dyn BufRead,
    header: &PackHeader,
    stored: &mut dyn Write,
) -> Result<(), StoreError> {
    stored
        .write_all(&header.len.to_le_bytes())
        .map_err(StoreError::Stream)?;
    let mut tee = TeeBufRead {
        inner: input,
        copy: stored,
        error: None,
    };
    decode_frame(&mut tee, header.hash, header.len, &mut io::sink())?;
    match tee.error.take() {
        Some(err) => Err(StoreError::Stream(err)),
        None => Ok(()),
    }
}

/// A buffer for one inline blob's stored form, refusing to grow past
/// [`INLINE_STORED_LIMIT`].
struct CappedBuffer(Vec<u8>);

impl Write for CappedBuffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.0.len() + bytes.len() > INLINE_STORED_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the zstd frame of a blob of at most {INLINE_BLOB_LEN} bytes is longer than {INLINE_STORED_LIMIT} bytes"
                ),
            ));
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the pack records for `hashes` (the stored form, copied) to `output`.
pub fn write_pack(
    store: &dyn BlobStore,
    hashes: &[Hash],
    output: &mut dyn Write,
) -> Result<(), StoreError> {
    for hash in hashes {
        let mut stored = store.open_stored(hash)?;
        output.write_all(&hash.0).map_err(StoreError::Stream)?;
        io::copy(&mut stored, output).map_err(StoreError::Stream)?;
    }
    Ok(())
}

/// Reads one pack record's header from `input`; `None` at a clean end.
pub fn read_pack_header(input: &mut dyn BufRead) -> Result<Option<PackHeader>, StoreError> {
    if input.fill_buf().map_err(StoreError::Stream)?.is_empty() {
        return Ok(None);
    }
    let mut header = [0u8; PACK_HEADER_LEN];
    input.read_exact(&mut header).map_err(StoreError::Stream)?;
    Ok(Some(PackHeader::decode(&header)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content: &[u8]) -> Vec<u8> {
        let mut out = PackHeader {
            hash: Hash::of(content),
            len: content.len() as u64,
        }
        .encode()
        .to_vec();
        out.extend(zstd::encode_all(content, 1).unwrap());
        out
    }

    #[test]
    fn pack_round_trip_through_the_store() {
        let temp = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(temp.path()).unwrap();
        let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut pack = record(b"first");
        pack.extend(record(b""));
        pack.extend(record(&big));
        let stored = ingest_pack(&store, &mut &pack[..], 1 << 30, None).unwrap();
        assert_eq!(stored, [Hash::of(b"first"), Hash::of(b""), Hash::of(&big)]);
        store.sync_blobs(&stored).unwrap();
        // A blob already stored is checked again and not rewritten.
        let again = ingest_pack(&store, &mut &record(b"first")[..], 1 << 30, None).unwrap();
        assert_eq!(again, [Hash::of(b"first")]);
        let mut corrupt_again = record(b"first");
        corrupt_again[..32].copy_from_slice(&Hash::of(&big).0);
        assert!(ingest_pack(&store, &mut &corrupt_again[..], 1 << 30, None).is_err());
        assert_eq!(read_blob(&store, &Hash::of(&big)).unwrap(), big);

        let mut served = Vec::new();
        write_pack(&store, &[Hash::of(b"first"), Hash::of(&big)], &mut served).unwrap();
        let mut input = &served[..];
        let header = read_pack_header(&mut input).unwrap().unwrap();
        let mut out = Vec::new();
        decode_frame(&mut input, header.hash, header.len, &mut out).unwrap();
        assert_eq!(out, b"first");
        let header = read_pack_header(&mut input).unwrap().unwrap();
        let mut out = Vec::new();
        decode_frame(&mut input, header.hash, header.len, &mut out).unwrap();
        assert_eq!(out, big);
        assert!(read_pack_header(&mut input).unwrap().is_none());
    }

    #[test]
    fn forged_blob_is_refused_and_not_stored() {
        let temp = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(temp.path()).unwrap();
        let mut forged = record(b"honest");
        forged[..32].copy_from_slice(&Hash::of(b"other").0);
        let err = ingest_pack(&store, &mut &forged[..], 1 << 30, None).unwrap_err();
        assert!(matches!(err, StoreError::HashMismatch { .. }), "{err}");
        assert!(!store.contains(&Hash::of(b"other")).unwrap());
        assert!(!store.contains(&Hash::of(b"honest")).unwrap());
        assert_eq!(
            std::fs::read_dir(temp.path().join("tmp")).unwrap().count(),
            0
        );

        let mut short = record(b"twelve bytes");
        short[32..40].copy_from_slice(&5u64.to_le_bytes());
        let err = ingest_pack(&store, &mut &short[..], 1 << 30, None).unwrap_err();
        assert!(matches!(err, StoreError::LengthMismatch { .. }), "{err}");
    }
}
