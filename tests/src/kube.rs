//! A fake Kubernetes API server, in-process: the pods of one namespace, what the edge
//! and the worker call (`PATCH` a pod's annotations; `LIST` and `WATCH` pods by label),
//! and a kubeconfig that points the services' standard client inference at it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::Notify;

#[derive(Default)]
struct Pods {
    /// By name.
    pods: BTreeMap<String, Value>,
    /// Every change, in order: (resource version, watch event type, the pod).
    log: Vec<(u64, &'static str, Value)>,
    version: u64,
}

#[derive(Default)]
struct Shared {
    pods: Mutex<Pods>,
    changed: Notify,
    /// Watch requests served so far.
    watches: std::sync::atomic::AtomicUsize,
}

/// The fake API server; it stops with the test's runtime.
pub struct FakeKube {
    pub addr: SocketAddr,
    pub namespace: String,
    shared: Arc<Shared>,
    kubeconfig: PathBuf,
}

impl FakeKube {
    pub async fn start(namespace: &str) -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/api/v1/namespaces/{namespace}/pods", get(list_or_watch))
            .route("/api/v1/namespaces/{namespace}/pods/{name}", get(get_pod).patch(patch_pod))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake API");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let kubeconfig =
            std::env::temp_dir().join(format!("tcpc-kubeconfig-{}-{}", std::process::id(), addr.port()));
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr, namespace)).expect("write the kubeconfig");
        FakeKube { addr, namespace: namespace.to_owned(), shared, kubeconfig }
    }

    /// `KUBECONFIG` for a process that should talk to this server.
    pub fn env(&self) -> (&'static str, String) {
        ("KUBECONFIG", self.kubeconfig.display().to_string())
    }

    /// A running pod with `labels` appears.
    pub fn add_pod(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(key, value)| ((*key).to_owned(), json!(value))).collect();
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": self.namespace, "labels": labels, "annotations": {} },
            "status": { "phase": "Running" },
        });
        self.change(name, "ADDED", Some(pod));
    }

    /// The pod is removed (as after its containers stopped).
    pub fn delete_pod(&self, name: &str) {
        self.change(name, "DELETED", None);
    }

    /// Watch requests served so far: a client watches after its first list, so one
    /// watching has seen every pod added before.
    pub fn watches(&self) -> usize {
        self.shared.watches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// An annotation of a pod, if set.
    pub fn annotation(&self, pod: &str, key: &str) -> Option<String> {
        let pods = self.shared.pods.lock().unwrap();
        pods.pods.get(pod)?["metadata"]["annotations"][key].as_str().map(str::to_owned)
    }

    fn change(&self, name: &str, kind: &'static str, pod: Option<Value>) {
        let mut pods = self.shared.pods.lock().unwrap();
        pods.version += 1;
        let version = pods.version;
        let pod = match pod {
            Some(pod) => pod,
            None => pods.pods.remove(name).expect("a pod to delete"),
        };
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(version.to_string());
        if kind != "DELETED" {
            pods.pods.insert(name.to_owned(), pod.clone());
        }
        pods.log.push((version, kind, pod));
        drop(pods);
        self.shared.changed.notify_waiters();
    }
}

fn kubeconfig_yaml(addr: SocketAddr, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    )
}

/// Whether a pod matches a `k=v,k2=v2` selector.
fn matches(pod: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|selector| {
        selector.split(',').filter(|term| !term.is_empty()).all(|term| {
            let (key, value) = term.split_once('=').unwrap_or((term, ""));
            pod["metadata"]["labels"][key].as_str() == Some(value)
        })
    })
}

async fn list_or_watch(
    State(shared): State<Arc<Shared>>,
    Path(_namespace): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let selector = query.get("labelSelector").cloned();
    if query.get("watch").is_some_and(|watch| watch == "true" || watch == "1") {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        return watch(shared, from, selector);
    }
    let pods = shared.pods.lock().unwrap();
    let items: Vec<&Value> = pods.pods.values().filter(|pod| matches(pod, selector.as_ref())).collect();
    let list = json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": { "resourceVersion": pods.version.to_string() },
        "items": items,
    });
    axum::Json(list).into_response()
}

/// Streams the changes after `from`, one JSON event per line, as the API server does.
fn watch(shared: Arc<Shared>, from: u64, selector: Option<String>) -> Response {
    shared.watches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let events = futures::stream::unfold((shared, from), move |(shared, mut cursor)| {
        let selector = selector.clone();
        async move {
            loop {
                let lines: Vec<String> = {
                    let pods = shared.pods.lock().unwrap();
                    let lines = pods
                        .log
                        .iter()
                        .filter(|(version, _, pod)| *version > cursor && matches(pod, selector.as_ref()))
                        .map(|(_, kind, pod)| format!("{}\n", json!({ "type": kind, "object": pod })))
                        .collect();
                    cursor = pods.version;
                    lines
                };
                if !lines.is_empty() {
                    return Some((Ok::<_, Infallible>(Bytes::from(lines.concat())), (shared, cursor)));
                }
                // Woken by changes from its creation on: none is missed after the check.
                let changed = shared.changed.notified();
                if shared.pods.lock().unwrap().version == cursor {
                    changed.await;
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(events))
        .expect("a response")
}

async fn get_pod(
    State(shared): State<Arc<Shared>>,
    Path((_namespace, name)): Path<(String, String)>,
) -> Response {
    match shared.pods.lock().unwrap().pods.get(&name) {
        Some(pod) => axum::Json(pod.clone()).into_response(),
        None => not_found(&name),
    }
}

async fn patch_pod(
    State(shared): State<Arc<Shared>>,
    Path((_namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let mut pods = shared.pods.lock().unwrap();
    let Some(pod) = pods.pods.get_mut(&name) else { return not_found(&name) };
    merge(pod, &patch);
    axum::Json(pod.clone()).into_response()
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in patch {
        if value.is_null() {
            target.as_object_mut().expect("an object").remove(key);
        } else {
            merge(&mut target[key], value);
        }
    }
}

fn not_found(name: &str) -> Response {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "code": 404,
    });
    (StatusCode::NOT_FOUND, axum::Json(status)).into_response()
}
