//! The edge under faults and hostile clients, against real nats-server and
//! redis-server (and, for the dead-pod rule, a worker, mosquitto and the fake platform).

use std::time::Duration;

use edge_gateway::codec::{Frame, cmd};
use redis::AsyncCommands;
use serde_json::json;
use tcpc_proto::names;
use tcpc_proto::v1::{
    DeliverRequest, DeliverStatus, DisconnectRequest, SessionState, UplinkKind, uplink_envelope,
};
use tcpc_tests::auth::{custom_device, device};
use tcpc_tests::device::TpDevice;
use tcpc_tests::edge::{EdgeWorld, TestEdge};
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::servers::RedisServer;
use tcpc_tests::stream::UplinkReader;
use tcpc_tests::world::{World, wait_for_partitions};
use tcpc_tests::{DEADLINE, init_logging, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn servers() -> EdgeWorld {
    EdgeWorld::start().await
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_recovers_by_itself_after_nats_returns_with_nothing_left_to_publish() {
    let mut s = servers().await;
    s.auth.add("idle", device("dev-idle"));
    s.auth.add("gone", device("dev-gone"));
    s.auth.add("new", device("dev-new"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |_| {}).await;
    let _idle = TpDevice::online(edge.official, "idle").await;
    let mut gone = TpDevice::online(edge.official, "gone").await;

    s.nats.stop();
    wait_until("/readyz 503 while NATS is down", || async { edge.http_status("/readyz").await == Some(503) })
        .await;
    // A publish fails during the outage, and the platform disconnects its device: nothing
    // is left that would publish successfully after NATS returns.
    gone.send(Frame::data(cmd::ATTRIBUTES, &b"{\"t\":1}"[..])).await;
    wait_until("the publish to fail", || async { edge.metric("edge_republished_total").await >= 1 }).await;
    let connection_id: String =
        s.redis.connection().await.hget(names::route_key("dev-gone"), names::ROUTE_CONNECTION).await.unwrap();
    let disconnect = DisconnectRequest { device_id: "dev-gone".into(), connection_id, ..Default::default() };
    edge.grpc_client().await.disconnect(disconnect).await.unwrap();
    // Its session gives up (flush budget, then the offline event) while NATS is down.
    wait_until("the leaving device's session to end", || async {
        edge.metric("edge_connections{listener=\"official\"}").await == 1
    })
    .await;
    assert!(edge.metric("edge_uplinks_lost_total{reason=\"unacknowledged\"}").await >= 1);

    s.nats.start().await;
    wait_until("/readyz 200 after NATS returned", || async {
        edge.http_status("/readyz").await == Some(200)
    })
    .await;
    let mut new = TpDevice::connect(edge.official).await;
    assert_eq!(new.auth("new").await, r#"{"result":0}"#, "a new device is accepted again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_device_that_sends_and_closes_at_once_is_heard() {
    let s = servers().await;
    // The default framing: an idle gap with a 1 KiB buffer.
    s.auth.add("cell-1", custom_device("dev-cell", Default::default()));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |_| {}).await;
    let mut reader = UplinkReader::open(s.nats.client().await).await;

    let mut stream = TcpStream::connect(edge.custom).await.unwrap();
    stream.write_all(b"cell-1\n\x01\x6d\x34").await.unwrap();
    stream.shutdown().await.unwrap();

    let (online, _) = reader.next().await;
    assert!(
        matches!(online.body, Some(uplink_envelope::Body::Session(ref e)) if e.state() == SessionState::Online)
    );
    let uplink = reader.uplink().await;
    assert_eq!((uplink.kind(), &uplink.payload[..]), (UplinkKind::Raw, &b"\x01\x6d\x34"[..]));
    assert_eq!(uplink.sequence, 1);
    let (offline, _) = reader.next().await;
    let Some(uplink_envelope::Body::Session(offline)) = offline.body else { panic!("offline last") };
    assert_eq!((offline.state(), offline.sequence), (SessionState::Offline, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_come_back_after_redis_restarts_empty_within_the_reassert_period() {
    let mut s = servers().await;
    s.auth.add("meter", custom_device("dev-meter", Default::default()));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.route_reassert = Duration::from_secs(1);
    })
    .await;
    let mut reader = UplinkReader::open(s.nats.client().await).await;
    let mut stream = TcpStream::connect(edge.custom).await.unwrap();
    stream.write_all(b"meter\n").await.unwrap();
    let (online, _) = reader.next().await;
    let Some(uplink_envelope::Body::Session(online)) = online.body else { panic!("online first") };

    let route = |redis: &RedisServer| {
        let url = redis.url();
        async move {
            let mut connection =
                redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.ok()?;
            let fields: std::collections::HashMap<String, String> =
                connection.hgetall(names::route_key("dev-meter")).await.ok()?;
            fields.get(names::ROUTE_CONNECTION).cloned()
        }
    };
    assert_eq!(route(&s.redis).await.as_deref(), Some(online.connection_id.as_str()));

    s.redis.restart_empty().await;
    assert_eq!(route(&s.redis).await, None, "Redis lost the route");
    wait_until("the route re-asserted", || async {
        route(&s.redis).await.as_deref() == Some(online.connection_id.as_str())
    })
    .await;
    assert!(edge.metric("edge_routes_restored_total").await >= 1);
    // The device is still connected and served.
    stream.write_all(b"after").await.unwrap();
    assert_eq!(&reader.uplink().await.payload[..], b"after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_edges_devices_go_offline_but_a_device_that_moved_stays_online() {
    let w = World::start().await;
    w.device("tok-stay", "dev-stay", "N-stay", json!({}));
    w.device("tok-move", "dev-move", "N-move", json!({}));
    w.device("tok-purged", "dev-purged", "N-purged", json!({}));
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let mut edge_a = w.edge_process("edge-a").await;
    let edge_b = w.edge_process("edge-b").await;
    let mut status = Watcher::subscribe(&w.broker, &["devices/status/+", "devices/telemetry"]).await;

    let _stay = TpDevice::online(edge_a.official, "tok-stay").await;
    let _purged = TpDevice::online(edge_a.official, "tok-purged").await;
    let _moved_old = TpDevice::online(edge_a.official, "tok-move").await;
    let mut moved = TpDevice::online(edge_b.official, "tok-move").await;
    for _ in 0..4 {
        let message = status.next().await;
        assert_eq!(&message.payload[..], b"1", "{}", message.topic);
    }

    edge_a.kill();
    // A route removed without an offline event, as a worker's purge of a dead pod's
    // route does when a downlink finds the pod gone.
    let _: () = w.redis.connection().await.del(names::route_key("dev-purged")).await.unwrap();
    // The reaper on edge-b notices edge-a's liveness key expire and reports its devices:
    // by design 15-25 s after the kill (the key's TTL, then up to a reaper's period),
    // which would leave a loaded box little of DEADLINE for the reap, the worker and the
    // broker. The wait is the design's delay plus DEADLINE.
    let reported_within = names::POD_LIVENESS_TTL + DEADLINE;
    let mut offline = Vec::new();
    for _ in 0..2 {
        let message = status.next_within(reported_within).await.expect("edge-a's devices reported offline");
        assert_eq!(&message.payload[..], b"0", "{}", message.topic);
        offline.push(message.topic);
    }
    offline.sort();
    assert_eq!(offline, ["devices/status/dev-purged", "devices/status/dev-stay"]);
    // Whatever the reaper published for dev-move's partition came before this uplink.
    moved.send(Frame::data(cmd::ATTRIBUTES, &b"{\"still\":1}"[..])).await;
    let next = status.next().await;
    assert_eq!(next.topic, "devices/telemetry", "no offline for the device that moved: {next:?}");
    assert_eq!(next.values("dev-move"), json!({"still": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slowloris_auth_frame_is_cut_at_the_auth_deadline() {
    let s = servers().await;
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.auth_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stream = TcpStream::connect(edge.official).await.unwrap();
    // A header promising a token, then one byte at a time, slower than the deadline.
    stream.write_all(b"TP\x00\x00\x00\x00\x00\x40").await.unwrap();
    let mut answer = Vec::new();
    let reader = async {
        let _ = stream.read_to_end(&mut answer).await;
    };
    let drip = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = drip => panic!("the connection outlived 20 s of dripping"),
    }
    let expected =
        Frame::data(cmd::AUTH, &br#"{"result":1,"message":"no authentication within the deadline"}"#[..]);
    assert_eq!(answer, expected.to_bytes().to_vec());
    assert_eq!(edge.metric("edge_connections_closed_total{reason=\"auth_timeout\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auth_frame_longer_than_a_token_is_refused_before_it_is_buffered() {
    let s = servers().await;
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |_| {}).await;
    let mut stream = TcpStream::connect(edge.official).await.unwrap();
    // LENGTH 60 KiB: within --max-frame, far beyond --max-token (256).
    stream.write_all(b"TP\x00\x00\x00\x00\xf0\x00").await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("exceeds the maximum of 256 bytes"), "{text}");
    assert_eq!(s.auth.requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_proxy_the_limits_count_the_address_the_header_carries() {
    let s = servers().await;
    s.auth.add("a", device("dev-a"));
    s.auth.add("b", device("dev-b"));
    s.auth.add("c", device("dev-c"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.proxy_protocol = true;
        config.limits.max_connections_per_source = 1;
    })
    .await;
    // Every connection comes from the balancer (127.0.0.1); the header names the client.
    let through_proxy = |client: &'static str, token: &'static str| async move {
        let mut device = TpDevice::connect(edge.official).await;
        device.send_raw(format!("PROXY TCP4 {client} 10.0.0.1 40000 7653\r\n").as_bytes()).await;
        let answer = device.auth(token).await;
        (device, answer)
    };
    let (_a, answer_a) = through_proxy("198.51.100.1", "a").await;
    assert_eq!(answer_a, r#"{"result":0}"#);
    let (_b, answer_b) = through_proxy("198.51.100.2", "b").await;
    assert_eq!(answer_b, r#"{"result":0}"#, "another client behind the same balancer");
    let (_c, answer_c) = through_proxy("198.51.100.1", "c").await;
    assert_eq!(answer_c, r#"{"result":1,"message":"too many connections from this address"}"#);

    let mut bare = TpDevice::connect(edge.official).await;
    bare.send(Frame::data(cmd::AUTH, &b"a"[..])).await;
    bare.expect_closed_with(cmd::AUTH, "expected a PROXY protocol header").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_downlink_whose_caller_gave_up_is_never_written() {
    let s = servers().await;
    s.auth.add("slow", device("dev-slow"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.max_frame = 4 << 20;
        config.limits.downlink_queue_bytes = 8 << 20;
    })
    .await;
    // A device that reads slowly: a small receive buffer, and it stops reading.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = TpDevice::over(socket.connect(edge.official).await.unwrap());
    assert_eq!(slow.auth("slow").await, r#"{"result":0}"#);
    let mut reader = UplinkReader::open(s.nats.client().await).await;
    let (online, _) = reader.next().await;
    let Some(uplink_envelope::Body::Session(online)) = online.body else { panic!("online first") };
    let deliver = |payload: Vec<u8>, timeout_ms: u32| {
        let (grpc, connection_id) = (edge.grpc, online.connection_id.clone());
        async move {
            let mut client =
                tcpc_proto::v1::edge_gateway_client::EdgeGatewayClient::connect(format!("http://{grpc}"))
                    .await
                    .unwrap();
            let request = DeliverRequest {
                device_id: "dev-slow".into(),
                connection_id,
                payload: payload.into(),
                tp_cmd: cmd::COMMAND.into(),
                timeout_ms,
            };
            client.deliver(request).await.unwrap().into_inner()
        }
    };

    // Large downlinks until one cannot be written within its caller's 500 ms: the
    // socket's buffers are full, and that write stays pending while the device does not
    // read (its caller was answered; the bytes already went out in part).
    let large = vec![b'a'; 3 << 20];
    let mut sent = 0;
    loop {
        let reply = deliver(large.clone(), 500).await;
        sent += 1;
        if reply.status() == DeliverStatus::Failed {
            assert_eq!(reply.message, "not written within the caller's deadline");
            break;
        }
        assert!(sent < 16, "48 MiB written to a device that does not read");
    }
    // Queued behind the pending write; its caller gives up after 200 ms.
    let late = deliver(b"{\"method\":\"run-once\"}".to_vec(), 200).await;
    assert_eq!(late.status(), DeliverStatus::Failed);
    assert_eq!(late.message, "not written within the caller's deadline");

    // The device reads again: the large frames, then the next downlink, never the one
    // whose caller was told it failed.
    for _ in 0..sent {
        let mut frame = vec![0u8; 8 + large.len()];
        slow.stream_mut().read_exact(&mut frame).await.unwrap();
        assert_eq!(&frame[..4], b"TP\x00\x12");
    }
    let next = tokio::spawn(deliver(b"{\"method\":\"next\"}".to_vec(), 0));
    assert_eq!(slow.next().await, Some(Frame::data(cmd::COMMAND, &b"{\"method\":\"next\"}"[..])));
    assert_eq!(next.await.unwrap().status(), DeliverStatus::Delivered);
    assert_eq!(edge.metric("edge_downlinks_total{reason=\"abandoned\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_order_publishes_the_frames_already_read() {
    let mut s = servers().await;
    s.auth.add("busy", device("dev-busy"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.close_flush = Duration::from_secs(20);
        config.limits.shutdown_timeout = Duration::from_secs(60);
    })
    .await;
    let mut reader = UplinkReader::open(s.nats.client().await).await;
    let mut busy = TpDevice::online(edge.official, "busy").await;
    let (online, _) = reader.next().await;
    let Some(uplink_envelope::Body::Session(online)) = online.body else { panic!("online first") };

    s.nats.stop();
    // Three frames in one write: the edge reads them at once, publishes the first (the
    // window of one is then full) and keeps the other two in its buffer.
    let frames: Vec<u8> = (1..=3)
        .flat_map(|n| Frame::data(cmd::TELEMETRY, format!("{{\"n\":{n}}}").into_bytes()).to_bytes().to_vec())
        .collect();
    busy.send_raw(&frames).await;
    wait_until("the first publish to fail", || async { edge.metric("edge_republished_total").await >= 1 })
        .await;
    let disconnect = DisconnectRequest {
        device_id: "dev-busy".into(),
        connection_id: online.connection_id.clone(),
        ..Default::default()
    };
    assert_eq!(edge.grpc_client().await.disconnect(disconnect).await.unwrap().into_inner().closed, 1);

    s.nats.start().await;
    // A fresh reader from the stream's start (the first one's consumer did not survive
    // the restart): each stored envelope once.
    let mut reader = UplinkReader::open(s.nats.client().await).await;
    assert_eq!(reader.session().await.connection_id, online.connection_id);
    for n in 1..=3u64 {
        let uplink = reader.uplink().await;
        assert_eq!((uplink.connection_id.as_str(), uplink.sequence), (online.connection_id.as_str(), n));
        assert_eq!(uplink.payload, format!("{{\"n\":{n}}}").into_bytes());
    }
    busy.expect_closed_with(cmd::ERROR, "disconnected by the platform").await;
    let (offline, _) = reader.next().await;
    let Some(uplink_envelope::Body::Session(offline)) = offline.body else { panic!("offline last") };
    assert_eq!(
        (offline.state(), offline.sequence, offline.reason.as_str()),
        (SessionState::Offline, 4, "disconnected")
    );
    assert_eq!(edge.metric("edge_uplinks_lost_total{reason=\"unacknowledged\"}").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_redis_lost_the_routes_a_stale_connection_never_wins_one_back() {
    use edge_gateway::routes::{Claim, Reasserted, RedisRoutes, Route, RouteStore};
    init_logging();
    let mut redis = RedisServer::spawn().await;
    let store = RedisRoutes::connect(&redis.url(), Duration::from_secs(2)).unwrap();
    let claim = |connection: &str, pod: &str, epoch: u64| Claim {
        route: Route {
            device_id: "dev-roam".into(),
            connection_id: connection.into(),
            pod: pod.into(),
            grpc_addr: format!("{pod}:50051"),
        },
        epoch,
    };
    // The device connected on edge-a, then again on edge-b; edge-a has not noticed.
    let old = store.register(&claim("c-old", "edge-a", 1_000)).await.unwrap();
    let new = store.register(&claim("c-new", "edge-b", 500)).await.unwrap();
    assert_eq!(new.replaced.as_deref(), Some("c-old"));
    assert!(new.epoch > old.epoch, "a newer connection's epoch is raised above the one it replaced");

    redis.restart_empty().await;
    wait_until("the route store to reconnect", || async { store.keep_alive("probe", "-").await.is_ok() })
        .await;
    // The stale connection's pod re-asserts first and gets the route back for a while...
    let stale = claim("c-old", "edge-a", old.epoch);
    let fresh = claim("c-new", "edge-b", new.epoch);
    assert_eq!(store.reassert(std::slice::from_ref(&stale)).await.unwrap(), [Reasserted::Restored]);
    // ...until the newer connection's pod re-asserts: the higher epoch wins, and from
    // then on the stale one learns it is stale.
    assert_eq!(store.reassert(std::slice::from_ref(&fresh)).await.unwrap(), [Reasserted::Restored]);
    assert_eq!(store.reassert(&[stale, fresh]).await.unwrap(), [Reasserted::Superseded, Reasserted::Held]);
    let route: std::collections::HashMap<String, String> =
        redis.connection().await.hgetall(names::route_key("dev-roam")).await.unwrap();
    assert_eq!(route.get(names::ROUTE_CONNECTION).map(String::as_str), Some("c-new"));
    assert!(!store.remove("dev-roam", "c-old", "edge-a").await.unwrap(), "the stale close keeps the route");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reaper_whose_round_failed_claims_the_dead_pod_again_at_its_next_round() {
    use edge_gateway::routes::{RedisRoutes, RouteStore};
    init_logging();
    let redis = RedisServer::spawn().await;
    let store = RedisRoutes::connect(&redis.url(), Duration::from_secs(2)).unwrap();
    // edge-a is listed and its liveness key has expired: it is dead.
    store.keep_alive("edge-a", "edge-a:50051").await.unwrap();
    let _: () = redis.connection().await.del(names::pod_liveness_key("edge-a")).await.unwrap();
    assert_eq!(store.claim_dead_pods("edge-b").await.unwrap(), ["edge-a"]);
    // edge-b's round failed half-way (nothing was cleared, the pod is still listed): no
    // other pod takes it while edge-b's claim holds, and edge-b's next round takes it
    // again instead of waiting for its own claim to expire.
    assert!(store.claim_dead_pods("edge-c").await.unwrap().is_empty(), "one reaper per dead pod");
    assert_eq!(store.claim_dead_pods("edge-b").await.unwrap(), ["edge-a"]);
}
