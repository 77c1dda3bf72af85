//! The auth responder: answers the edges' `tcpc.auth` requests (NATS queue group, so
//! exactly one worker answers each) from the device source.

use std::sync::Arc;
use tcpc_observe::Chain;

use futures::StreamExt;
use prost::Message as _;
use tcpc_proto::names;
use tcpc_proto::secret::Redacted;
use tcpc_proto::v1::{self, AuthReply, AuthRequest, Protocol};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::devices::{DeviceKind, ProtocolChoice};
use crate::metrics::{Metrics, ReasonLabel};
use crate::scripts::Scripts;
use crate::source::{DeviceSource, Lookup};

/// Auth requests answered at once, at most (the rest wait in NATS).
const CONCURRENCY: usize = 256;

/// Decides whether an AccessToken is a device.
pub struct Authenticator {
    pub devices: Arc<dyn DeviceSource>,
    pub scripts: Arc<Scripts>,
    pub metrics: Arc<Metrics>,
}

fn refusal(message: &str) -> AuthReply {
    AuthReply { ok: false, message: message.to_owned(), ..Default::default() }
}

impl Authenticator {
    /// The answer to one request.
    pub async fn answer(&self, request: &AuthRequest) -> AuthReply {
        let (reply, outcome) = match self.devices.by_token(&request.access_token).await {
            Ok(Lookup::Found(device)) => {
                let wanted = match request.protocol() {
                    Protocol::Custom => ProtocolChoice::Custom,
                    _ => ProtocolChoice::Official,
                };
                match device.settings.protocol {
                    Some(configured) if configured != wanted => {
                        let name =
                            if configured == ProtocolChoice::Custom { "custom" } else { "official (TP)" };
                        (refusal(&format!("device is configured for the {name} protocol port")), "wrong_port")
                    }
                    _ => {
                        let hash = |script: &Option<String>| {
                            script.as_deref().and_then(|s| self.scripts.hash_of(s).ok()).unwrap_or_default()
                        };
                        let reply = AuthReply {
                            ok: true,
                            message: String::new(),
                            device_id: device.id.clone(),
                            device_number: device.number.clone(),
                            device_type: match device.kind {
                                DeviceKind::Direct => v1::DeviceType::Direct,
                                DeviceKind::Gateway => v1::DeviceType::Gateway,
                                DeviceKind::SubDevice => v1::DeviceType::SubDevice,
                            }
                            .into(),
                            sub_devices: device
                                .sub_devices
                                .iter()
                                .map(|s| v1::SubDevice {
                                    device_id: s.id.clone(),
                                    device_number: s.number.clone(),
                                    address: s.address.clone(),
                                })
                                .collect(),
                            framing: Some(device.settings.framing_proto()),
                            uplink_script_hash: hash(&device.settings.uplink_script),
                            downlink_script_hash: hash(&device.settings.downlink_script),
                        };
                        (reply, "ok")
                    }
                }
            }
            Ok(Lookup::Unknown(message)) => (refusal(&message), "unknown"),
            Err(error) => {
                warn!(token = %Redacted(&request.access_token), error = %Chain(&error), "device lookup failed");
                (refusal("authentication unavailable, retry later"), "unavailable")
            }
        };
        self.metrics.auth.get_or_create(&ReasonLabel { reason: outcome }).inc();
        debug!(token = %Redacted(&request.access_token), pod = %request.pod, outcome, "auth answered");
        reply
    }
}

/// Whether the edge stopped waiting for this request (`deadline_ms` set and passed):
/// its device is gone, so the platform is not asked and no reply is sent.
fn given_up(request: &AuthRequest, now_ms: i64) -> bool {
    request.deadline_ms != 0 && request.deadline_ms <= now_ms
}

/// Answers auth requests on NATS until `shutdown`, each on a task of `tasks`.
pub async fn serve(
    client: async_nats::Client,
    authenticator: Arc<Authenticator>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let subscribed = client.queue_subscribe(names::AUTH_SUBJECT, names::AUTH_QUEUE_GROUP.to_owned()).await;
    let mut requests = match subscribed {
        Ok(requests) => requests,
        Err(error) => {
            tracing::error!(%error, "auth responder could not subscribe");
            return;
        }
    };
    info!("answering auth requests");
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Some(reply_to) = message.reply else { continue };
        let Ok(request) = AuthRequest::decode(message.payload) else {
            warn!("undecodable auth request ignored");
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        // Checked after the wait for a permit, which is where a burst makes requests late.
        if given_up(&request, tcpc_proto::now_ms()) {
            authenticator.metrics.auth.get_or_create(&ReasonLabel { reason: "expired" }).inc();
            debug!(pod = %request.pod, "auth request past its deadline skipped");
            continue;
        }
        let (client, authenticator) = (client.clone(), authenticator.clone());
        tasks.spawn(async move {
            let reply = authenticator.answer(&request).await;
            if let Err(error) = client.publish(reply_to, reply.encode_to_vec().into()).await {
                warn!(%error, "auth reply not sent");
            }
            drop(permit);
        });
    }
    let _ = requests.unsubscribe().await;
}
