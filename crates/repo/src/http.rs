//! The repository's HTTP API: routes, request parsing and error responses.
//!
//! Handlers are thin: they parse, hand blocking work to `spawn_blocking`, and map
//! `RepoError` to a status and an `ErrorBody`. Blob bodies stream in both directions
//! (see `streaming`), so a pack of many GiB never sits in memory. This module is not
//! where the rules for accepting a version live; that is `Repository::commit`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tracing::warn;
use vdsync_proto::wire::{
    CommitRequest, ErrorBody, HashList, Head, Hello, Outcome, PackStored, MAX_HASHES_PER_REQUEST,
};
use vdsync_proto::Hash;

use crate::streaming::{ingest_and_commit, ingest_body, stream_pack};
use crate::{RepoError, Repository};

/// The limit on JSON request bodies. A commit request or a hash list is far smaller;
/// only packs are large, and they stream outside this limit.
pub const JSON_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// The longest a `GET /v1/head?after=N` waits, whatever the client asks for: long
/// enough that an idle fleet makes few requests, short enough that proxies and load
/// balancers do not cut the connection first.
pub const MAX_HEAD_WAIT: Duration = Duration::from_secs(60);

/// How long `GET /v1/head?after=N` waits when the client gives no `wait_ms`.
pub const DEFAULT_HEAD_WAIT: Duration = Duration::from_secs(30);

/// Serves the HTTP API until the future is dropped / the process ends.
pub async fn serve(
    repo: Arc<Repository>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY a response written in two pieces (header, then a small
    // body) waits for the client's delayed ACK: ~40 ms on every small fetch.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(repo)).await
}

/// The API as a `Router`, for callers that add layers (authentication, TLS) of
/// their own before serving it.
pub fn router(repo: Arc<Repository>) -> Router {
    Router::new()
        .route("/v1/head", get(get_head))
        .route("/v1/versions", get(list_versions).post(commit_version))
        .route("/v1/versions/pack", post(commit_with_pack))
        .route("/v1/versions/{version}", get(get_version))
        .route("/v1/versions/{version}/manifest", get(get_manifest))
        .route("/v1/versions/{version}/changeset", get(get_changeset))
        .route("/v1/versions/{version}/bundle", get(get_bundle))
        .route("/v1/blobs/missing", post(missing_blobs))
        .route("/v1/blobs/pack", post(upload_pack))
        .route("/v1/blobs/fetch", post(fetch_blobs))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{name}/hello", post(agent_hello))
        .route("/v1/agents/{name}/report", post(agent_report))
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(repo)
}

type SharedRepository = State<Arc<Repository>>;

#[derive(Debug, Deserialize)]
struct HeadQuery {
    after: Option<u64>,
    wait_ms: Option<u64>,
}

async fn get_head(
    State(repo): SharedRepository,
    QueryParameters(query): QueryParameters<HeadQuery>,
) -> Json<Head> {
    // Subscribing before looking at the value means a commit landing in between
    // still marks the receiver changed, so the wake-up cannot be missed.
    let mut head_receiver = repo.subscribe_head();
    if let Some(after) = query.after {
        let wait = query
            .wait_ms
            .map_or(DEFAULT_HEAD_WAIT, Duration::from_millis)
            .min(MAX_HEAD_WAIT);
        let newer_than_after = |head: &Option<u64>| head.is_some_and(|head| head > after);
        // A timeout is the ordinary answer "nothing new yet", and the sender lives as
        // long as the repository, so neither outcome is an error.
        let _ = tokio::time::timeout(wait, head_receiver.wait_for(newer_than_after)).await;
    }
    let head = *head_receiver.borrow();
    Json(Head { head })
}

async fn list_versions(State(repo): SharedRepository) -> Result<Response, RepoError> {
    run_blocking(&repo, |repo| json_bytes(&repo.versions()?)).await
}

async fn get_version(
    State(repo): SharedRepository,
    PathParameter(version): PathParameter<u64>,
) -> Result<Response, RepoError> {
    run_blocking(&repo, move |repo| json_bytes(&repo.version(version)?)).await
}

async fn get_manifest(
    State(repo): SharedRepository,
    PathParameter(version): PathParameter<u64>,
) -> Result<Response, RepoError> {
    // Serialized on the blocking thread too: a manifest of a whole disk is large.
    run_blocking(&repo, move |repo| json_bytes(&repo.manifest(version)?)).await
}

async fn get_changeset(
    State(repo): SharedRepository,
    PathParameter(version): PathParameter<u64>,
) -> Result<Response, RepoError> {
    run_blocking(&repo, move |repo| json_bytes(&repo.changeset(version)?)).await
}

#[derive(Debug, Deserialize)]
struct BundleQuery {
    max_bytes: Option<u64>,
    /// Wait this long (at most [`MAX_HEAD_WAIT`]) for the version to be committed,
    /// as `GET /v1/head?after=N` does: an agent asks for the next version's
    /// bundle and gets it the moment it exists, in one request.
    wait_ms: Option<u64>,
}

/// The most content a bundle carries, whatever the client asks for: it is built in
/// memory.
const MAX_BUNDLE_BYTES: u64 = 1 << 20;

/// A version's changeset and its small blobs in one pack (see
/// `Repository::bundle`). With `wait_ms`, a version not committed yet is waited
/// for; still none when the wait ends: 204 No Content.
async fn get_bundle(
    State(repo): SharedRepository,
    PathParameter(version): PathParameter<u64>,
    QueryParameters(query): QueryParameters<BundleQuery>,
) -> Result<Response, RepoError> {
    let max_bytes = query.max_bytes.unwrap_or(0).min(MAX_BUNDLE_BYTES);
    if let Some(wait_ms) = query.wait_ms {
        // Subscribed before looking, as in `get_head`.
        let mut head_receiver = repo.subscribe_head();
        let committed = |head: &Option<u64>| head.is_some_and(|head| head >= version);
        let wait = Duration::from_millis(wait_ms).min(MAX_HEAD_WAIT);
        let _ = tokio::time::timeout(wait, head_receiver.wait_for(committed)).await;
        if !committed(&head_receiver.borrow()) {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let pack = run_blocking(&repo, move |repo| repo.bundle(version, max_bytes)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], pack).into_response())
}

async fn commit_version(
    State(repo): SharedRepository,
    JsonBody(request): JsonBody<CommitRequest>,
) -> Result<Response, RepoError> {
    let info = run_blocking(&repo, move |repo| repo.commit(&request)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn commit_with_pack(
    State(repo): SharedRepository,
    body: Body,
) -> Result<Response, RepoError> {
    let info = ingest_and_commit(repo, body).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn missing_blobs(
    State(repo): SharedRepository,
    JsonBody(list): JsonBody<HashList>,
) -> Result<Json<HashList>, RepoError> {
    check_hash_count(&list.hashes)?;
    let hashes = run_blocking(&repo, move |repo| repo.missing_blobs(&list.hashes)).await?;
    Ok(Json(HashList { hashes }))
}

async fn upload_pack(
    State(repo): SharedRepository,
    body: Body,
) -> Result<Json<PackStored>, RepoError> {
    let stored = ingest_body(repo, body).await?;
    Ok(Json(PackStored { stored }))
}

async fn fetch_blobs(
    State(repo): SharedRepository,
    JsonBody(list): JsonBody<HashList>,
) -> Result<Response, RepoError> {
    check_hash_count(&list.hashes)?;
    // Every hash is checked before the 200 goes out: once streaming has begun, the
    // only way left to report a missing blob is to cut the connection.
    let hashes = run_blocking(&repo, move |repo| {
        match repo.missing_blobs(&list.hashes)?.first() {
            Some(first_missing) => Err(RepoError::BlobNotFound(*first_missing)),
            None => Ok(list.hashes),
        }
    })
    .await?;
    let body = stream_pack(repo, hashes);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

async fn list_agents(State(repo): SharedRepository) -> Result<Response, RepoError> {
    run_blocking(&repo, |repo| json_bytes(&repo.agents()?)).await
}

async fn agent_hello(
    State(repo): SharedRepository,
    PathParameter(name): PathParameter<String>,
    JsonBody(hello): JsonBody<Hello>,
) -> Result<StatusCode, RepoError> {
    run_blocking(&repo, move |repo| repo.record_hello(&name, &hello)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_report(
    State(repo): SharedRepository,
    PathParameter(name): PathParameter<String>,
    JsonBody(outcome): JsonBody<Outcome>,
) -> Result<StatusCode, RepoError> {
    run_blocking(&repo, move |repo| repo.record_report(&name, &outcome)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn no_such_endpoint(uri: Uri) -> RepoError {
    RepoError::NoSuchEndpoint(uri.path().to_owned())
}

async fn method_not_allowed(method: Method, uri: Uri) -> RepoError {
    RepoError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

fn check_hash_count(hashes: &[Hash]) -> Result<(), RepoError> {
    if hashes.len() > MAX_HASHES_PER_REQUEST {
        return Err(RepoError::TooManyHashes {
            count: hashes.len(),
            limit: MAX_HASHES_PER_REQUEST,
        });
    }
    Ok(())
}

/// Runs blocking repository work off the async threads.
pub(crate) async fn run_blocking<T, F>(repo: &Arc<Repository>, work: F) -> Result<T, RepoError>
where
    T: Send + 'static,
    F: FnOnce(&Repository) -> Result<T, RepoError> + Send + 'static,
{
    let repo = Arc::clone(repo);
    tokio::task::spawn_blocking(move || work(&repo))
        .await
        .map_err(RepoError::TaskFailed)?
}

/// A JSON response serialized by the caller (on a blocking thread).
fn json_bytes<T: serde::Serialize>(value: &T) -> Result<Response, RepoError> {
    let bytes = serde_json::to_vec(value).map_err(RepoError::SerializeResponse)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

impl IntoResponse for RepoError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = vdsync_proto::display::error_chain(&self);
        warn!(status = status.as_u16(), "request refused: {message}");
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

/// `Json` whose rejection is a `RepoError`, so a malformed body gets the same
/// `ErrorBody` as every other error.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = RepoError;

    async fn from_request(request: Request, state: &S) -> Result<Self, RepoError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_rejection_error(&rejection)),
        }
    }
}

fn json_rejection_error(rejection: &JsonRejection) -> RepoError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        RepoError::BodyTooLarge {
            limit: JSON_BODY_LIMIT,
        }
    } else {
        RepoError::InvalidRequest(rejection.body_text())
    }
}

/// `Path` whose rejection is a `RepoError`.
struct PathParameter<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParameter<T> {
    type Rejection = RepoError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, RepoError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParameter(value)),
            Err(rejection) => Err(path_rejection_error(&rejection)),
        }
    }
}

fn path_rejection_error(rejection: &PathRejection) -> RepoError {
    RepoError::InvalidRequest(rejection.body_text())
}

/// `Query` whose rejection is a `RepoError`.
struct QueryParameters<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParameters<T> {
    type Rejection = RepoError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, RepoError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(QueryParameters(value)),
            Err(rejection) => Err(query_rejection_error(&rejection)),
        }
    }
}

fn query_rejection_error(rejection: &QueryRejection) -> RepoError {
    RepoError::InvalidRequest(rejection.body_text())
}
