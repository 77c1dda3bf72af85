//! A real `mosquitto` on a free loopback port, and an MQTT subscriber that sees what the
//! platform would see.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::servers::{Process, free_port};
use crate::{DEADLINE, wait_until};

/// A mosquitto broker accepting anonymous clients (the platform's user `plugin` too).
pub struct Mosquitto {
    pub port: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    process: Process,
}

impl Mosquitto {
    pub async fn spawn() -> Self {
        let port = free_port();
        let base = std::env::temp_dir().join(format!("tcpc-mosquitto-{}-{port}", std::process::id()));
        let (config, log) = (base.with_extension("conf"), base.with_extension("log"));
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n\
                 max_queued_messages 0\nlog_dest file {}\n",
                log.display()
            ),
        )
        .expect("write mosquitto config");
        let process = Process::start("mosquitto", &["-c".to_owned(), config.display().to_string()]);
        let broker = Mosquitto { port, config, log, process };
        wait_until("mosquitto to accept connections", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (connections and how they ended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One message as the broker delivered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
}

impl Received {
    /// The decoded `values` of an uplink envelope, after checking its `device_id`.
    pub fn values(&self, device_id: &str) -> serde_json::Value {
        use base64::Engine as _;
        let envelope: serde_json::Value = serde_json::from_slice(&self.payload).expect("a JSON envelope");
        assert_eq!(envelope["device_id"], device_id, "envelope of {}", self.topic);
        let values = envelope["values"].as_str().expect("values is a base64 string");
        let raw = base64::engine::general_purpose::STANDARD.decode(values).expect("valid base64");
        serde_json::from_slice(&raw).expect("values are JSON")
    }
}

/// A subscriber on the broker.
pub struct Watcher {
    messages: mpsc::UnboundedReceiver<Received>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Subscribes `topics` at QoS 1; returns once the broker acknowledged.
    pub async fn subscribe(broker: &Mosquitto, topics: &[&str]) -> Self {
        let id = format!("watcher-{}", rand_suffix());
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 64);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        for topic in topics {
            client.subscribe(*topic, QoS::AtLeastOnce).await.expect("subscribe");
        }
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (tx, messages) = mpsc::unbounded_channel();
        let expected = topics.len();
        let publisher = client.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut acked = 0;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acked += 1;
                        if acked == expected {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = tx.send(Received { topic: publish.topic, payload: publish.payload });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, ready.recv()).await.expect("SubAck within the deadline");
        Watcher { messages, client: publisher, task }
    }

    /// Publishes as the platform does (QoS 1, no retain).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await.expect("publish");
    }

    /// The next message, within `DEADLINE`.
    pub async fn next(&mut self) -> Received {
        self.next_within(DEADLINE).await.expect("an MQTT message within the deadline")
    }

    /// The next message, or None after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.messages.recv()).await.ok().flatten()
    }

    /// The next message on `topic` (others are skipped).
    pub async fn next_on(&mut self, topic: &str) -> Received {
        loop {
            let message = self.next().await;
            if message.topic == topic {
                return message;
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}
