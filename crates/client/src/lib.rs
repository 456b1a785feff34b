//! The repository's HTTP API as blocking calls, for the pusher, the agent and the
//! read-only commands.
//!
//! Blobs travel in packs (see `vdsync_proto::wire`): uploads stream from readers
//! the caller opens lazily, downloads are handed to the caller one blob at a time
//! and checked against their hash after the caller has consumed them. Nothing here
//! holds a whole blob in memory, except the small ones a bundle carries.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vdsync_proto::wire::{
    commit_prefix, AgentInfo, CommitRequest, ErrorBody, HashList, Head, Hello, Outcome, PackHeader,
    PackStored, VersionInfo, MAX_HASHES_PER_REQUEST, PACK_HEADER_LEN,
};
use vdsync_proto::{Changeset, Hash, Manifest};
use vdsync_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid repository url {0:?} (expected http://HOST:PORT)")]
    BadUrl(String),
    #[error("cannot reach the repository at {url}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the repository refused the request: {message}")]
    Conflict { message: String },
    #[error("not found: {message}")]
    NotFound { message: String },
    #[error("the repository answered {status}: {message}")]
    Server { status: u16, message: String },
    #[error("unexpected answer from the repository")]
    Decode(#[source] reqwest::Error),
    #[error("blob stream from the repository failed")]
    Blob(#[source] StoreError),
    #[error("the repository sent a changeset that does not parse")]
    BadChangeset(#[source] serde_json::Error),
    #[error("cannot read what was to be uploaded")]
    ReadUpload(#[source] io::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

/// A version's changeset with the content of the blobs the repository put beside
/// it (`GET /v1/versions/N/bundle`): all of them for a small version.
pub struct Bundle {
    pub changeset: Changeset,
    /// Content by hash, each checked against its hash.
    pub blobs: HashMap<Hash, Vec<u8>>,
}

impl ClientError {
    /// True for "another version landed first": the caller should rescan and retry.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Conflict { .. })
    }
}

/// One blob to upload: its hash, its uncompressed length, and how to read it.
pub struct UploadItem {
    pub hash: Hash,
    pub len: u64,
    pub open: Box<dyn FnOnce() -> io::Result<Box<dyn Read + Send>> + Send>,
}

#[derive(Clone)]
pub struct Client {
    http: Arc<Http>,
    base: String,
}

/// The HTTP client, built on a thread of its own from [`Client::new`] on: building
/// it starts reqwest's runtime thread and waits for it (about half a millisecond),
/// which then overlaps the caller's work until its first request (a push reads its
/// changes meanwhile).
struct Http {
    building: Mutex<Option<JoinHandle<reqwest::Result<reqwest::blocking::Client>>>>,
    built: OnceLock<Result<reqwest::blocking::Client, String>>,
}

impl Client {
    /// A client of the repository at `url` (`http://HOST:PORT`). Its HTTP client is
    /// built on a thread meanwhile; the first request waits for it.
    pub fn new(url: &str) -> Result<Client, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || base.len() < 8 {
            return Err(ClientError::BadUrl(url.to_owned()));
        }
        let building = std::thread::Builder::new()
            .name("http-client-setup".to_owned())
            .spawn(|| {
                reqwest::blocking::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    // Packs of many GiB and long-polls take as long as they take;
                    // stalls are caught by TCP keepalive instead of a whole-request
                    // deadline.
                    .timeout(None)
                    .tcp_keepalive(Duration::from_secs(30))
                    .build()
            })
            .map_err(|err| ClientError::Setup(err.to_string()))?;
        let http = Http {
            building: Mutex::new(Some(building)),
            built: OnceLock::new(),
        };
        Ok(Client {
            http: Arc::new(http),
            base,
        })
    }

    /// The HTTP client, once its thread has built it.
    fn http(&self) -> Result<&reqwest::blocking::Client, ClientError> {
        let built = self.http.built.get_or_init(|| {
            let building = self
                .http
                .building
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            match building.map(JoinHandle::join) {
                Some(Ok(Ok(client))) => Ok(client),
                Some(Ok(Err(err))) => Err(vdsync_proto::display::error_chain(&err)),
                Some(Err(_)) => Err("its thread panicked".to_owned()),
                // Only `get_or_init` takes the handle, and it runs once.
                None => Err("it was never started".to_owned()),
            }
        });
        built
            .as_ref()
            .map_err(|message| ClientError::Setup(message.clone()))
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        let response = request.send().map_err(|source| ClientError::Transport {
            url: format!("{}{what}", self.base),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&body)
            .map(|error| error.error)
            .unwrap_or_else(|_| body.trim().to_owned());
        Err(match status.as_u16() {
            409 => ClientError::Conflict { message },
            404 => ClientError::NotFound { message },
            code => ClientError::Server {
                status: code,
                message,
            },
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(self.http()?.get(format!("{}{path}", self.base)), path)?;
        response.json().map_err(ClientError::Decode)
    }

    fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = self.http()?.post(format!("{}{path}", self.base)).json(body);
        self.send(request, path)?
            .json()
            .map_err(ClientError::Decode)
    }

    fn post_no_answer<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ClientError> {
        let request = self.http()?.post(format!("{}{path}", self.base)).json(body);
        self.send(request, path).map(|_| ())
    }

    pub fn head(&self) -> Result<Option<u64>, ClientError> {
        Ok(self.get::<Head>("/v1/head")?.head)
    }

    pub fn versions(&self) -> Result<Vec<VersionInfo>, ClientError> {
        self.get("/v1/versions")
    }

    pub fn version(&self, version: u64) -> Result<VersionInfo, ClientError> {
        self.get(&format!("/v1/versions/{version}"))
    }

    pub fn manifest(&self, version: u64) -> Result<Manifest, ClientError> {
        self.get(&format!("/v1/versions/{version}/manifest"))
    }

    pub fn changeset(&self, version: u64) -> Result<Changeset, ClientError> {
        self.get(&format!("/v1/versions/{version}/changeset"))
    }

    /// Version `version`'s changeset, and the content of its blobs up to `max_bytes`
    /// in all, in one request. Blob contents are held in memory: keep `max_bytes`
    /// small.
    pub fn bundle(&self, version: u64, max_bytes: u64) -> Result<Bundle, ClientError> {
        let path = format!("/v1/versions/{version}/bundle?max_bytes={max_bytes}");
        let response = self.send(self.http()?.get(format!("{}{path}", self.base)), &path)?;
        read_bundle(response, version)
    }

    /// [`Client::bundle`] of a version that may not exist yet: waits (server side,
    /// without polling) until it is committed or `wait` elapses; `None` if it was
    /// not.
    pub fn wait_bundle(
        &self,
        version: u64,
        max_bytes: u64,
        wait: Duration,
    ) -> Result<Option<Bundle>, ClientError> {
        let path = format!(
            "/v1/versions/{version}/bundle?max_bytes={max_bytes}&wait_ms={}",
            wait.as_millis()
        );
        let response = self.send(self.http()?.get(format!("{}{path}", self.base)), &path)?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        read_bundle(response, version).map(Some)
    }

    /// The subset of `hashes` the repository does not hold, asked in batches.
    pub fn missing(&self, hashes: &[Hash]) -> Result<Vec<Hash>, ClientError> {
        let mut missing = Vec::new();
        for batch in hashes.chunks(MAX_HASHES_PER_REQUEST) {
            let answer: HashList = self.post(
                "/v1/blobs/missing",
                &HashList {
                    hashes: batch.to_vec(),
                },
            )?;
            missing.extend(answer.hashes);
        }
        Ok(missing)
    }

    /// Uploads `items` as one pack. `on_bytes` is told of every compressed byte sent
    /// (for progress). Returns the number of bytes sent.
    pub fn upload_pack(
        &self,
        items: Vec<UploadItem>,
        on_bytes: Box<dyn FnMut(u64) + Send>,
    ) -> Result<u64, ClientError> {
        let (sent, _): (u64, PackStored) =
            self.post_pack("/v1/blobs/pack", Vec::new(), items, on_bytes)?;
        Ok(sent)
    }

    /// Uploads `items` as one pack and commits `request` in the same round trip; the
    /// repository syncs the blobs before it commits. Returns the new version and
    /// the number of pack bytes sent.
    pub fn upload_and_commit(
        &self,
        items: Vec<UploadItem>,
        on_bytes: Box<dyn FnMut(u64) + Send>,
        request: &CommitRequest,
    ) -> Result<(VersionInfo, u64), ClientError> {
        let (sent, info) =
            self.post_pack("/v1/versions/pack", commit_prefix(request), items, on_bytes)?;
        Ok((info, sent))
    }

    /// POSTs `prefix` then the pack of `items` to `path`; returns the pack bytes sent
    /// and the decoded answer.
    fn post_pack<T: DeserializeOwned>(
        &self,
        path: &str,
        prefix: Vec<u8>,
        items: Vec<UploadItem>,
        on_bytes: Box<dyn FnMut(u64) + Send>,
    ) -> Result<(u64, T), ClientError> {
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let buffered = items.iter().map(|item| item.len).sum::<u64>() <= BUFFERED_PACK_BYTES;
        let mut reader = PackReader {
            items: items.into_iter(),
            current: None,
            header: prefix,
            sent: counter.clone(),
            on_bytes,
        };
        let body = if buffered {
            let mut bytes = Vec::new();
            reader
                .read_to_end(&mut bytes)
                .map_err(ClientError::ReadUpload)?;
            reqwest::blocking::Body::from(bytes)
        } else {
            reqwest::blocking::Body::new(reader)
        };
        let request = self
            .http()?
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .body(body);
        let answer = self
            .send(request, path)?
            .json()
            .map_err(ClientError::Decode)?;
        Ok((counter.load(std::sync::atomic::Ordering::Relaxed), answer))
    }

    /// Downloads `hashes` as one pack, handing each blob's content to `sink` and
    /// checking its hash afterwards. Returns the compressed bytes received.
    pub fn fetch(
        &self,
        hashes: &[Hash],
        sink: &mut dyn FnMut(PackHeader, &mut dyn Read) -> io::Result<()>,
    ) -> Result<u64, ClientError> {
        let response = self.send(
            self.http()?
                .post(format!("{}/v1/blobs/fetch", self.base))
                .json(&HashList {
                    hashes: hashes.to_vec(),
                }),
            "/v1/blobs/fetch",
        )?;
        let mut counted = CountingReader {
            inner: response,
            count: 0,
        };
        let mut input = BufReader::with_capacity(256 * 1024, &mut counted);
        let mut received = 0usize;
        while let Some(header) =
            vdsync_store::read_pack_header(&mut input).map_err(ClientError::Blob)?
        {
            if hashes.get(received) != Some(&header.hash) {
                return Err(ClientError::Blob(StoreError::MissingBlob(
                    hashes.get(received).copied().unwrap_or(header.hash),
                )));
            }
            vdsync_store::read_frame(&mut input, header.hash, header.len, &mut |content| {
                sink(header, content)
            })
            .map_err(ClientError::Blob)?;
            received += 1;
        }
        if received != hashes.len() {
            return Err(ClientError::Blob(StoreError::MissingBlob(hashes[received])));
        }
        drop(input);
        Ok(counted.count)
    }

    pub fn commit(&self, request: &CommitRequest) -> Result<VersionInfo, ClientError> {
        self.post("/v1/versions", request)
    }

    pub fn hello(&self, name: &str, hello: &Hello) -> Result<(), ClientError> {
        self.post_no_answer(&format!("/v1/agents/{name}/hello"), hello)
    }

    pub fn report(&self, name: &str, outcome: &Outcome) -> Result<(), ClientError> {
        self.post_no_answer(&format!("/v1/agents/{name}/report"), outcome)
    }

    pub fn agents(&self) -> Result<Vec<AgentInfo>, ClientError> {
        self.get("/v1/agents")
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// A pack whose blobs add up to at most this many bytes is built in memory and
/// sent with its length: one write, and the repository has the whole body at
/// once, instead of waiting for the streamed body's separate end (measured here:
/// 0.3 to 0.7 ms of a one-file push). Larger packs stream, so memory stays bounded.
const BUFFERED_PACK_BYTES: u64 = 256 * 1024;

/// The body of a pack upload: each item's header, then its content compressed as one
/// zstd frame, opened only when its turn comes.
struct PackReader {
    items: std::vec::IntoIter<UploadItem>,
    current: Option<zstd::stream::read::Encoder<'static, BufReader<Box<dyn Read + Send>>>>,
    header: Vec<u8>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    on_bytes: Box<dyn FnMut(u64) + Send>,
}

impl PackReader {
    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.header.is_empty() {
                let n = self.header.len().min(buf.len());
                buf[..n].copy_from_slice(&self.header[..n]);
                self.header.drain(..n);
                return Ok(n);
            }
            if let Some(encoder) = &mut self.current {
                let n = encoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                self.current = None;
            }
            let Some(item) = self.items.next() else {
                return Ok(0);
            };
            let content = (item.open)()?;
            let mut encoder = zstd::stream::read::Encoder::new(content, vdsync_store::ZSTD_LEVEL)?;
            encoder.set_pledged_src_size(Some(item.len))?;
            self.current = Some(encoder);
            let header = PackHeader {
                hash: item.hash,
                len: item.len,
            }
            .encode();
            debug_assert_eq!(header.len(), PACK_HEADER_LEN);
            self.header.extend_from_slice(&header);
        }
    }
}

impl Read for PackReader {
    /// Fills `buf` as far as the pack allows rather than returning one header or one
    /// encoder output at a time: the HTTP client sends every read as a chunk of its
    /// own, so a pack of a few small blobs then leaves in one write instead of one
    /// per record part, and the repository wakes once to read it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let read = self.read_inner(&mut buf[n..])?;
            if read == 0 {
                break;
            }
            n += read;
        }
        self.sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}

/// Reads a bundle response: the changeset's blob first, then the blobs beside it,
/// each checked against its hash.
fn read_bundle(response: reqwest::blocking::Response, version: u64) -> Result<Bundle, ClientError> {
    let mut input = BufReader::new(response);
    let mut changeset = None;
    let mut blobs = HashMap::new();
    while let Some(header) =
        vdsync_store::read_pack_header(&mut input).map_err(ClientError::Blob)?
    {
        let mut content = Vec::new();
        vdsync_store::read_frame(&mut input, header.hash, header.len, &mut |reader| {
            reader.read_to_end(&mut content).map(|_| ())
        })
        .map_err(ClientError::Blob)?;
        match changeset {
            None => {
                changeset =
                    Some(serde_json::from_slice(&content).map_err(ClientError::BadChangeset)?)
            }
            Some(_) => {
                blobs.insert(header.hash, content);
            }
        }
    }
    let changeset = changeset.ok_or_else(|| ClientError::Server {
        status: 200,
        message: format!("an empty bundle for version {version}"),
    })?;
    Ok(Bundle { changeset, blobs })
}
