//! Downlinks end to end: the platform publishes on the broker, two workers, two edge
//! processes, real devices.

use std::time::{Duration, Instant};

use edge_gateway::codec::{Frame, cmd};
use script_worker::downlink::lanes::{LANES, lane_of};
use serde_json::{Value, json};
use tcpc_proto::names;
use tcpc_tests::device::{RawDevice, TpDevice};
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::wait_until;
use tcpc_tests::world::{World, partition_holder, partition_owner, wait_for_partitions};

const D001: &str = "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10";
const D002: &str = "0f7c2a1e-5b3d-4c8e-8f6a-2d1b9e4c7a30";

fn frame_json(frame: &Frame) -> Value {
    serde_json::from_slice(&frame.payload).expect("JSON payload")
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_and_attributes_reach_the_device_on_the_other_edge_and_answers_come_back() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    w.fixture_gateway();
    let watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let mut watcher = watcher;
    let (a, b) = (w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await);
    wait_for_partitions(&[&a, &b]).await;
    let _edge_a = w.edge_process("edge-a").await;
    let edge_b = w.edge_process("edge-b").await;
    let mut device = TpDevice::online(edge_b.official, "tp-token").await;
    let mut gateway = TpDevice::online(edge_b.official, "gw-token-001").await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");

    // A command by device number (backend >= v1.1.10), and its answer.
    watcher
        .publish("plugin/TCP/devices/command/D001/4d5e6f70", r#"{"method":"reboot","params":{"delay":5}}"#)
        .await;
    let frame = device.next().await.expect("the command frame");
    assert_eq!(frame.cmd, cmd::COMMAND);
    assert_eq!(&frame.payload[..], br#"{"message_id":"4d5e6f70","method":"reboot","params":{"delay":5}}"#);
    device
        .send(Frame::data(
            cmd::COMMAND_RESPONSE,
            &br#"{"message_id":"4d5e6f70","result":0,"message":"success","method":"reboot"}"#[..],
        ))
        .await;
    let answer = watcher.next_on("devices/command/response/4d5e6f70").await;
    assert_eq!(answer.values(D001), json!({"result": 0, "message": "success", "method": "reboot"}));

    // Telemetry control by device id (backend <= v1.1.9), attribute set with its answer,
    // attribute get.
    watcher.publish(&format!("plugin/TCP/devices/telemetry/control/{D001}"), r#"{"switch":1}"#).await;
    let frame = device.next().await.unwrap();
    assert_eq!((frame.cmd, frame_json(&frame)), (cmd::TELEMETRY_CONTROL, json!({"switch": 1})));
    watcher.publish("plugin/TCP/devices/attributes/set/D001/1a2b3c4d", r#"{"interval":30}"#).await;
    let frame = device.next().await.unwrap();
    assert_eq!(
        (frame.cmd, frame_json(&frame)),
        (cmd::ATTRIBUTE_SET, json!({"message_id": "1a2b3c4d", "interval": 30}))
    );
    device
        .send(Frame::data(cmd::ATTRIBUTE_SET_RESPONSE, &br#"{"message_id":"1a2b3c4d","result":0}"#[..]))
        .await;
    assert_eq!(
        watcher.next_on("devices/attributes/set/response/1a2b3c4d").await.values(D001),
        json!({"result": 0})
    );
    watcher.publish("plugin/TCP/devices/attributes/get/D001", r#"{"keys":["temp","hum"]}"#).await;
    let frame = device.next().await.unwrap();
    assert_eq!((frame.cmd, frame_json(&frame)), (cmd::ATTRIBUTE_GET, json!({"keys": ["temp", "hum"]})));

    // A gateway, and a sub-device through its gateway (both platform generations).
    watcher
        .publish("plugin/TCP/devices/attributes/set/G001/2b3c4d5e", r#"{"gateway_data":{"interval":30}}"#)
        .await;
    let frame = gateway.next().await.unwrap();
    assert_eq!(frame_json(&frame), json!({"message_id": "2b3c4d5e", "gateway_data": {"interval": 30}}));
    watcher
        .publish(
            "plugin/TCP/devices/command/S001/5e6f7081",
            r#"{"sub_device_data":{"3c20c6206":{"method":"reboot","params":{"delay":5}}}}"#,
        )
        .await;
    let frame = gateway.next().await.unwrap();
    assert_eq!(frame.cmd, cmd::COMMAND);
    assert_eq!(
        frame_json(&frame),
        json!({"message_id": "5e6f7081", "sub_device_data": {"3c20c6206": {"method": "reboot", "params": {"delay": 5}}}})
    );
    watcher
        .publish(
            "plugin/TCP/devices/telemetry/control/a3e5c7b9-1d2f-4e6a-8b0c-9d8e7f6a5b41",
            r#"{"switch":0}"#,
        )
        .await;
    let frame = gateway.next().await.unwrap();
    assert_eq!(
        frame_json(&frame),
        json!({"sub_device_data": {"3c20c6206": {"switch": 0}}}),
        "unwrapped v1.1.9 form, wrapped for the gateway"
    );

    // D001 was looked up by its token, its number and its id, on both workers: one
    // platform call (its config answers for all three forms, in Redis for the other).
    let asked_for_d001: Vec<String> = w
        .platform
        .calls()
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| {
            [r#"{"access_token":"tp-token"}"#, "number:D001", &format!("id:{D001}")].contains(&key.as_str())
        })
        .collect();
    assert_eq!(asked_for_d001, [r#"{"access_token":"tp-token"}"#], "one call for the device");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_device_gets_its_downlink_script_bytes() {
    let w = World::start().await;
    w.device(
        "custom-token",
        "dev-custom",
        "C001",
        json!({"protocol": "custom", "framing": "delimiter", "downlink_script": "function encode(msg, ctx) { return [0xAA, ctx.kind.length, msg.params.delay, msg.message_id.length]; }"}),
    );
    let watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge_process("edge-a").await;
    let mut device = RawDevice::connect(edge.custom).await;
    device.send(b"custom-token\n").await;
    let mut watcher = watcher;
    assert_eq!(&watcher.next_on("devices/status/dev-custom").await.payload[..], b"1");
    watcher
        .publish("plugin/TCP/devices/command/C001/abc", r#"{"method":"reboot","params":{"delay":5}}"#)
        .await;
    let mut bytes = [0u8; 4];
    tokio::time::timeout(
        tcpc_tests::DEADLINE,
        tokio::io::AsyncReadExt::read_exact(&mut device.stream, &mut bytes),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(bytes, [0xAA, 7, 5, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_downlinks_arrive_in_order_once() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let watcher = Watcher::subscribe(&w.broker, &["devices/status/#"]).await;
    let (a, b) = (w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await);
    wait_for_partitions(&[&a, &b]).await;
    let edge = w.edge_process("edge-a").await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    let mut watcher = watcher;
    assert_eq!(&watcher.next().await.payload[..], b"1");
    let started = Instant::now();
    for n in 0..1000 {
        watcher.publish("plugin/TCP/devices/telemetry/control/D001", format!(r#"{{"n":{n}}}"#)).await;
    }
    for n in 0..1000 {
        let frame = device.next().await.expect("a downlink");
        assert_eq!(frame_json(&frame), json!({"n": n}));
    }
    println!("1000 downlinks in order in {:?}", started.elapsed());
    let extra = tokio::time::timeout(Duration::from_millis(300), device.next()).await;
    assert!(extra.is_err(), "nothing more (no duplicate): {extra:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_devices_are_answered_at_once_and_found_again_elsewhere() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let (a, b) = (w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await);
    wait_for_partitions(&[&a, &b]).await;
    let mut edge_a = w.edge_process("edge-a").await;
    let edge_b = w.edge_process("edge-b").await;

    // Never connected: the platform learns at once.
    let sent = Instant::now();
    watcher.publish("plugin/TCP/devices/command/D001/m1", r#"{"method":"reboot"}"#).await;
    let answer = watcher.next_on("devices/command/response/m1").await;
    assert!(sent.elapsed() < Duration::from_secs(1), "{:?}", sent.elapsed());
    assert_eq!(answer.values(D001), json!({"result": 1, "message": "device offline"}));

    // The edge holding it dies: the next downlink is answered offline within 1 s.
    let _device = TpDevice::online(edge_a.official, "tp-token").await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
    edge_a.kill();
    let sent = Instant::now();
    watcher.publish("plugin/TCP/devices/command/D001/m2", r#"{"method":"reboot"}"#).await;
    let answer = watcher.next_on("devices/command/response/m2").await;
    assert!(sent.elapsed() < Duration::from_secs(1), "{:?}", sent.elapsed());
    assert_eq!(answer.values(D001)["result"], 1);

    // It reconnects to the other edge: downlinks reach it there.
    let mut device = TpDevice::online(edge_b.official, "tp-token").await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
    watcher.publish("plugin/TCP/devices/command/D001/m3", r#"{"method":"reboot"}"#).await;
    assert_eq!(frame_json(&device.next().await.unwrap()), json!({"message_id": "m3", "method": "reboot"}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_racing_the_old_close_stays_reachable() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge_a = w.edge_process("edge-a").await;
    let edge_b = w.edge_process("edge-b").await;
    let old = TpDevice::online(edge_a.official, "tp-token").await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
    // The new connection registers before the old one's close is processed.
    let mut new = TpDevice::online(edge_b.official, "tp-token").await;
    drop(old);
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
    watcher.publish("plugin/TCP/devices/command/D001/race", r#"{"method":"ping"}"#).await;
    assert_eq!(frame_json(&new.next().await.unwrap()), json!({"message_id": "race", "method": "ping"}));
    // No offline was published for the device by the old connection's close.
    while let Some(message) = watcher.next_within(Duration::from_millis(500)).await {
        assert_ne!(
            (message.topic.as_str(), &message.payload[..]),
            (format!("devices/status/{D001}").as_str(), &b"0"[..])
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_offline_queue_delivers_in_order_on_reconnect_and_drops_expired_ones() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let worker = w
        .worker("worker-a", &["--offline-queue", "telemetry-control,command", "--offline-queue-ttl", "1s"])
        .await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge_process("edge-a").await;
    // Queued while away; the first ones expire before the device comes back.
    watcher.publish("plugin/TCP/devices/telemetry/control/D001", r#"{"n":"expired"}"#).await;
    tcpc_tests::wait_until("the first downlink to be queued", || async {
        worker.metric("worker_downlinks_total{reason=\"queued\"}").await >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the queue's TTL, on purpose
    for n in 0..3 {
        watcher.publish("plugin/TCP/devices/telemetry/control/D001", format!(r#"{{"n":{n}}}"#)).await;
    }
    watcher.publish("plugin/TCP/devices/command/D001/q1", r#"{"method":"reboot"}"#).await;
    tcpc_tests::wait_until("the downlinks to be queued", || async {
        worker.metric("worker_downlinks_total{reason=\"queued\"}").await >= 5.0
    })
    .await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    for n in 0..3 {
        assert_eq!(frame_json(&device.next().await.unwrap()), json!({"n": n}));
    }
    assert_eq!(frame_json(&device.next().await.unwrap()), json!({"message_id": "q1", "method": "reboot"}));
    assert!(worker.metric("worker_downlinks_total{reason=\"queue_expired\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downlink_to_an_edge_that_never_answers_is_answered_and_holds_up_no_other_device() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    w.device("tp-token-2", D002, "D002", Value::Null);
    assert_ne!(lane_of("D001", LANES), lane_of("D002", LANES), "the two devices take different lanes");
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/command/response/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge_process("edge-a").await;
    let mut other = TpDevice::online(edge.official, "tp-token-2").await;
    // What a dead pod's reused IP looks like: TCP is accepted, nothing is ever answered.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let mut redis = w.redis.connection().await;
    let route = [
        (names::ROUTE_CONNECTION, "0123456789abcdef0123456789abcdef".to_owned()),
        (names::ROUTE_POD, "edge-hung".to_owned()),
        (names::ROUTE_GRPC_ADDR, hung_addr.to_string()),
        (names::ROUTE_SINCE_MS, tcpc_proto::now_ms().to_string()),
    ];
    let () = redis::AsyncCommands::hset_multiple(&mut redis, names::route_key(D001), &route).await.unwrap();
    // Alive as far as Redis knows, so the route is not purged as a dead pod's.
    let () =
        redis::AsyncCommands::set(&mut redis, names::pod_liveness_key("edge-hung"), hung_addr.to_string())
            .await
            .unwrap();

    const COMMANDS: u32 = 10;
    for n in 0..COMMANDS {
        watcher.publish(&format!("plugin/TCP/devices/command/D001/hung{n}"), r#"{"method":"reboot"}"#).await;
    }
    // Another device's command is not queued behind them: it is delivered while the first
    // still waits for its Deliver deadline. (Behind them, it would have reached the head
    // of the queue past its own answer's due time and been answered "not delivered in
    // time" instead.)
    watcher.publish("plugin/TCP/devices/command/D002/other", r#"{"method":"reboot"}"#).await;
    let frame = other.next().await.expect("the other device's command");
    assert_eq!(frame.cmd, cmd::COMMAND, "{frame:?}");
    // The first waits out its Deliver. Those queued behind it are answered by the bound
    // from their arrival (one Deliver and a margin), whether or not a Deliver still fits
    // in it: the last cannot have had one, ten Deliver deadlines after its arrival.
    let unreachable =
        json!({"result": 1, "message": "device offline: edge pod edge-hung unreachable (no answer in time)"});
    let late = json!({"result": 1, "message": "not delivered in time"});
    for n in 0..COMMANDS {
        let answer = watcher.next().await;
        assert_eq!(answer.topic, format!("devices/command/response/hung{n}"), "each answered, in order");
        let values = answer.values(D001);
        match n {
            0 => assert_eq!(values, unreachable),
            n if n == COMMANDS - 1 => assert_eq!(values, late),
            n => assert!(values == unreachable || values == late, "answer {n}: {values}"),
        }
    }
    let answered = worker.metric("worker_downlinks_total{reason=\"offline\"}").await
        + worker.metric("worker_downlinks_total{reason=\"busy\"}").await;
    assert_eq!(answered, f64::from(COMMANDS));
}

#[tokio::test(flavor = "multi_thread")]
async fn downlinks_sent_while_the_offline_queue_is_flushed_wait_behind_it() {
    const QUEUED: u64 = 20;
    const TOTAL: u64 = 40;
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    // Room for all of them: the queue's bound counts the ones waiting behind it too.
    let worker =
        w.worker("worker-a", &["--offline-queue", "telemetry-control", "--offline-queue-max", "64"]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge_process("edge-a").await;
    for n in 0..QUEUED {
        watcher.publish("plugin/TCP/devices/telemetry/control/D001", format!(r#"{{"n":{n}}}"#)).await;
    }
    tcpc_tests::wait_until("the downlinks to be queued", || async {
        worker.metric("worker_downlinks_total{reason=\"queued\"}").await >= QUEUED as f64
    })
    .await;
    // The device is back: the flush starts, and new downlinks come meanwhile.
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    for n in QUEUED..TOTAL {
        watcher.publish("plugin/TCP/devices/telemetry/control/D001", format!(r#"{{"n":{n}}}"#)).await;
    }
    let mut seen = Vec::new();
    while seen.len() < TOTAL as usize {
        seen.push(frame_json(&device.next().await.unwrap())["n"].as_u64().unwrap());
    }
    assert_eq!(seen, (0..TOTAL).collect::<Vec<_>>(), "queued first, then the new ones, each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downlink_sent_while_its_owner_is_frozen_is_answered_once_by_its_successor() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/command/response/#"]).await;
    let workers = vec![w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await];
    wait_for_partitions(&[&workers[0], &workers[1]]).await;
    let edge = w.edge_process("edge-a").await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    let owner = partition_owner(&w, &workers, D001).await;
    let successor = 1 - owner;

    // The owner stops without a word (a frozen or partitioned pod): the command it would
    // handle is handled by the worker that takes its partitions over. That is some 4-8 s
    // after the freeze (the lease's 6 s less the time since the owner's last renewal,
    // more than its 2 s round on a loaded box, then up to a round of the successor's),
    // and m1 is due 4 s after it reached the successor, itself later than the freeze on a
    // loaded box: taken over in time, the successor delivers m1 (and the device's answer
    // is m1's answer); past that, it answers m1 itself. Either way, once.
    workers[owner].freeze();
    watcher.publish("plugin/TCP/devices/command/D001/m1", r#"{"method":"reboot"}"#).await;
    let m1_answer = "devices/command/response/m1";
    let delivered = tokio::select! {
        answer = watcher.next_on(m1_answer) => {
            assert_eq!(answer.values(D001)["result"], 1, "answered (too late to deliver), not left unanswered");
            false
        }
        frame = device.next() => {
            let frame = frame.expect("m1 delivered");
            assert_eq!(frame_json(&frame), json!({"message_id": "m1", "method": "reboot"}));
            true
        }
    };
    if delivered {
        device.send(Frame::data(cmd::COMMAND_RESPONSE, &br#"{"message_id":"m1","result":0}"#[..])).await;
        assert_eq!(watcher.next_on(m1_answer).await.values(D001)["result"], 0, "the device's answer");
    }
    assert!(workers[successor].metric("worker_partitions").await > 0.0);

    // The owner comes back and finds the command in its queue: claimed, not answered again.
    workers[owner].thaw();
    let skipped = || async {
        let owner = &workers[owner];
        owner.metric("worker_downlinks_total{reason=\"claimed_elsewhere\"}").await
            + owner.metric("worker_downlinks_total{reason=\"not_owner\"}").await
    };
    wait_until("the thawed owner to pass the command by", || async { skipped().await >= 1.0 }).await;
    // Its partitions go back to it. A command sent while one is handed back waits for the
    // taker's replay, and is answered "not delivered in time" if the hand-back outlasts
    // its 4 s bound (a loaded box): the next command goes once the hand-back is done.
    wait_for_partitions(&[&workers[0], &workers[1]]).await;
    wait_until("the device's partition back with its owner", || async {
        partition_holder(&w, &workers, D001).await == Some(owner)
    })
    .await;
    // A later command reaches the device, whose answer marks the point by which a second
    // answer to m1 would have come (or m1 itself, had it been delivered twice).
    watcher.publish("plugin/TCP/devices/command/D001/m2", r#"{"method":"reboot"}"#).await;
    assert_eq!(frame_json(&device.next().await.unwrap()), json!({"message_id": "m2", "method": "reboot"}));
    device.send(Frame::data(cmd::COMMAND_RESPONSE, &br#"{"message_id":"m2","result":0}"#[..])).await;
    loop {
        let message = watcher.next().await;
        assert_ne!(message.topic, "devices/command/response/m1", "m1 answered twice");
        if message.topic == "devices/command/response/m2" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_is_claimed_by_the_time_it_is_delivered_and_a_repeat_is_not_delivered() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge_process("edge-a").await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
    let mut redis = w.redis.connection().await;
    let claims = async |redis: &mut redis::aio::MultiplexedConnection| {
        let keys: Vec<String> = redis::AsyncCommands::keys(redis, "tcpc:downlink:*").await.unwrap();
        keys.len()
    };

    // One command published twice (what a successor's replay of it looks like): the
    // second finds the first's claim, taken before the first was delivered.
    for _ in 0..2 {
        watcher.publish("plugin/TCP/devices/command/D001/once", r#"{"method":"reboot"}"#).await;
    }
    assert_eq!(frame_json(&device.next().await.unwrap()), json!({"message_id": "once", "method": "reboot"}));
    assert_eq!(claims(&mut redis).await, 1, "claimed by the time the device has it");
    wait_until("the repeat to be passed by", || async {
        worker.metric("worker_downlinks_total{reason=\"claimed_elsewhere\"}").await >= 1.0
    })
    .await;
    watcher.publish("plugin/TCP/devices/command/D001/next", r#"{"method":"reboot"}"#).await;
    assert_eq!(frame_json(&device.next().await.unwrap()), json!({"message_id": "next", "method": "reboot"}));
    assert_eq!(claims(&mut redis).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_control_sent_again_is_delivered_again_once() {
    let w = World::start().await;
    w.device("tp-token", D001, "D001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/status/#"]).await;
    // Both workers see every downlink; each numbers the repeats alike.
    let (a, b) = (w.worker("worker-a", &[]).await, w.worker("worker-b", &[]).await);
    wait_for_partitions(&[&a, &b]).await;
    let edge = w.edge_process("edge-a").await;
    let mut device = TpDevice::online(edge.official, "tp-token").await;
    assert_eq!(&watcher.next().await.payload[..], b"1");
    // No message id: the third is a request of its own, not a replay of the first.
    for switch in [1, 0, 1] {
        watcher
            .publish("plugin/TCP/devices/telemetry/control/D001", format!(r#"{{"switch":{switch}}}"#))
            .await;
    }
    for switch in [1, 0, 1] {
        assert_eq!(frame_json(&device.next().await.expect("a downlink")), json!({"switch": switch}));
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), device.next()).await;
    assert!(extra.is_err(), "nothing more (no duplicate): {extra:?}");
}
