//! The worker end to end: real nats-server, redis-server and mosquitto, the fake
//! ThingsPanel backend, workers as processes, an edge in-process, real TCP devices; the
//! MQTT watcher sees what the platform would.

use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_gateway::codec::{Frame, cmd};
use serde_json::{Value, json};
use tcpc_proto::v1::{UplinkEnvelope, uplink_envelope};
use tcpc_tests::device::{RawDevice, TpDevice};
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::world::{World, partition_owner, wait_for_partitions};
use tcpc_tests::{first_seen, wait_until};

async fn world() -> World {
    World::start().await
}

#[tokio::test(flavor = "multi_thread")]
async fn tp_and_custom_devices_reach_the_platform_as_thingspanel_expects() {
    let w = world().await;
    w.device("tp-token", "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10", "D001", Value::Null);
    w.device(
        "custom-token",
        "dev-custom",
        "C001",
        json!({
            "protocol": "custom", "framing": "delimiter", "delimiter": "\\n",
            "uplink_script": "function decode(b) { var p = String.fromCharCode.apply(null, b).split(','); return {temperature: p[0] / 10, humidity: p[1] / 10}; }"
        }),
    );
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/#", "gateway/#"]).await;
    let _worker = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;

    let mut tp = TpDevice::online(edge.official, "tp-token").await;
    let status = watcher.next().await;
    assert_eq!(
        (status.topic.as_str(), &status.payload[..]),
        ("devices/status/6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10", &b"1"[..])
    );
    tp.send(Frame::data(cmd::ATTRIBUTES, &br#"{"temperature":36.5,"humidity":52}"#[..])).await;
    let telemetry = watcher.next().await;
    assert_eq!(telemetry.topic, "devices/telemetry");
    // Exactly the fixture's envelope (topics.txt).
    assert_eq!(
        &telemetry.payload[..],
        br#"{"device_id":"6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10","values":"eyJ0ZW1wZXJhdHVyZSI6MzYuNSwiaHVtaWRpdHkiOjUyfQ=="}"#
    );
    tp.send(Frame::data(cmd::EVENTS, &br#"{"method":"alarm","params":{"level":2}}"#[..])).await;
    let event = watcher.next().await;
    assert!(event.topic.starts_with("devices/event/"), "{}", event.topic);
    assert_eq!(
        event.values("6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10"),
        json!({"method": "alarm", "params": {"level": 2}})
    );
    drop(tp);
    let offline = watcher.next().await;
    assert_eq!(
        (offline.topic.as_str(), &offline.payload[..]),
        ("devices/status/6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10", &b"0"[..])
    );

    let mut custom = RawDevice::connect(edge.custom).await;
    custom.send(b"custom-token\n365,520\n").await;
    assert_eq!(&watcher.next_on("devices/status/dev-custom").await.payload[..], b"1");
    let telemetry = watcher.next_on("devices/telemetry").await;
    assert_eq!(telemetry.values("dev-custom"), json!({"temperature": 36.5, "humidity": 52}));
    wait_until("a plugin heartbeat", || async { !w.platform.heartbeats().is_empty() }).await;
    assert_eq!(w.platform.heartbeats()[0], "TCP");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_sub_device_data_is_gateway_telemetry() {
    let w = world().await;
    let fixture: Value =
        serde_json::from_str(include_str!("../fixtures/thingspanel/device_config_gateway.json")).unwrap();
    let data = fixture["data"].clone();
    let voucher = data["voucher"].as_str().unwrap().to_owned();
    w.platform.add(&voucher, data);
    let mut watcher = Watcher::subscribe(&w.broker, &["gateway/#", "devices/status/#"]).await;
    let _worker = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;
    let mut gateway = TpDevice::online(edge.official, "gw-token-001").await;
    assert_eq!(&watcher.next().await.payload[..], b"1");
    gateway.send(Frame::data(cmd::ATTRIBUTES, &br#"{"3c20c6206":{"temperature":36.5}}"#[..])).await;
    let message = watcher.next().await;
    assert_eq!(message.topic, "gateway/telemetry");
    assert_eq!(
        message.values("0f4c2a7d-8e91-4b3c-a6d2-5e7f9b1c3d20"),
        json!({"sub_device_data": {"3c20c6206": {"temperature": 36.5}}})
    );
    gateway
        .send(Frame::data(
            cmd::TELEMETRY,
            &br#"{"gateway_data":{"rssi":-60},"sub_device_data":{"3c20c6207":{"humidity":52}}}"#[..],
        ))
        .await;
    assert_eq!(
        watcher.next().await.values("0f4c2a7d-8e91-4b3c-a6d2-5e7f9b1c3d20"),
        json!({"gateway_data": {"rssi": -60}, "sub_device_data": {"3c20c6207": {"humidity": 52}}})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused_and_retries_do_not_hammer_the_platform() {
    let w = world().await;
    // Two workers share the auth requests: the per-voucher gate holds across them.
    let workers = [w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await];
    let edge = w.edge().await;
    let started = Instant::now();
    for _ in 0..100 {
        let mut device = TpDevice::connect(edge.official).await;
        assert_eq!(device.auth("wrong-token").await, r#"{"result":1,"message":"unknown access token"}"#);
    }
    let elapsed = started.elapsed();
    let calls =
        w.platform.calls().into_iter().filter(|(key, _)| key == r#"{"access_token":"wrong-token"}"#).count();
    let allowed = 1 + (elapsed.as_secs_f64() / 3.0) as usize;
    assert!(calls >= 1 && calls <= allowed, "{calls} platform calls in {elapsed:?} (at most {allowed})");
    for worker in &workers {
        let refused = worker.metric("worker_auth_total{reason=\"unknown\"}").await;
        assert!(refused > 0.0, "{} answered none of the attempts", worker.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_scripts_are_contained() {
    let w = world().await;
    let scripts = [
        ("throws", "function decode(b) { throw new Error('bad frame'); }", "script_error"),
        ("loops", "function decode(b) { while (true) {} }", "script_timeout"),
        (
            "hoards",
            "function decode(b) { var a = []; while (true) a.push(new Array(10000).fill(1)); }",
            "script_memory",
        ),
        (
            "snoops",
            "function decode(b) { return require('fs').readFileSync('/etc/passwd'); }",
            "script_error",
        ),
    ];
    for (name, script, _) in scripts {
        w.device(
            name,
            &format!("dev-{name}"),
            name,
            json!({"protocol": "custom", "framing": "delimiter", "uplink_script": script}),
        );
    }
    w.device("good", "dev-good", "good", json!({"protocol": "custom", "framing": "delimiter", "uplink_script": "function decode(b) { return {n: b.length}; }"}));
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;
    let mut good = RawDevice::connect(edge.custom).await;
    good.send(b"good\n").await;
    for (round, (name, _, reason)) in scripts.iter().enumerate() {
        let before = worker.metric(&format!("worker_uplink_errors_total{{reason=\"{reason}\"}}")).await;
        let mut broken = RawDevice::connect(edge.custom).await;
        broken.send(format!("{name}\nx\n").as_bytes()).await;
        wait_until(&format!("the {name} script error to be reported"), || async {
            worker.metric(&format!("worker_uplink_errors_total{{reason=\"{reason}\"}}")).await > before
        })
        .await;
        // The worker is alive and other devices are unaffected.
        good.send(&vec![b'g'; round + 1]).await;
        good.send(b"\n").await;
        assert_eq!(watcher.next().await.values("dev-good"), json!({"n": round + 1}), "after {name}");
    }
    assert!(worker.get("/healthz").await.unwrap().contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_feeding_garbage_to_a_shared_script_is_quarantined_alone() {
    let w = world().await;
    let library = std::env::temp_dir().join(format!("tcpc-scripts-{}", std::process::id()));
    std::fs::create_dir_all(&library).unwrap();
    let shared =
        "function decode(b) { if (b[0] === 0x21) throw new Error('garbage'); return {n: b.length}; }";
    std::fs::write(library.join("shared.js"), shared).unwrap();
    for name in ["bad", "good"] {
        let settings = json!({"protocol": "custom", "framing": "delimiter", "uplink_script": "lib:shared"});
        w.device(name, &format!("dev-{name}"), name, settings);
    }
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &["--scripts-dir", library.to_str().unwrap()]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge().await;
    let quarantined =
        || async { worker.metric("worker_uplink_errors_total{reason=\"script_quarantined\"}").await };
    let mut bad = RawDevice::connect(edge.custom).await;
    bad.send(
        b"bad
",
    )
    .await;
    // Five failures in a row quarantine the script for this device: the sixth is not run.
    for _ in 0..6 {
        bad.send(
            b"!
",
        )
        .await;
    }
    wait_until("the sixth garbage frame to meet the quarantine", || async { quarantined().await >= 1.0 })
        .await;
    assert_eq!(worker.metric("worker_uplink_errors_total{reason=\"script_error\"}").await, 5.0);
    // The same library script still serves another device.
    let mut good = RawDevice::connect(edge.custom).await;
    good.send(
        b"good
abc
",
    )
    .await;
    assert_eq!(watcher.next().await.values("dev-good"), json!({"n": 3}));
    let _ = std::fs::remove_dir_all(&library);
}

/// Reads `device_id`'s numbered telemetry after `seen` until each of `0..count` was seen;
/// every value read, in arrival order (duplicates included).
async fn read_until_all(watcher: &mut Watcher, device_id: &str, mut seen: Vec<u64>, count: u64) -> Vec<u64> {
    let mut distinct: std::collections::HashSet<u64> = seen.iter().copied().collect();
    while distinct.len() < count as usize {
        let n = watcher.next().await.values(device_id)["n"].as_u64().unwrap();
        distinct.insert(n);
        seen.push(n);
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_keep_a_device_in_order() {
    let w = world().await;
    w.device("counter", "dev-counter", "N001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let a = w.worker("worker-a", &[]).await;
    let b = w.worker("worker-b", &[]).await;
    wait_for_partitions(&[&a, &b]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "counter").await;
    let started = Instant::now();
    device.send_numbered(0..1000).await;
    let mut seen = Vec::new();
    while seen.len() < 1000 {
        seen.push(watcher.next().await.values("dev-counter")["n"].as_u64().unwrap());
    }
    let elapsed = started.elapsed();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>(), "all, once, in order");
    println!(
        "1000 uplinks through edge, JetStream, worker and mosquitto in {elapsed:?} ({:.0}/s)",
        1000.0 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_loses_nothing() {
    let w = world().await;
    w.device("steady", "dev-steady", "N002", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let mut workers = [w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await];
    wait_for_partitions(&[&workers[0], &workers[1]]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "steady").await;
    device.send_numbered(0..300).await;
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(watcher.next().await.values("dev-steady")["n"].as_u64().unwrap());
    }
    // Kill the worker that owns the device's partition.
    let victim = partition_owner(&w, &workers, "dev-steady").await;
    let owner = workers[victim].name.clone();
    workers[victim].kill();
    device.send_numbered(300..1000).await;
    let seen = read_until_all(&mut watcher, "dev-steady", seen, 1000).await;
    let duplicates = seen.len() - 1000;
    assert_eq!(first_seen(&seen), (0..1000).collect::<Vec<_>>(), "every message, first seen in order");
    println!("killed {owner} mid-stream: 1000 messages arrived, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread")]
async fn known_devices_authenticate_from_cache_while_the_platform_is_down() {
    let w = world().await;
    w.device("known", "dev-known", "K001", Value::Null);
    w.device("stranger", "dev-stranger", "K002", Value::Null);
    let mut first = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;
    drop(TpDevice::online(edge.official, "known").await);
    // Only a stale copy left: the shared one aged past its hour of freshness, and a
    // worker with nothing in memory.
    first.kill();
    let mut redis = w.redis.connection().await;
    let shared: Vec<String> = redis::AsyncCommands::keys(&mut redis, "tcpc:config:*").await.unwrap();
    assert_eq!(shared.len(), 1, "the known device's config is shared once (its id and number point to it)");
    for key in &shared {
        let text: String = redis::AsyncCommands::get(&mut redis, key).await.unwrap();
        let mut entry: Value = serde_json::from_str(&text).unwrap();
        entry["fetched_ms"] = json!(tcpc_proto::now_ms() - 2 * 3600 * 1000);
        let () = redis::AsyncCommands::set(&mut redis, key, entry.to_string()).await.unwrap();
    }
    w.platform.set_down(true);
    let _worker = w.worker("worker-b", &[]).await;
    let calls_before = w.platform.calls().len();
    // Known: served from the stale config. New: refused for now, and told to retry.
    drop(TpDevice::online(edge.official, "known").await);
    let mut stranger = TpDevice::connect(edge.official).await;
    assert_eq!(
        stranger.auth("stranger").await,
        r#"{"result":1,"message":"authentication unavailable, retry later"}"#
    );
    // Retries during the outage back off instead of hammering the platform.
    for _ in 0..20 {
        let mut again = TpDevice::connect(edge.official).await;
        assert!(again.auth("stranger").await.contains(r#""result":1"#));
    }
    let calls = w.platform.calls().len() - calls_before;
    assert!(calls <= 2, "{calls} calls to a platform that is down");
    w.platform.set_down(false);
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_disconnect_closes_the_device_and_its_config_is_fetched_again() {
    let w = world().await;
    w.device("tp-token", "dev-edit", "E001", Value::Null);
    let worker = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    let calls =
        || w.platform.calls().iter().filter(|(key, _)| key == r#"{"access_token":"tp-token"}"#).count();
    assert_eq!(calls(), 1);
    // What the platform sends after a device or config edit.
    let mut http = tokio::net::TcpStream::connect(worker.http).await.unwrap();
    let body = r#"{"device_id":"dev-edit"}"#;
    let request = format!(
        "POST /api/v1/device/disconnect HTTP/1.0\r\nHost: plugin\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut http, request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut http, &mut reply).await.unwrap();
    assert!(reply.ends_with(r#"{"code":200,"message":"success","data":null}"#), "{reply}");
    device.expect_closed_with(cmd::ERROR, "disconnected by the platform").await;
    // The device reconnects (after the platform's 3 s per-voucher window) and its
    // config is asked for again, not served from the dropped cache.
    wait_until("the platform's rate window to pass", || async {
        w.platform.calls().last().is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(3))
    })
    .await;
    drop(TpDevice::online(edge.official, "tp-token").await);
    assert_eq!(calls(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auth_request_the_edge_gave_up_on_is_skipped() {
    use prost::Message as _;
    use tcpc_proto::v1::{AuthReply, AuthRequest, Protocol};
    let w = world().await;
    w.device("late", "dev-late", "L001", Value::Null);
    w.device("prompt", "dev-prompt", "L002", Value::Null);
    let worker = w.worker("worker-a", &[]).await;
    let nats = w.nats.client().await;
    let request = |token: &str, deadline_ms: i64| {
        let request = AuthRequest {
            protocol: Protocol::Official.into(),
            access_token: token.to_owned(),
            connection_id: "0123456789abcdef0123456789abcdef".to_owned(),
            pod: "edge-a".to_owned(),
            remote_addr: "127.0.0.1:40000".to_owned(),
            deadline_ms,
        };
        Bytes::from(request.encode_to_vec())
    };
    let answered = || async {
        let deadline = tcpc_proto::now_ms() + 30_000;
        let reply = nats.request(tcpc_proto::names::AUTH_SUBJECT, request("prompt", deadline)).await.ok()?;
        AuthReply::decode(reply.payload).ok()
    };
    wait_until("the auth responder to answer", || async { answered().await.is_some_and(|r| r.ok) }).await;

    // The edge stopped waiting a second ago: its device is gone.
    let inbox = nats.new_inbox();
    let given_up = request("late", tcpc_proto::now_ms() - 1_000);
    nats.publish_with_reply(tcpc_proto::names::AUTH_SUBJECT, inbox, given_up).await.unwrap();
    // One responder takes requests in order: once the next one is answered, the late one
    // was seen.
    assert!(answered().await.expect("answered").ok);
    assert_eq!(worker.metric("worker_auth_total{reason=\"expired\"}").await, 1.0);
    let late_calls =
        w.platform.calls().into_iter().filter(|(key, _)| key == r#"{"access_token":"late"}"#).count();
    assert_eq!(late_calls, 0, "the platform was not asked for a device that is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_frames_are_dead_lettered_and_the_device_goes_on() {
    use prost::Message as _;
    let w = world().await;
    w.device("poison", "dev-poison", "P001", Value::Null);
    let mut watcher =
        Watcher::subscribe(&w.broker, &["devices/telemetry", "devices/command/response/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "poison").await;
    // Message ids the broker would refuse as a topic level, between numbered telemetry.
    let long = "9".repeat(200);
    let poisons = ["#", "+", "a\\u0000b", long.as_str()];
    for (n, id) in poisons.iter().enumerate() {
        device.send_numbered(n as u32..n as u32 + 1).await;
        let response = format!(r#"{{"message_id":"{id}","result":0}}"#);
        device.send(Frame::data(cmd::COMMAND_RESPONSE, Bytes::from(response))).await;
    }
    device.send(Frame::data(cmd::COMMAND_RESPONSE, &br#"{"message_id":"ok1","result":0}"#[..])).await;
    device.send_numbered(4..5).await;
    for n in 0..4 {
        let message = watcher.next().await;
        assert_eq!(
            (message.topic.as_str(), message.values("dev-poison")),
            ("devices/telemetry", json!({"n": n}))
        );
    }
    let answer = watcher.next().await;
    assert_eq!(
        (answer.topic.as_str(), answer.values("dev-poison")),
        ("devices/command/response/ok1", json!({"result": 0}))
    );
    assert_eq!(watcher.next().await.values("dev-poison"), json!({"n": 4}), "the device's next frame arrives");

    // Each poison kept once, in order, with its reason and its frame.
    let jetstream = async_nats::jetstream::new(w.nats.client().await);
    let mut dead =
        jetstream.get_stream(tcpc_proto::names::DEAD_LETTER_STREAM).await.expect("the dead-letter stream");
    // A dead letter is written before the ack covers its envelope, not before later
    // envelopes reach the platform: the partition hands them on meanwhile.
    wait_until("every poison kept", || {
        let mut dead = dead.clone();
        async move { dead.info().await.unwrap().state.messages >= poisons.len() as u64 }
    })
    .await;
    assert_eq!(dead.info().await.unwrap().state.messages, poisons.len() as u64, "each once");
    for (n, id) in poisons.iter().enumerate() {
        let letter = dead.get_raw_message(n as u64 + 1).await.unwrap();
        let reason = letter.headers.get(tcpc_proto::names::DEAD_LETTER_REASON_HEADER).unwrap();
        assert_eq!(reason.as_str(), "message_id unusable in a topic");
        let envelope = tcpc_proto::v1::UplinkEnvelope::decode(letter.payload).unwrap();
        let Some(tcpc_proto::v1::uplink_envelope::Body::Uplink(uplink)) = envelope.body else {
            panic!("an uplink")
        };
        let frame: Value = serde_json::from_slice(&uplink.payload).unwrap();
        assert_eq!(frame["message_id"].as_str().unwrap().replace('\0', "\\u0000"), *id);
    }
    assert_eq!(worker.metric("worker_dead_letters_total{reason=\"bad_message_id\"}").await, 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn uplinks_wait_out_a_platform_outage_instead_of_being_dropped() {
    let w = world().await;
    w.device("outage", "dev-outage", "O001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let mut first = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&first]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "outage").await;
    device.send_numbered(0..1).await;
    assert_eq!(watcher.next().await.values("dev-outage"), json!({"n": 0}));

    // A worker that never saw the device takes over, with nothing cached to read, while
    // the platform is down: it cannot look the device up.
    first.kill();
    let mut redis = w.redis.connection().await;
    let cached: Vec<String> = redis::AsyncCommands::keys(&mut redis, "tcpc:config*").await.unwrap();
    assert!(!cached.is_empty(), "the first worker shared the device's config");
    let () = redis::AsyncCommands::del(&mut redis, cached).await.unwrap();
    w.platform.set_down(true);
    let second = w.worker("worker-b", &[]).await;
    wait_for_partitions(&[&second]).await;
    device.send_numbered(1..4).await;
    wait_until("the lookup to fail and be retried", || async {
        second.metric("worker_uplink_retries_total").await >= 1.0
    })
    .await;
    w.platform.set_down(false);
    // Held, not acknowledged as handled: every one arrives, in order (0 may come again:
    // the killed worker may not have acknowledged it).
    let mut seen = Vec::new();
    while seen.last() != Some(&3) {
        seen.push(watcher.next().await.values("dev-outage")["n"].as_u64().unwrap());
    }
    let after_outage: Vec<u64> = seen.into_iter().skip_while(|n| *n == 0).collect();
    assert_eq!(after_outage, [1, 2, 3], "nothing missing, in order, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_mid_stream_hands_over_without_duplicates() {
    const COUNT: u64 = 3000;
    let w = world().await;
    w.device("steady", "dev-steady", "N003", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let mut first = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&first]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "steady").await;
    // Sent while the worker stops, so that it stops in the middle of a batch.
    let sender = tokio::spawn(async move {
        device.send_numbered(0..COUNT as u32).await;
        device
    });
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(watcher.next().await.values("dev-steady")["n"].as_u64().unwrap());
    }
    // A shutdown mid-stream: the batch under way is finished and acknowledged first.
    first.stop().await;
    let _second = w.worker("worker-b", &[]).await;
    let _device = sender.await.unwrap();
    let seen = read_until_all(&mut watcher, "dev-steady", seen, COUNT).await;
    assert_eq!(seen.len() as u64 - COUNT, 0, "no duplicate");
    assert_eq!(seen, (0..COUNT).collect::<Vec<_>>(), "all, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_with_one_pod_name_share_no_partition() {
    let w = world().await;
    w.device("counter", "dev-twin", "T001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let a = w.worker("twin", &[]).await;
    let b = w.worker("twin", &[]).await;
    // Between them, each partition once (not each of them all of them).
    wait_for_partitions(&[&a, &b]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "counter").await;
    device.send_numbered(0..200).await;
    let mut seen = Vec::new();
    while seen.len() < 200 {
        seen.push(watcher.next().await.values("dev-twin")["n"].as_u64().unwrap());
    }
    assert_eq!(seen, (0..200).collect::<Vec<_>>(), "all, once, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_loses_nothing_and_keeps_the_order() {
    const COUNT: u64 = 600;
    let mut w = world().await;
    w.device("restart", "dev-restart", "R001", Value::Null);
    // The platform's side keeps its session across the restart: what is published while
    // it reconnects is kept for it.
    let mut watcher = Watcher::durable(&w.broker, "platform", &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "restart").await;
    device.send_numbered(0..100).await;
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(watcher.next().await.values("dev-restart")["n"].as_u64().unwrap());
    }
    // The broker goes away: uplinks keep coming, the worker holds their acks and retries.
    w.broker.stop().await;
    device.send_numbered(100..300).await;
    wait_until("a batch to fail and be retried", || async {
        worker.metric("worker_uplink_retries_total").await >= 1.0
    })
    .await;
    w.broker.start().await;
    device.send_numbered(300..COUNT as u32).await;
    let seen = read_until_all(&mut watcher, "dev-restart", seen, COUNT).await;
    assert_eq!(first_seen(&seen), (0..COUNT).collect::<Vec<_>>(), "nothing missing, first seen in order");
    println!("broker restarted mid-stream: {COUNT} arrived, {} duplicates", seen.len() as u64 - COUNT);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_restart_mid_stream_keeps_a_chatty_devices_order_through_a_wide_window() {
    const COUNT: u64 = 3000;
    let mut w = world().await;
    w.device("chatty", "dev-chatty", "W001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    // The default window: many publishes of the one connection in flight when NATS goes.
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "chatty").await;
    let sender = tokio::spawn(async move {
        device.send_numbered(0..COUNT as u32).await;
        device
    });
    let mut seen = Vec::new();
    while seen.len() < 200 {
        seen.push(watcher.next().await.values("dev-chatty")["n"].as_u64().unwrap());
    }
    // Back at once: the NATS client sends what it buffered after the reconnect, while
    // the edge re-sends its window from the first publish the old connection lost.
    w.nats.stop();
    w.nats.start().await;
    let _device = sender.await.unwrap();
    let seen = read_until_all(&mut watcher, "dev-chatty", seen, COUNT).await;
    assert_eq!(first_seen(&seen), (0..COUNT).collect::<Vec<_>>(), "nothing missing, first seen in order");
    let gaps = worker.metric(r#"worker_uplink_out_of_order_total{reason="gap"}"#).await;
    let late = worker.metric(r#"worker_uplink_out_of_order_total{reason="late"}"#).await;
    println!(
        "NATS restarted under a window of publishes: {COUNT} arrived, {} duplicates, gaps {gaps}, late {late}",
        seen.len() as u64 - COUNT
    );
}

/// Stores an envelope of `device_id`'s connection in the uplink stream as its edge would
/// (its partition's subject, message id `<connection>-<sequence>`), the telemetry
/// `{"n": sequence}` or else the session event in `state`.
async fn store_envelope(
    jetstream: &async_nats::jetstream::Context,
    device_id: &str,
    connection: &str,
    sequence: u64,
    state: Option<tcpc_proto::v1::SessionState>,
) {
    use prost::Message as _;
    use tcpc_proto::names;
    use tcpc_proto::v1::{Protocol, SessionEvent, Uplink, UplinkKind};
    let body = match state {
        None => uplink_envelope::Body::Uplink(Uplink {
            device_id: device_id.into(),
            connection_id: connection.into(),
            protocol: Protocol::Official.into(),
            kind: UplinkKind::Telemetry.into(),
            payload: format!(r#"{{"n":{sequence}}}"#).into(),
            received_at_ms: 0,
            sequence,
        }),
        Some(state) => uplink_envelope::Body::Session(SessionEvent {
            device_id: device_id.into(),
            connection_id: connection.into(),
            state: state.into(),
            sequence,
            owned_route: true,
            protocol: Protocol::Official.into(),
            ..Default::default()
        }),
    };
    let subject = names::uplink_subject(names::partition_of(device_id, names::DEFAULT_PARTITIONS));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", names::uplink_message_id(connection, sequence).as_str());
    let envelope = UplinkEnvelope { body: Some(body) }.encode_to_vec();
    let ack = jetstream.publish_with_headers(subject, headers, envelope.into()).await.unwrap();
    ack.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connections_envelopes_stored_out_of_order_reach_the_platform_in_sequence() {
    let w = world().await;
    w.device("reordered", "dev-reordered", "O001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    // As the stream holds a window after a NATS reconnect: the client's buffered
    // publishes (5, 6) stored before the edge's re-send from the first lost one (3, 4).
    let jetstream = async_nats::jetstream::new(w.nats.client().await);
    let connection = "00000000000000aa00000000000000bb";
    for sequence in [1u64, 2, 5, 6, 3, 4, 7] {
        store_envelope(&jetstream, "dev-reordered", connection, sequence, None).await;
    }
    let mut seen = Vec::new();
    while seen.len() < 7 {
        seen.push(watcher.next().await.values("dev-reordered")["n"].as_u64().unwrap());
    }
    assert_eq!(seen, (1..=7).collect::<Vec<_>>(), "in the connection's sequence, each once");
    assert_eq!(
        worker.metric(r#"worker_uplink_out_of_order_total{reason="gap"}"#).await,
        0.0,
        "no gap given up on"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connections_offline_past_a_gap_that_cannot_fill_comes_before_its_next_connection() {
    use tcpc_proto::v1::SessionState;
    let w = world().await;
    w.device("closed", "dev-closed", "C001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry", "devices/status/+"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    // As a connection closed during a NATS outage leaves the stream: 3 given up on at the
    // close (never re-sent), then its Offline event; then the device's next connection.
    let jetstream = async_nats::jetstream::new(w.nats.client().await);
    let (closed, next) = ("00000000000000aa00000000000000cc", "00000000000000aa00000000000000dd");
    for sequence in [1u64, 2, 4] {
        store_envelope(&jetstream, "dev-closed", closed, sequence, None).await;
    }
    store_envelope(&jetstream, "dev-closed", closed, 5, Some(SessionState::Offline)).await;
    store_envelope(&jetstream, "dev-closed", next, 0, Some(SessionState::Online)).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let message = watcher.next().await;
        seen.push(match message.topic.as_str() {
            "devices/telemetry" => format!("n {}", message.values("dev-closed")["n"]),
            topic => format!("{topic} {}", String::from_utf8_lossy(&message.payload)),
        });
    }
    assert_eq!(
        seen,
        ["n 1", "n 2", "n 4", "devices/status/dev-closed 0", "devices/status/dev-closed 1"],
        "the offline after its connection's envelopes and before the next connection's online"
    );
    assert_eq!(
        worker.metric(r#"worker_uplink_out_of_order_total{reason="gap"}"#).await,
        1.0,
        "the gap at 3 given up on"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_frozen_past_its_lease_does_not_act_on_resume() {
    const COUNT: u64 = 3000;
    let w = world().await;
    w.device("frozen", "dev-frozen", "F001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let workers = [w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await];
    wait_for_partitions(&[&workers[0], &workers[1]]).await;
    let frozen = partition_owner(&w, &workers, "dev-frozen").await;
    let survivor = &workers[1 - frozen];
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "frozen").await;
    let sender = tokio::spawn(async move {
        device.send_numbered(0..COUNT as u32).await;
        device
    });
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(watcher.next().await.values("dev-frozen")["n"].as_u64().unwrap());
    }
    // Frozen mid-stream until the survivor owns every partition, then resumed: the
    // frozen worker must neither acknowledge nor take anything of the survivor's.
    workers[frozen].freeze();
    wait_until("the survivor to own every partition", || async {
        survivor.metric("worker_partitions").await == f64::from(tcpc_proto::names::DEFAULT_PARTITIONS)
    })
    .await;
    workers[frozen].thaw();
    let _device = sender.await.unwrap();
    let seen = read_until_all(&mut watcher, "dev-frozen", seen, COUNT).await;
    assert_eq!(first_seen(&seen), (0..COUNT).collect::<Vec<_>>(), "nothing missing, first seen in order");
    println!("owner frozen past its lease: {COUNT} arrived, {} duplicates", seen.len() as u64 - COUNT);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_redis_does_not_cost_a_worker_its_partitions() {
    let w = world().await;
    let workers = [w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await];
    wait_for_partitions(&[&workers[0], &workers[1]]).await;
    let rounds = || async {
        let mut rounds = Vec::new();
        for worker in &workers {
            rounds.push(worker.metric("worker_lease_rounds_total").await);
        }
        rounds
    };
    let before = rounds().await;
    // Redis busy most of the time: every command waits for the end of a 0.8 s sleep.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut busy = redis::Client::open(w.redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let slow = tokio::spawn(async move {
        loop {
            let slept: redis::RedisResult<()> =
                redis::cmd("DEBUG").arg("SLEEP").arg("0.8").query_async(&mut busy).await;
            slept.expect("DEBUG SLEEP (enabled by the fixture)");
        }
    });
    wait_until("three lease rounds of each worker under the slow Redis", || async {
        rounds().await.iter().zip(&before).all(|(now, then)| *now >= then + 3.0)
    })
    .await;
    assert!(!slow.is_finished(), "Redis was kept busy throughout (DEBUG SLEEP answered)");
    slow.abort();
    for worker in &workers {
        assert_eq!(worker.metric("worker_partitions_lost_total").await, 0.0, "{} lost none", worker.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_whose_consumer_is_gone_resumes_after_what_was_delivered() {
    let w = world().await;
    w.device("resume", "dev-resume", "G001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let mut first = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&first]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "resume").await;
    device.send_numbered(0..100).await;
    let seen = read_until_all(&mut watcher, "dev-resume", Vec::new(), 100).await;
    first.stop().await;
    // The consumers are lost (an operator's cleanup, a JetStream that lost its consumer
    // state): the successor must not replay the stream's retention to the platform.
    let jetstream = async_nats::jetstream::new(w.nats.client().await);
    let stream = jetstream.get_stream(tcpc_proto::names::UPLINK_STREAM).await.unwrap();
    let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names()).await.unwrap();
    assert!(!names.is_empty(), "the first worker had consumers");
    for name in &names {
        stream.delete_consumer(name).await.unwrap();
    }
    let second = w.worker("worker-b", &[]).await;
    wait_for_partitions(&[&second]).await;
    device.send_numbered(100..200).await;
    let seen = read_until_all(&mut watcher, "dev-resume", seen, 200).await;
    assert_eq!(seen, (0..200).collect::<Vec<_>>(), "all, once, in order: nothing replayed");
    // One consumer per partition now, the successor's generation.
    let partition = tcpc_proto::names::partition_of("dev-resume", tcpc_proto::names::DEFAULT_PARTITIONS);
    let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names()).await.unwrap();
    let of_partition: Vec<&String> =
        names.iter().filter(|name| tcpc_proto::names::is_partition_consumer(name, partition)).collect();
    assert_eq!(of_partition.len(), 1, "one consumer of the partition: {names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_over_moves_the_partition_to_a_new_consumer_and_deletes_the_old() {
    const COUNT: u64 = 2000;
    let w = world().await;
    w.device("moving", "dev-moving", "G002", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let mut first = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&first]).await;
    let partition = tcpc_proto::names::partition_of("dev-moving", tcpc_proto::names::DEFAULT_PARTITIONS);
    let jetstream = async_nats::jetstream::new(w.nats.client().await);
    let stream = jetstream.get_stream(tcpc_proto::names::UPLINK_STREAM).await.unwrap();
    let consumers_of_partition = || async {
        let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names()).await.unwrap();
        names
            .into_iter()
            .filter(|name| tcpc_proto::names::is_partition_consumer(name, partition))
            .collect::<Vec<_>>()
    };
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "moving").await;
    let sender = tokio::spawn(async move {
        device.send_numbered(0..COUNT as u32).await;
        device
    });
    let mut seen = Vec::new();
    while seen.len() < 100 {
        seen.push(watcher.next().await.values("dev-moving")["n"].as_u64().unwrap());
    }
    // The first worker's consumer, which delivered those.
    let before = consumers_of_partition().await;
    assert_eq!(before.len(), 1, "one consumer of the partition: {before:?}");
    first.kill();
    let _second = w.worker("worker-b", &[]).await;
    let _device = sender.await.unwrap();
    let seen = read_until_all(&mut watcher, "dev-moving", seen, COUNT).await;
    assert_eq!(first_seen(&seen), (0..COUNT).collect::<Vec<_>>(), "nothing missing, first seen in order");
    let after = consumers_of_partition().await;
    assert_eq!(after.len(), 1, "one consumer of the partition: {after:?}");
    assert!(!before.contains(&after[0]), "the successor's consumer is a new one: {before:?} then {after:?}");
    println!("owner killed mid-stream: {COUNT} arrived, {} duplicates", seen.len() as u64 - COUNT);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_named_after_their_envelope() {
    let w = world().await;
    w.device("named", "dev-named", "M001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/event/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "named").await;
    device.send(Frame::data(cmd::EVENTS, Bytes::from_static(br#"{"method":"alarm","params":{}}"#))).await;
    // What the edge stored: the envelope's JetStream message id, which a redelivered
    // envelope keeps, so that a publish retried carries the same message id.
    let mut reader = tcpc_tests::stream::UplinkReader::open(w.nats.client().await).await;
    let id = loop {
        if let (UplinkEnvelope { body: Some(uplink_envelope::Body::Uplink(_)) }, id) = reader.next().await {
            break id;
        }
    };
    assert_eq!(watcher.next().await.topic, format!("devices/event/{id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_generation_lost_while_held_is_replaced() {
    let w = world().await;
    w.device("generation", "dev-generation", "L001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "generation").await;
    device.send_numbered(0..100).await;
    let seen = read_until_all(&mut watcher, "dev-generation", Vec::new(), 100).await;
    // The generations go (evicted under memory pressure, deleted by hand) while the
    // leases stay held: the worker must go on consuming, under new generations.
    let partitions = tcpc_proto::names::DEFAULT_PARTITIONS;
    let rounds = worker.metric("worker_lease_rounds_total").await;
    let keys: Vec<String> = (0..partitions).map(tcpc_proto::names::partition_generation_key).collect();
    let deleted: u32 = redis::AsyncCommands::del(&mut w.redis.connection().await, keys).await.unwrap();
    assert_eq!(deleted, partitions, "every partition had a generation");
    wait_until("two lease rounds without the generations", || async {
        worker.metric("worker_lease_rounds_total").await >= rounds + 2.0
    })
    .await;
    device.send_numbered(100..200).await;
    let seen = read_until_all(&mut watcher, "dev-generation", seen, 200).await;
    assert_eq!(first_seen(&seen), (0..200).collect::<Vec<_>>(), "nothing missing, first seen in order");
}
