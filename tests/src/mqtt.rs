//! A real `mosquitto` on a free loopback port, and an MQTT subscriber that sees what the
//! platform would see.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::servers::{Process, free_port};
use crate::{DEADLINE, wait_until};

/// A mosquitto broker accepting anonymous clients (the platform's user `plugin` too).
/// It keeps its sessions in a store of its own when stopped, so that it can be
/// restarted on the same port with them (a broker restart, not a new broker).
pub struct Mosquitto {
    pub port: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    store: std::path::PathBuf,
    process: Process,
}

/// The password of the platform user `plugin` on [`Mosquitto::spawn_refusing_subscriptions`].
pub const PLUGIN_PASSWORD: &str = "plugin-pw";
/// The dynamic-security administrator of [`Mosquitto::spawn_refusing_subscriptions`],
/// with the plugin user's password: `mosquitto_ctrl` hashes passwords only when it talks
/// to a running broker, so the plugin user is given a copy of the admin's hash.
const ADMIN: (&str, &str) = ("admin", PLUGIN_PASSWORD);

impl Mosquitto {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| String::new()).await
    }

    /// A broker whose dynamic-security plugin lets the platform user `plugin` (password
    /// [`PLUGIN_PASSWORD`]) publish anywhere but subscribe nowhere, so that its SUBACKs
    /// refuse (0x80), until [`Mosquitto::allow_subscriptions`]; anonymous clients (the
    /// watchers) publish anywhere and subscribe to `devices/#`.
    pub async fn spawn_refusing_subscriptions() -> Self {
        Self::spawn_with(|store| {
            let file = store.join("dynamic-security.json");
            let made = std::process::Command::new("mosquitto_ctrl")
                .args(["dynsec", "init", &file.display().to_string(), ADMIN.0, ADMIN.1])
                .stdout(std::process::Stdio::null())
                .status()
                .expect("run mosquitto_ctrl");
            assert!(made.success(), "dynamic security initialised");
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).expect("read the dynamic security file"))
                    .unwrap();
            let mut plugin = config["clients"][0].clone();
            plugin["username"] = "plugin".into();
            plugin["roles"] = serde_json::json!([{"rolename": "worker"}]);
            config["clients"].as_array_mut().unwrap().push(plugin);
            let roles = config["roles"].as_array_mut().unwrap();
            roles.push(serde_json::json!({"rolename": "worker", "acls": [
                {"acltype": "publishClientSend", "topic": "#", "allow": true}]}));
            roles.push(serde_json::json!({"rolename": "anyone", "acls": [
                {"acltype": "publishClientSend", "topic": "#", "allow": true},
                {"acltype": "subscribePattern", "topic": "devices/#", "allow": true}]}));
            config["groups"] =
                serde_json::json!([{"groupname": "anonymous", "roles": [{"rolename": "anyone"}]}]);
            config["anonymousGroup"] = "anonymous".into();
            std::fs::write(&file, config.to_string()).expect("write the dynamic security file");
            // mosquitto, running as its own user, saves changes to it.
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
            format!(
                "plugin {}\nplugin_opt_config_file {}\n",
                dynamic_security_plugin().display(),
                file.display()
            )
        })
        .await
    }

    /// Lets the platform user subscribe to `plugin/#` from now on (a live change).
    pub fn allow_subscriptions(&self) {
        let port = self.port.to_string();
        let changed = std::process::Command::new("mosquitto_ctrl")
            .args(["-h", "127.0.0.1", "-p", &port, "-u", ADMIN.0, "-P", ADMIN.1])
            .args(["dynsec", "addRoleACL", "worker", "subscribePattern", "plugin/#", "allow"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run mosquitto_ctrl");
        assert!(changed.success(), "subscriptions allowed");
    }

    /// A broker with `extra` configuration (given its store directory).
    async fn spawn_with(extra: impl FnOnce(&std::path::Path) -> String) -> Self {
        let port = free_port();
        let base = std::env::temp_dir().join(format!("tcpc-mosquitto-{}-{port}", std::process::id()));
        let (config, log, store) =
            (base.with_extension("conf"), base.with_extension("log"), base.with_extension("d"));
        std::fs::create_dir_all(&store).expect("mosquitto store");
        // Started as root, mosquitto drops to its own user, which must be able to write here.
        let writable = std::os::unix::fs::PermissionsExt::from_mode(0o777);
        std::fs::set_permissions(&store, writable).expect("mosquitto store writable");
        let extra = extra(&store);
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\n\
                 persistence true\npersistence_location {}/\nlog_dest file {}\n{extra}",
                store.display(),
                log.display()
            ),
        )
        .expect("write mosquitto config");
        let mut broker = Mosquitto { port, config, log, store, process: Process::default() };
        broker.start().await;
        broker
    }

    /// Starts the broker (again) and waits until it accepts connections.
    pub async fn start(&mut self) {
        self.process = Process::start("mosquitto", &["-c".to_owned(), self.config.display().to_string()]);
        let port = self.port;
        wait_until("mosquitto to accept connections", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }

    /// Stops the broker (SIGTERM: it saves its sessions) and waits until it exited.
    pub async fn stop(&mut self) {
        self.process.terminate();
        wait_until("mosquitto to exit", || std::future::ready(self.process.exited())).await;
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (connections and how they ended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Where the mosquitto package put its dynamic-security plugin: under the library
/// directory, in a multiarch subdirectory on Debian and Ubuntu.
fn dynamic_security_plugin() -> std::path::PathBuf {
    const PLUGIN: &str = "mosquitto_dynamic_security.so";
    let lib = std::path::Path::new("/usr/lib");
    let multiarch =
        std::fs::read_dir(lib).into_iter().flatten().flatten().map(|entry| entry.path().join(PLUGIN));
    std::iter::once(lib.join(PLUGIN))
        .chain(multiarch)
        .find(|path| path.exists())
        .expect("mosquitto's dynamic-security plugin installed (package mosquitto)")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.store);
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
        Self::start(broker, &format!("watcher-{}", rand_suffix()), true, topics).await
    }

    /// A subscriber with a persistent session (`id`, no clean session): across a broker
    /// restart it keeps its subscriptions, and gets what was published while it was away.
    pub async fn durable(broker: &Mosquitto, id: &str, topics: &[&str]) -> Self {
        Self::start(broker, id, false, topics).await
    }

    async fn start(broker: &Mosquitto, id: &str, clean_session: bool, topics: &[&str]) -> Self {
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_clean_session(clean_session);
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
