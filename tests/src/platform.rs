//! A fake ThingsPanel backend that follows THINGSPANEL.md: the plugin's device-config and
//! heartbeat calls, HTTP 200 with `code` in the body, the exact-string voucher match, and
//! the one-call-per-3-s-per-voucher limit (201003).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

#[derive(Default)]
struct Books {
    /// Device config `data` by exact voucher string, and by device id.
    by_voucher: HashMap<String, Value>,
    by_id: HashMap<String, Value>,
    by_number: HashMap<String, Value>,
    /// Every device-config call: (key asked by, when).
    calls: Vec<(String, Instant)>,
    last_call: HashMap<String, Instant>,
    heartbeats: Vec<String>,
    down: bool,
}

/// The fake backend, serving until dropped.
pub struct FakePlatform {
    pub addr: SocketAddr,
    books: Arc<Mutex<Books>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePlatform {
    pub async fn spawn() -> Self {
        let books: Arc<Mutex<Books>> = Arc::default();
        let router = Router::new()
            .route("/api/v1/plugin/device/config", post(device_config))
            .route("/api/v1/plugin/heartbeat", post(heartbeat))
            .with_state(books.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakePlatform { addr, books, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a device: `voucher` exactly as the platform stores it (Go JSON), and
    /// the `data` of its device-config reply.
    pub fn add(&self, voucher: &str, data: Value) {
        let mut books = self.books.lock().unwrap();
        let id = data["id"].as_str().expect("data has an id").to_owned();
        let number = data["device_number"].as_str().unwrap_or_default().to_owned();
        books.by_voucher.insert(voucher.to_owned(), data.clone());
        books.by_number.insert(number, data.clone());
        books.by_id.insert(id, data);
    }

    /// Device-config calls so far, and when they came.
    pub fn calls(&self) -> Vec<(String, Instant)> {
        self.books.lock().unwrap().calls.clone()
    }

    pub fn heartbeats(&self) -> Vec<String> {
        self.books.lock().unwrap().heartbeats.clone()
    }

    /// Makes every call fail at the HTTP level (the platform is down).
    pub fn set_down(&self, down: bool) {
        self.books.lock().unwrap().down = down;
    }
}

impl Drop for FakePlatform {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A direct device's config `data` (the fixture's shape).
pub fn direct_device(id: &str, number: &str, voucher: &str, template: Value) -> Value {
    json!({
        "id": id, "voucher": voucher, "device_type": "1", "protocol_type": "TCP",
        "device_number": number, "config": null, "protocol_config_template": template, "sub_devices": null
    })
}

type Reply = (axum::http::StatusCode, Json<Value>);

async fn device_config(State(books): State<Arc<Mutex<Books>>>, Json(body): Json<Value>) -> Reply {
    let mut books = books.lock().unwrap();
    if books.down {
        return (axum::http::StatusCode::BAD_GATEWAY, Json(json!("upstream down")));
    }
    let (key, found) = if let Some(voucher) = body["voucher"].as_str() {
        (voucher.to_owned(), books.by_voucher.get(voucher).cloned())
    } else if let Some(id) = body["device_id"].as_str() {
        (format!("id:{id}"), books.by_id.get(id).cloned())
    } else if let Some(number) = body["device_number"].as_str() {
        (format!("number:{number}"), books.by_number.get(number).cloned())
    } else {
        return (
            axum::http::StatusCode::OK,
            Json(json!({"code": 400, "message": "bad request", "data": null})),
        );
    };
    let now = Instant::now();
    books.calls.push((key.clone(), now));
    if books.last_call.get(&key).is_some_and(|at| now.duration_since(*at) < Duration::from_secs(3)) {
        return (
            axum::http::StatusCode::OK,
            Json(json!({"code": 201003, "message": "too many requests", "data": null})),
        );
    }
    books.last_call.insert(key, now);
    let reply = match found {
        Some(data) => json!({"code": 200, "message": "success", "data": data}),
        None => {
            json!({"code": 101001, "message": "record not found", "data": {"sql_error": "record not found"}})
        }
    };
    (axum::http::StatusCode::OK, Json(reply))
}

async fn heartbeat(State(books): State<Arc<Mutex<Books>>>, Json(body): Json<Value>) -> Json<Value> {
    let service = body["service_identifier"].as_str().unwrap_or_default().to_owned();
    books.lock().unwrap().heartbeats.push(service);
    Json(json!({"code": 200, "message": "success", "data": {}}))
}
