//! Why a run could not be made.

/// A run that could not be started or finished (what a device or the system under test
/// does wrong is counted in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Settings(String),
    #[error("edge address {name:?}")]
    Resolve {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("MQTT URL {url:?}")]
    MqttUrl {
        url: String,
        #[source]
        source: rumqttc::OptionError,
    },
    #[error("the MQTT broker")]
    Broker(#[source] Box<rumqttc::ConnectionError>),
    #[error("the MQTT broker did not acknowledge the subscriptions within {0:?}")]
    SubscriptionTimeout(std::time::Duration),
    #[error("the MQTT broker refused the subscription to {0}")]
    SubscriptionRefused(String),
    #[error("the MQTT client")]
    Client(#[source] rumqttc::ClientError),
    #[error("starting shard process {index}")]
    Spawn {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("shard process {index}")]
    ShardIo {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("shard process {index} ended without its report")]
    ShardLost { index: u32 },
    #[error("the parent process (stdin, stdout)")]
    Parent(#[source] std::io::Error),
}
