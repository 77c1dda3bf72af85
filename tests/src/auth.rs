//! A test double of the workers' auth responder: answers `tcpc.auth` from a table of
//! AccessTokens, in the workers' queue group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use prost::Message;
use tcpc_proto::names;
use tcpc_proto::v1::{AuthReply, AuthRequest, DeviceType, Framing};

/// Answers auth requests for the tokens it was given; refuses the rest.
pub struct AuthDouble {
    devices: Arc<Mutex<HashMap<String, AuthReply>>>,
    requests: Arc<AtomicUsize>,
    accept_any: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// A successful reply for a direct device.
pub fn device(device_id: &str) -> AuthReply {
    AuthReply {
        ok: true,
        device_id: device_id.to_owned(),
        device_number: format!("N-{device_id}"),
        device_type: DeviceType::Direct.into(),
        ..Default::default()
    }
}

/// A successful reply for a custom device with a framing.
pub fn custom_device(device_id: &str, framing: Framing) -> AuthReply {
    AuthReply { framing: Some(framing), ..device(device_id) }
}

impl AuthDouble {
    pub async fn spawn(client: async_nats::Client) -> Self {
        let mut subscription = client
            .queue_subscribe(names::AUTH_SUBJECT, names::AUTH_QUEUE_GROUP.to_owned())
            .await
            .expect("subscribe to auth requests");
        client.flush().await.expect("subscription registered");
        let devices: Arc<Mutex<HashMap<String, AuthReply>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let accept_any = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (devices, requests, accept_any) = (devices.clone(), requests.clone(), accept_any.clone());
            async move {
                while let Some(message) = subscription.next().await {
                    requests.fetch_add(1, Ordering::Relaxed);
                    let Some(reply_to) = message.reply else { continue };
                    let request = AuthRequest::decode(message.payload).expect("an AuthRequest");
                    let mut known = devices.lock().unwrap().get(&request.access_token).cloned();
                    if known.is_none() && accept_any.load(Ordering::Relaxed) {
                        known = Some(device(&request.access_token));
                    }
                    let reply = known.unwrap_or_else(|| AuthReply {
                        ok: false,
                        message: "unknown access token".to_owned(),
                        ..Default::default()
                    });
                    let _ = client.publish(reply_to, reply.encode_to_vec().into()).await;
                }
            }
        });
        AuthDouble { devices, requests, accept_any, task }
    }

    /// Makes every token authenticate, as the device whose id is the token (load tests).
    pub fn accept_any(&self) {
        self.accept_any.store(true, Ordering::Relaxed);
    }

    /// Makes `token` authenticate as `reply`.
    pub fn add(&self, token: &str, reply: AuthReply) {
        self.devices.lock().unwrap().insert(token.to_owned(), reply);
    }

    /// How many auth requests arrived.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for AuthDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}
