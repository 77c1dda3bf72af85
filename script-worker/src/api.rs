//! The plugin HTTP API that ThingsPanel calls (THINGSPANEL.md, "the plugin API").
//!
//! Every reply is `{"code":200,"message":"success","data":…}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::routes::{EdgeClients, RouteLookup};
use crate::source::DeviceSource;

/// What the API needs.
pub struct ApiState {
    pub devices: Arc<dyn DeviceSource>,
    pub routes: Arc<dyn RouteLookup>,
    pub edges: Arc<EdgeClients>,
    /// Tells every other worker to drop a device's cached config.
    pub broadcast_forget: Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>,
}

/// The plugin API.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/form/config", get(form_config))
        .route("/api/v1/device/disconnect", post(disconnect))
        .route("/api/v1/notify/event", post(notification))
        .route("/api/v1/plugin/notification", post(notification))
        .route("/api/v1/plugin/device/list", get(device_list))
        .with_state(state)
}

fn success(data: Value) -> Json<Value> {
    Json(json!({ "code": 200, "message": "success", "data": data }))
}

fn input(key: &str, label: &str, placeholder: &str, required: bool) -> Value {
    json!({ "dataKey": key, "label": label, "placeholder": placeholder, "type": "input",
            "validate": { "required": required, "message": format!("{label} is required") } })
}

fn select(key: &str, label: &str, options: &[(&str, &str)]) -> Value {
    let options: Vec<Value> =
        options.iter().map(|(value, label)| json!({ "label": label, "value": value })).collect();
    json!({ "dataKey": key, "label": label, "placeholder": format!("Select {label}"), "type": "select",
            "options": options, "validate": { "required": false, "message": "" } })
}

/// The CFG form: our per-device-config settings (see `devices::DeviceSettings`).
pub fn config_form() -> Value {
    json!([
        select(
            "protocol",
            "Protocol",
            &[("official", "Official (TP frames, port 7653)"), ("custom", "Custom bytes (port 7654)")]
        ),
        select(
            "framing",
            "Custom framing",
            &[
                ("idle_gap", "Idle gap with buffer size"),
                ("delimiter", "Delimiter"),
                ("fixed_length", "Fixed length"),
                ("length_field", "Length field"),
            ]
        ),
        input("buffer_size", "Buffer size (bytes, idle gap framing)", "1024", false),
        input("idle_gap_ms", "Idle gap (ms)", "50", false),
        input("delimiter", "Delimiter (\\r\\n or 0x0d0a)", "\\n", false),
        input("fixed_length", "Fixed length (bytes)", "16", false),
        input("length_offset", "Length field offset", "0", false),
        input("length_width", "Length field width (1, 2, 4, 8)", "2", false),
        select(
            "length_endian",
            "Length field byte order",
            &[("big", "Big endian"), ("little", "Little endian")]
        ),
        input("length_adjustment", "Length adjustment", "0", false),
        input(
            "uplink_script",
            "Uplink script (JavaScript decode(bytes, ctx), or lib:<name>)",
            "lib:my-meter",
            false
        ),
        input(
            "downlink_script",
            "Downlink script (JavaScript encode(msg, ctx), or lib:<name>)",
            "lib:my-meter",
            false
        ),
        select("cmd1_maps_to", "TP CMD 0x1 is", &[("telemetry", "Telemetry"), ("attributes", "Attributes")]),
    ])
}

async fn form_config(Query(query): Query<HashMap<String, String>>) -> Json<Value> {
    let data = match query.get("form_type").map(String::as_str) {
        Some("CFG") => config_form(),
        Some("VCR") => {
            json!([input("access_token", "AccessToken", "The token the device sends first", true)])
        }
        Some("VCRT") => json!({ "access_token": "AccessToken" }),
        _ => Value::Null,
    };
    success(data)
}

#[derive(Deserialize)]
struct DisconnectBody {
    #[serde(default)]
    device_id: String,
}

/// Drops the device's cached config (here and on every worker) and closes its
/// connection through its edge pod; the device reconnects and its config is fetched
/// again. An unknown id is not an error.
async fn disconnect(State(state): State<Arc<ApiState>>, Json(body): Json<DisconnectBody>) -> Json<Value> {
    let device_id = body.device_id;
    if device_id.is_empty() {
        return Json(json!({ "code": 400, "message": "device_id is required", "data": null }));
    }
    state.devices.forget(&device_id).await;
    (state.broadcast_forget)(device_id.clone()).await;
    match state.routes.route(&device_id).await {
        Ok(Some(route)) => match state.edges.disconnect(&route, "platform asked").await {
            Ok(closed) => info!(%device_id, closed, "device disconnected at the platform's request"),
            Err(error) => warn!(%device_id, %error, "device connection not closed"),
        },
        Ok(None) => info!(%device_id, "disconnect for a device that is not connected"),
        Err(error) => warn!(%device_id, %error, "device route unknown; connection not closed"),
    }
    success(Value::Null)
}

async fn notification(Json(body): Json<Value>) -> Json<Value> {
    let message_type = body.get("message_type").cloned().unwrap_or_default();
    info!(%message_type, "platform notification");
    success(Value::Null)
}

async fn device_list() -> Json<Value> {
    success(json!({ "list": [], "total": 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::NoRoutes;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn state(forgotten: Arc<std::sync::Mutex<Vec<String>>>) -> Arc<ApiState> {
        let devices = crate::source::FileDevices::parse("[[device]]\ntoken='t'\nid='d1'\n").unwrap();
        Arc::new(ApiState {
            devices: Arc::new(devices),
            routes: Arc::new(NoRoutes),
            edges: Arc::default(),
            broadcast_forget: Arc::new(move |id| {
                forgotten.lock().unwrap().push(id);
                Box::pin(async {})
            }),
        })
    }

    async fn call(router: Router, request: Request<Body>) -> Value {
        let response = router.oneshot(request).await.unwrap();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn forms() {
        let router = router(state(Arc::default()));
        let uri = "/api/v1/form/config?protocol_type=TCP&device_type=1&form_type=VCR";
        let vcr = call(router.clone(), Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(vcr["code"], 200);
        assert_eq!(vcr["data"][0]["dataKey"], "access_token");
        let uri = "/api/v1/form/config?protocol_type=TCP&device_type=1&form_type=CFG";
        let cfg = call(router.clone(), Request::get(uri).body(Body::empty()).unwrap()).await;
        let keys: Vec<&str> =
            cfg["data"].as_array().unwrap().iter().map(|f| f["dataKey"].as_str().unwrap()).collect();
        assert!(
            keys.contains(&"uplink_script") && keys.contains(&"framing") && keys.contains(&"cmd1_maps_to")
        );
        // Every form key is one the settings parser reads.
        let form: serde_json::Map<String, Value> =
            keys.iter().map(|k| (k.to_string(), Value::Null)).collect();
        crate::devices::DeviceSettings::from_form(&form).unwrap();
        let uri = "/api/v1/form/config?protocol_type=TCP&device_type=1&form_type=SVCR";
        let none = call(router, Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(none, json!({"code": 200, "message": "success", "data": null}));
    }

    #[tokio::test]
    async fn disconnect_forgets_everywhere_and_unknown_ids_are_fine() {
        let forgotten = Arc::new(std::sync::Mutex::new(Vec::new()));
        let router = router(state(forgotten.clone()));
        let request = Request::post("/api/v1/device/disconnect")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"device_id":"nobody"}"#))
            .unwrap();
        assert_eq!(call(router.clone(), request).await["code"], 200);
        assert_eq!(*forgotten.lock().unwrap(), ["nobody"]);
        let list =
            call(router, Request::get("/api/v1/plugin/device/list?page=1").body(Body::empty()).unwrap())
                .await;
        assert_eq!(list["data"], json!({"list": [], "total": 0}));
    }
}
