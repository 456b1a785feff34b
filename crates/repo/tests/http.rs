//! The HTTP API end to end: a real server on 127.0.0.1:0 in this process, a real
//! HTTP client, a real data directory.

// Tests fail by panicking; `unwrap` is the clearest way to say "this must work".
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use tempfile::TempDir;
use vdsync_proto::fixtures::{dir_entry, file_entry, path};
use vdsync_proto::wire::{
    commit_prefix, AgentInfo, CommitRequest, ErrorBody, HashList, Head, Hello, Outcome,
    OutcomeStatus, PackHeader, PackStored, VersionInfo, MAX_HASHES_PER_REQUEST,
};
use vdsync_proto::{Changeset, Hash, Manifest};
use vdsync_repo::{serve, Repository};
use vdsync_test_support::wait_until;

/// A server running on its own runtime, torn down when dropped.
struct TestServer {
    base_url: String,
    repo: Arc<Repository>,
    client: Client,
    _runtime: tokio::runtime::Runtime,
    _data_dir: TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let data_dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(Repository::open(data_dir.path()).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        runtime.spawn(serve(Arc::clone(&repo), listener));
        let client = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        TestServer {
            base_url: format!("http://{address}"),
            repo,
            client,
            _runtime: runtime,
            _data_dir: data_dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().unwrap()
    }

    fn post_json<T: serde::Serialize>(&self, path: &str, body: &T) -> Response {
        self.client.post(self.url(path)).json(body).send().unwrap()
    }

    fn upload_pack(&self, pack: Vec<u8>) -> Response {
        self.client
            .post(self.url("/v1/blobs/pack"))
            .body(pack)
            .send()
            .unwrap()
    }

    /// Uploads `changeset` as a blob and commits it.
    fn commit(&self, changeset: &Changeset, message: &str) -> Response {
        let json = serde_json::to_vec(changeset).unwrap();
        let response = self.upload_pack(pack_record(&json));
        assert_eq!(response.status(), StatusCode::OK);
        let request = CommitRequest {
            parent: changeset.parent,
            message: message.to_owned(),
            changeset: Hash::of(&json),
        };
        self.post_json("/v1/versions", &request)
    }

    fn head(&self) -> Option<u64> {
        self.get("/v1/head").json::<Head>().unwrap().head
    }
}

/// One pack record: header, then the content as one zstd frame.
fn pack_record(content: &[u8]) -> Vec<u8> {
    let mut record = PackHeader {
        hash: Hash::of(content),
        len: content.len() as u64,
    }
    .encode()
    .to_vec();
    record.extend(zstd::encode_all(content, 1).unwrap());
    record
}

/// Content that zstd cannot shrink much, so a blob spans many stream chunks.
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn error_message(response: Response) -> String {
    response.json::<ErrorBody>().unwrap().error
}

fn base_changeset() -> Changeset {
    Changeset {
        parent: None,
        removed: vec![],
        entries: vec![dir_entry("etc"), file_entry("etc/app.conf", b"v0")],
    }
}

fn edit_changeset(parent: u64, content: &[u8]) -> Changeset {
    Changeset {
        parent: Some(parent),
        removed: vec![],
        entries: vec![file_entry("etc/app.conf", content)],
    }
}

/// Creates versions 0 and 1 (contents v0 then v1).
fn commit_two_versions(server: &TestServer) -> (VersionInfo, VersionInfo) {
    let mut contents = pack_record(b"v0");
    contents.extend(pack_record(b"v1"));
    assert_eq!(server.upload_pack(contents).status(), StatusCode::OK);
    let response = server.commit(&base_changeset(), "base");
    assert_eq!(response.status(), StatusCode::CREATED);
    let first: VersionInfo = response.json().unwrap();
    let response = server.commit(&edit_changeset(0, b"v1"), "edit");
    assert_eq!(response.status(), StatusCode::CREATED);
    let second: VersionInfo = response.json().unwrap();
    (first, second)
}

#[test]
fn commit_chain_zero_then_one() {
    let server = TestServer::start();
    assert_eq!(server.head(), None);

    // The client asks what is missing, uploads exactly that, and the answer changes.
    let wanted = HashList {
        hashes: vec![Hash::of(b"v0"), Hash::of(b"v1")],
    };
    let missing: HashList = server
        .post_json("/v1/blobs/missing", &wanted)
        .json()
        .unwrap();
    assert_eq!(missing.hashes, wanted.hashes);

    // A commit whose blobs are not uploaded is refused with a clear message.
    let response = server.commit(&base_changeset(), "too early");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let message = error_message(response);
    assert!(message.contains("not stored"), "{message}");
    assert!(message.contains(&Hash::of(b"v0").to_string()), "{message}");

    let (first, second) = commit_two_versions(&server);
    assert_eq!((first.version, first.parent), (0, None));
    assert_eq!((first.files, first.dirs, first.bytes), (1, 1, 2));
    assert_eq!((second.version, second.parent), (1, Some(0)));
    assert_eq!(second.message, "edit");
    assert_eq!(server.head(), Some(1));

    let missing: HashList = server
        .post_json("/v1/blobs/missing", &wanted)
        .json()
        .unwrap();
    assert!(missing.hashes.is_empty());

    let versions: Vec<VersionInfo> = server.get("/v1/versions").json().unwrap();
    assert_eq!(versions, vec![first.clone(), second.clone()]);
    let one: VersionInfo = server.get("/v1/versions/1").json().unwrap();
    assert_eq!(one, second);
    let manifest: Manifest = server.get("/v1/versions/1/manifest").json().unwrap();
    assert_eq!(
        manifest.entries.get(&path("etc/app.conf")),
        Some(&file_entry("etc/app.conf", b"v1").entry)
    );
    let changeset: Changeset = server.get("/v1/versions/0/changeset").json().unwrap();
    assert_eq!(changeset, base_changeset());

    let response = server.get("/v1/versions/9/manifest");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_message(response), "version 9 does not exist");
    let response = server.get("/v1/versions/nine");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = server.get("/v1/nothing/here");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        error_message(response),
        "no such endpoint: /v1/nothing/here"
    );
    let response = server.get("/v1/blobs/pack");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error_message(response),
        "GET is not allowed on /v1/blobs/pack"
    );
}

#[test]
fn stale_parent_is_refused_with_409_and_the_head_is_unchanged() {
    let server = TestServer::start();
    commit_two_versions(&server);
    let mut late = pack_record(b"late edit");
    late.extend(pack_record(b"v2"));
    assert_eq!(server.upload_pack(late).status(), StatusCode::OK);

    let response = server.commit(&edit_changeset(0, b"late edit"), "late");
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let message = error_message(response);
    assert!(message.starts_with("stale parent"), "{message}");
    assert_eq!(server.head(), Some(1));
    let versions: Vec<VersionInfo> = server.get("/v1/versions").json().unwrap();
    assert_eq!(versions.len(), 2);

    // Rebased on the head, the same kind of change goes in.
    let response = server.commit(&edit_changeset(1, b"v2"), "rebased");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(server.head(), Some(2));
}

#[test]
fn a_pack_carrying_its_commit_stores_the_blobs_and_commits_in_one_request() {
    let server = TestServer::start();
    commit_two_versions(&server);
    let commit_with_pack = |changeset: &Changeset, contents: &[&[u8]], message: &str| {
        let json = serde_json::to_vec(changeset).unwrap();
        let request = CommitRequest {
            parent: changeset.parent,
            message: message.to_owned(),
            changeset: Hash::of(&json),
        };
        let mut body = commit_prefix(&request);
        for content in contents {
            body.extend(pack_record(content));
        }
        body.extend(pack_record(&json));
        server
            .client
            .post(server.url("/v1/versions/pack"))
            .body(body)
            .send()
            .unwrap()
    };

    let response = commit_with_pack(&edit_changeset(1, b"v2"), &[b"v2"], "one request");
    assert_eq!(response.status(), StatusCode::CREATED);
    let info: VersionInfo = response.json().unwrap();
    assert_eq!((info.version, info.parent), (2, Some(1)));
    assert_eq!(info.message, "one request");
    assert_eq!(server.head(), Some(2));

    // A stale parent is refused as by `POST /v1/versions`; the blobs stay stored.
    let response = commit_with_pack(&edit_changeset(1, b"late"), &[b"late"], "late");
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert!(error_message(response).starts_with("stale parent"));
    assert_eq!(server.head(), Some(2));
    let missing: HashList = server
        .post_json(
            "/v1/blobs/missing",
            &HashList {
                hashes: vec![Hash::of(b"late")],
            },
        )
        .json()
        .unwrap();
    assert!(missing.hashes.is_empty());

    // A commit whose blob is neither stored nor in the pack is refused.
    let response = commit_with_pack(&edit_changeset(2, b"absent"), &[], "absent");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(error_message(response).contains("not stored"));

    // A body cut inside the commit request is refused, not committed.
    let response = server
        .client
        .post(server.url("/v1/versions/pack"))
        .body(vec![200, 0, 0, 0, b'{'])
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(server.head(), Some(2));
}

#[test]
fn pack_with_a_forged_hash_is_refused_and_not_stored() {
    let server = TestServer::start();
    let mut forged = pack_record(b"honest content");
    forged[..32].copy_from_slice(&Hash::of(b"claimed content").0);
    let response = server.upload_pack(forged);
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let message = error_message(response);
    assert!(message.starts_with("pack refused: "), "{message}");
    assert!(message.contains("hashes to"), "{message}");

    let asked = HashList {
        hashes: vec![Hash::of(b"claimed content"), Hash::of(b"honest content")],
    };
    let missing: HashList = server
        .post_json("/v1/blobs/missing", &asked)
        .json()
        .unwrap();
    assert_eq!(missing.hashes, asked.hashes);

    // A truncated record is refused too.
    let mut truncated = pack_record(&incompressible(10_000, 3));
    truncated.truncate(truncated.len() - 100);
    assert_eq!(
        server.upload_pack(truncated).status(),
        StatusCode::BAD_REQUEST
    );
}

/// A server at version 0 (the base changeset, content `v0`) that already holds
/// the content `v1` of the next version, which is not committed.
fn server_at_version_0_with_v1_uploaded() -> TestServer {
    let server = TestServer::start();
    assert_eq!(
        server.upload_pack(pack_record(b"v0")).status(),
        StatusCode::OK
    );
    assert_eq!(
        server.commit(&base_changeset(), "base").status(),
        StatusCode::CREATED
    );
    assert_eq!(
        server.upload_pack(pack_record(b"v1")).status(),
        StatusCode::OK
    );
    server
}

#[test]
fn long_poll_wakes_when_a_commit_lands() {
    let server = server_at_version_0_with_v1_uploaded();

    let poll_url = server.url("/v1/head?after=0&wait_ms=30000");
    let poll_client = server.client.clone();
    let poller = thread::spawn(move || {
        let started = Instant::now();
        let head: Head = poll_client.get(poll_url).send().unwrap().json().unwrap();
        (head.head, started.elapsed())
    });
    // The poll holds a head receiver while it waits; commit only once it is parked,
    // so the test shows a wake-up rather than an early answer.
    wait_until(Duration::from_secs(10), "the long poll to park", || {
        server.repo.head_subscribers() == 1
    });
    assert_eq!(
        server.commit(&edit_changeset(0, b"v1"), "edit").status(),
        StatusCode::CREATED
    );
    let (head, waited) = poller.join().unwrap();
    assert_eq!(head, Some(1));
    assert!(
        waited < Duration::from_secs(15),
        "the long poll took {waited:?}; it should wake on the commit, not time out"
    );

    // With nothing newer, the poll answers the current head when its wait ends.
    let started = Instant::now();
    let head: Head = server.get("/v1/head?after=1&wait_ms=200").json().unwrap();
    assert_eq!(head.head, Some(1));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// An agent asks for the next version's bundle before it exists: the answer comes
/// when the version is committed, holding its changeset and content; with nothing
/// committed before the wait ends, 204.
#[test]
fn a_bundle_waited_for_arrives_when_its_version_is_committed() {
    let server = server_at_version_0_with_v1_uploaded();

    let bundle_url = server.url("/v1/versions/1/bundle?max_bytes=65536&wait_ms=30000");
    let poll_client = server.client.clone();
    let poller = thread::spawn(move || {
        let started = Instant::now();
        let response = poll_client.get(bundle_url).send().unwrap();
        let status = response.status();
        (
            status,
            response.bytes().unwrap().to_vec(),
            started.elapsed(),
        )
    });
    wait_until(
        Duration::from_secs(10),
        "the bundle request to park",
        || server.repo.head_subscribers() == 1,
    );
    let edit = edit_changeset(0, b"v1");
    assert_eq!(server.commit(&edit, "edit").status(), StatusCode::CREATED);
    let (status, pack, waited) = poller.join().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        waited < Duration::from_secs(15),
        "the bundle took {waited:?}; it should come with the commit, not at the end of the wait"
    );
    let mut expected = pack_record(&serde_json::to_vec(&edit).unwrap());
    expected.extend(pack_record(b"v1"));
    assert_eq!(
        pack, expected,
        "the bundle is the changeset, then the content"
    );

    // Version 2 does not come: 204 once the wait ends, and nothing to read.
    let started = Instant::now();
    let response = server.get("/v1/versions/2/bundle?wait_ms=200");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Without `wait_ms` an unknown version is still an error.
    assert_eq!(
        server.get("/v1/versions/2/bundle").status(),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn fetch_returns_exactly_the_uploaded_bytes() {
    let server = TestServer::start();
    let big = incompressible(3 * 1024 * 1024 + 17, 7);
    let small = b"small".to_vec();
    let empty = Vec::new();
    let mut pack = pack_record(&big);
    pack.extend(pack_record(&small));
    pack.extend(pack_record(&empty));
    // Sent as a chunked stream of unknown length, as a pusher reading files does.
    let response = server
        .client
        .post(server.url("/v1/blobs/pack"))
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(pack)))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<PackStored>().unwrap().stored, 3);

    let asked = HashList {
        hashes: vec![Hash::of(&small), Hash::of(&big), Hash::of(&empty)],
    };
    let response = server.post_json("/v1/blobs/fetch", &asked);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[reqwest::header::CONTENT_TYPE],
        "application/octet-stream"
    );
    let served = response.bytes().unwrap();
    let mut input = &served[..];
    let mut decoded = Vec::new();
    while let Some(header) = vdsync_store::read_pack_header(&mut input).unwrap() {
        let mut content = Vec::new();
        vdsync_store::decode_frame(&mut input, header.hash, header.len, &mut content).unwrap();
        decoded.push((header.hash, content));
    }
    assert_eq!(
        decoded,
        vec![
            (Hash::of(&small), small),
            (Hash::of(&big), big),
            (Hash::of(&empty), empty)
        ]
    );

    let absent = Hash::of(b"never uploaded");
    let response = server.post_json(
        "/v1/blobs/fetch",
        &HashList {
            hashes: vec![Hash::of(b"small"), absent],
        },
    );
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        error_message(response),
        format!("blob {absent} is not in the store")
    );

    let too_many = HashList {
        hashes: vec![absent; MAX_HASHES_PER_REQUEST + 1],
    };
    let response = server.post_json("/v1/blobs/fetch", &too_many);
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = server.post_json("/v1/blobs/missing", &too_many);
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn agents_say_hello_and_report() {
    let server = TestServer::start();
    let response = server.post_json("/v1/agents/web-1/hello", &Hello { version: Some(0) });
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let outcome = Outcome {
        version: 1,
        status: OutcomeStatus::Failed,
        files: 0,
        removed: 0,
        bytes_fetched: 0,
        duration_ms: 12,
        recovered: false,
        warnings: vec![],
        error: Some("disk full".into()),
        processes: vec![],
    };
    let response = server.post_json("/v1/agents/web-1/report", &outcome);
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let agents: Vec<AgentInfo> = server.get("/v1/agents").json().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].name, "web-1");
    assert_eq!(
        agents[0].version,
        Some(0),
        "a failed version is not the agent's"
    );
    assert_eq!(agents[0].last_outcome, Some(outcome));

    let response = server.post_json("/v1/agents/bad%20name/hello", &Hello { version: None });
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(error_message(response).contains("invalid agent name"));
}

#[test]
fn malformed_and_oversized_bodies_get_an_error_body() {
    let server = TestServer::start();
    let response = server
        .client
        .post(server.url("/v1/versions"))
        .header("content-type", "application/json")
        .body("{\"parent\": ")
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(error_message(response).starts_with("invalid request: "));

    let oversized = vec![b' '; vdsync_repo::JSON_BODY_LIMIT + 1];
    let response = server
        .client
        .post(server.url("/v1/blobs/missing"))
        .header("content-type", "application/json")
        .body(oversized)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_message(response).contains("exceeds the limit"));
    assert_eq!(server.head(), None);
}
