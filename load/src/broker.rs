//! The platform side: one MQTT connection to the platform's broker, as the platform has,
//! on which uplinks are received and commands published.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::downlink::Answers;
use crate::error::Error;
use crate::uplink::Tally;

/// How long the broker has to accept the connection and the subscriptions.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);
/// Commands published and not yet acknowledged by the broker (QoS 1).
const IN_FLIGHT: u16 = 1000;

/// Where and as whom.
pub struct BrokerSettings<'a> {
    pub url: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub client_id: String,
}

/// The connection, its event loop running in a task that tallies what arrives.
pub struct Broker {
    pub client: AsyncClient,
    cancel: CancellationToken,
    task: JoinHandle<Heard>,
}

/// What the broker delivered.
pub struct Heard {
    pub uplinks: Tally,
    pub answers: Answers,
    /// Connection losses (the client reconnects).
    pub errors: BTreeMap<String, u64>,
}

impl Broker {
    /// Connects, subscribes `topics` at QoS 1 and returns once the broker granted them,
    /// so that nothing sent afterwards is missed.
    ///
    /// # Errors
    /// A bad URL, a connection refused or lost, a subscription refused or not granted in time.
    pub async fn connect(
        settings: BrokerSettings<'_>,
        topics: &[&str],
        uplinks: Tally,
        answers: Answers,
    ) -> Result<Broker, Error> {
        let mut options = options(&settings)?;
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(IN_FLIGHT)
            .set_request_channel_capacity(usize::from(IN_FLIGHT))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, usize::from(IN_FLIGHT));
        let mut network = rumqttc::NetworkOptions::new();
        // Each message is timed: none may wait for a delayed ACK.
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        for topic in topics {
            client.subscribe(*topic, QoS::AtLeastOnce).await.map_err(Error::Client)?;
        }
        tokio::time::timeout(SUBSCRIBE_WAIT, subscribed(&mut events, topics))
            .await
            .map_err(|_| Error::SubscriptionTimeout(SUBSCRIBE_WAIT))??;
        let cancel = CancellationToken::new();
        let heard = Heard { uplinks, answers, errors: BTreeMap::new() };
        let task = tokio::spawn(listen(events, heard, cancel.clone()));
        Ok(Broker { client, cancel, task })
    }

    /// Stops listening; what was heard.
    pub async fn stop(self) -> Heard {
        self.cancel.cancel();
        self.task.await.expect("the broker's event loop does not panic")
    }
}

fn options(settings: &BrokerSettings) -> Result<MqttOptions, Error> {
    let url = settings.url;
    // rumqttc reads the client id from the URL.
    let separator = if url.contains('?') { '&' } else { '?' };
    let with_id = format!("{url}{separator}client_id={}", settings.client_id);
    let mut options =
        MqttOptions::parse_url(with_id).map_err(|source| Error::MqttUrl { url: url.to_owned(), source })?;
    if let Some(username) = settings.username {
        options.set_credentials(username, settings.password.unwrap_or_default());
    }
    Ok(options)
}

/// Polls until every subscription is granted.
async fn subscribed(events: &mut EventLoop, topics: &[&str]) -> Result<(), Error> {
    let mut granted = 0;
    while granted < topics.len() {
        match events.poll().await.map_err(|e| Error::Broker(Box::new(e)))? {
            Event::Incoming(Packet::SubAck(ack)) => {
                for code in ack.return_codes {
                    if code == SubscribeReasonCode::Failure {
                        return Err(Error::SubscriptionRefused(topics[granted].to_owned()));
                    }
                    granted += 1;
                }
            }
            _ => continue,
        }
    }
    Ok(())
}

async fn listen(mut events: EventLoop, mut heard: Heard, cancel: CancellationToken) -> Heard {
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return heard,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.topic == crate::uplink::TOPIC {
                    heard.uplinks.take(&publish.payload);
                } else {
                    heard.answers.take(&publish.topic, &publish.payload);
                }
            }
            Ok(_) => {}
            Err(error) => {
                *heard.errors.entry(format!("broker connection: {error}")).or_default() += 1;
                // rumqttc reconnects on the next poll: not in a busy loop.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The device id and the decoded `values` of a platform message
/// `{"device_id":"…","values":"<base64>"}` (what the worker publishes).
pub fn envelope(payload: &[u8]) -> Option<(String, Vec<u8>)> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        device_id: String,
        values: &'a str,
    }
    let envelope: Envelope = serde_json::from_slice(payload).ok()?;
    let values = base64::engine::general_purpose::STANDARD.decode(envelope.values).ok()?;
    Some((envelope.device_id, values))
}
