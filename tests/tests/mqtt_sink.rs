//! The worker's broker connection against a real mosquitto: the event loop keeps
//! publishing and acknowledging whatever its downlink consumer does.

use std::sync::Arc;

use bytes::Bytes;
use script_worker::platform::mqtt::{Downlink, MqttConfig, MqttSink, Refusals, Subscription};
use script_worker::sink::{PlatformMessage, PlatformSink};
use tcpc_tests::mqtt::{Mosquitto, PLUGIN_PASSWORD, Watcher};
use tcpc_tests::{DEADLINE, wait_until};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Publishes probe downlinks until one reaches `queue`: the subscription is live.
async fn until_downlinks_flow(watcher: &Watcher, queue: &mut mpsc::Receiver<Downlink>) {
    let mut probe = 0;
    wait_until("the downlink subscription to be live", || {
        probe += 1;
        let topic = format!("plugin/TCP/devices/command/D001/probe{probe}");
        let received = queue.try_recv().is_ok();
        async move {
            if !received {
                watcher.publish(&topic, "{}").await;
            }
            received
        }
    })
    .await;
}

/// A downlink consumer that stopped taking downlinks (it waits on an edge pod, say)
/// must not stop the uplinks' PUBACKs: extra downlinks are refused and answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_downlink_consumer_does_not_stop_the_connection() {
    tcpc_tests::init_logging();
    let broker = Mosquitto::spawn().await;
    let mut watcher = Watcher::subscribe(&broker, &["devices/#"]).await;
    // Room for one downlink; the test reads it only to learn the subscription is live.
    let (deliveries, mut queue) = mpsc::channel::<Downlink>(1);
    let refuse = Arc::new(|topic: &str| {
        let id = topic.rsplit('/').next().unwrap_or_default();
        Some(PlatformMessage {
            topic: format!("devices/command/response/{id}"),
            payload: Bytes::from_static(br#"{"result":1}"#),
        })
    });
    let subscription =
        Subscription { filter: "plugin/TCP/#".into(), deliveries, refuse, refusals: Refusals::default() };
    let config = MqttConfig::from_url(&broker.url(), "worker-under-test", "plugin", "plugin".into()).unwrap();
    let stop = CancellationToken::new();
    let sink = MqttSink::start(config, Some(subscription), stop.clone(), &TaskTracker::new());
    until_downlinks_flow(&watcher, &mut queue).await;

    // The consumer is stuck from here on: one more fills its queue, the rest overflow.
    for n in 0..5 {
        watcher.publish(&format!("plugin/TCP/devices/command/D001/c{n}"), "{}").await;
    }
    let mut refused = Vec::new();
    while !refused.ends_with(&[4]) {
        let answer = watcher.next().await;
        if let Some(n) = answer.topic.strip_prefix("devices/command/response/c") {
            assert_eq!(&answer.payload[..], br#"{"result":1}"#);
            refused.push(n.parse::<u32>().unwrap());
        }
    }
    // A late probe may have taken the queue's one place, so c0 may be refused too.
    let first = refused[0];
    assert!(first <= 1, "c1 onwards refused: {refused:?}");
    assert_eq!(refused, (first..5).collect::<Vec<_>>(), "each refused once, in order");

    // Uplinks still go out and are acknowledged, in order.
    let mut acks = Vec::new();
    for n in 0..20 {
        let message = PlatformMessage {
            topic: "devices/telemetry".into(),
            payload: Bytes::from(format!(r#"{{"n":{n}}}"#)),
        };
        acks.push(
            tokio::time::timeout(DEADLINE, sink.publish(message, sink.epoch()))
                .await
                .expect("queued")
                .unwrap(),
        );
    }
    for (n, ack) in acks.into_iter().enumerate() {
        tokio::time::timeout(DEADLINE, ack)
            .await
            .expect("a PUBACK within the deadline")
            .unwrap_or_else(|error| panic!("publish {n} not acknowledged: {error}"));
    }
    for n in 0..20 {
        let message = watcher.next().await;
        assert_eq!(
            (message.topic.as_str(), &message.payload[..]),
            ("devices/telemetry", format!(r#"{{"n":{n}}}"#).as_bytes())
        );
    }
    assert!(sink.is_ready());
    stop.cancel();
}

/// A message the broker would refuse fails alone, as permanent; the connection and the
/// messages around it are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_broker_would_refuse_fails_alone() {
    tcpc_tests::init_logging();
    let broker = Mosquitto::spawn().await;
    let mut watcher = Watcher::subscribe(&broker, &["devices/#"]).await;
    let config = MqttConfig::from_url(&broker.url(), "worker-under-test", "plugin", "plugin".into()).unwrap();
    let stop = CancellationToken::new();
    let sink = MqttSink::start(config, None, stop.clone(), &TaskTracker::new());
    let message = |topic: &str, payload: Bytes| PlatformMessage { topic: topic.to_owned(), payload };
    let numbered = |n: u32| message("devices/telemetry", Bytes::from(format!(r#"{{"n":{n}}}"#)));
    let oversize = Bytes::from(vec![b'x'; script_worker::platform::mqtt::MAX_PACKET]);
    let sent = [
        numbered(0),
        message("devices/command/response/#", Bytes::from_static(b"{}")),
        numbered(1),
        message("devices/event/a\0b", Bytes::from_static(b"{}")),
        numbered(2),
        message("devices/telemetry", oversize),
        numbered(3),
    ];
    let mut acks = Vec::new();
    for message in sent {
        acks.push(
            tokio::time::timeout(DEADLINE, sink.publish(message, sink.epoch()))
                .await
                .expect("queued")
                .unwrap(),
        );
    }
    let mut outcomes = Vec::new();
    for ack in acks {
        let outcome = tokio::time::timeout(DEADLINE, ack).await.expect("an outcome within the deadline");
        outcomes.push(outcome.map_err(|error| error.is_permanent()));
    }
    assert_eq!(outcomes, [Ok(()), Err(true), Ok(()), Err(true), Ok(()), Err(true), Ok(())]);
    for n in 0..4 {
        let message = watcher.next().await;
        assert_eq!(
            (message.topic.as_str(), &message.payload[..]),
            ("devices/telemetry", format!(r#"{{"n":{n}}}"#).as_bytes())
        );
    }
    stop.cancel();
}

/// On shutdown the broker sees DISCONNECT, not a dropped socket.
#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_disconnects_cleanly() {
    tcpc_tests::init_logging();
    let broker = Mosquitto::spawn().await;
    let config = MqttConfig::from_url(&broker.url(), "worker-stopping", "plugin", "plugin".into()).unwrap();
    let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
    let sink = MqttSink::start(config, None, stop.clone(), &tasks);
    wait_until("the connection", || async { sink.is_ready() }).await;
    let message = PlatformMessage { topic: "devices/telemetry".into(), payload: Bytes::from_static(b"{}") };
    let ack = sink.publish(message, sink.epoch()).await.unwrap();
    tokio::time::timeout(DEADLINE, ack).await.expect("a PUBACK").unwrap();
    stop.cancel();
    tasks.close();
    tokio::time::timeout(DEADLINE, tasks.wait()).await.expect("the connection task ends");
    // Mosquitto logs "Client <id> disconnected." for a DISCONNECT, "closed its
    // connection" for a dropped socket.
    let ended = || -> Vec<String> {
        broker.log().lines().filter(|l| l.contains("Client worker-stopping")).map(str::to_owned).collect()
    };
    wait_until("the broker to log how the client left", || async { !ended().is_empty() }).await;
    let ended = ended();
    assert!(
        ended.len() == 1 && ended[0].ends_with("Client worker-stopping disconnected."),
        "a clean DISCONNECT, not a dropped socket: {ended:?}"
    );
}

/// A subscription the broker refuses leaves the worker deaf to downlinks: not ready,
/// counted, and asked again until granted; then downlinks flow.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_downlink_subscription_is_not_ready_and_asked_again() {
    tcpc_tests::init_logging();
    let broker = Mosquitto::spawn_refusing_subscriptions().await;
    let watcher = Watcher::subscribe(&broker, &["devices/#"]).await;
    let (deliveries, mut queue) = mpsc::channel::<Downlink>(16);
    let refusals = Refusals::default();
    let subscription = Subscription {
        filter: "plugin/TCP/#".into(),
        deliveries,
        refuse: Arc::new(|_: &str| None),
        refusals: refusals.clone(),
    };
    let config =
        MqttConfig::from_url(&broker.url(), "worker-under-test", "plugin", PLUGIN_PASSWORD.into()).unwrap();
    let stop = CancellationToken::new();
    let sink = MqttSink::start(config, Some(subscription), stop.clone(), &TaskTracker::new());
    wait_until("the broker to refuse the subscription", || std::future::ready(refusals.get() >= 1)).await;
    assert!(!sink.is_ready(), "a worker deaf to downlinks is not ready");

    broker.allow_subscriptions();
    wait_until("the subscription to be asked again and granted", || std::future::ready(sink.is_ready()))
        .await;
    until_downlinks_flow(&watcher, &mut queue).await;
    stop.cancel();
}

/// A message queued for a connection that was lost fails instead of going out on the
/// next one, where it would overtake its batch's retry; the retry (taking the new
/// epoch) goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_of_a_lost_connection_fails_instead_of_overtaking_its_retry() {
    tcpc_tests::init_logging();
    let mut broker = Mosquitto::spawn().await;
    let config = MqttConfig::from_url(&broker.url(), "worker-epochs", "plugin", "plugin".into()).unwrap();
    let stop = CancellationToken::new();
    let sink = MqttSink::start(config, None, stop.clone(), &TaskTracker::new());
    wait_until("the connection", || async { sink.is_ready() }).await;
    let before = sink.epoch();
    broker.stop().await;
    wait_until("the connection to be lost", || async { sink.epoch() > before }).await;
    broker.start().await;
    wait_until("the connection again", || async { sink.is_ready() }).await;
    let mut watcher = Watcher::subscribe(&broker, &["devices/#"]).await;

    let message = |n: u32| PlatformMessage {
        topic: "devices/telemetry".into(),
        payload: Bytes::from(format!(r#"{{"n":{n}}}"#)),
    };
    let stale = sink.publish(message(1), before).await.unwrap();
    assert_eq!(stale.await, Err(script_worker::sink::SinkError::ConnectionLost));
    let retried = sink.publish(message(2), sink.epoch()).await.unwrap();
    assert_eq!(retried.await, Ok(()));
    let received = watcher.next().await;
    assert_eq!(&received.payload[..], br#"{"n":2}"#, "only the retry reached the broker");
    stop.cancel();
}
