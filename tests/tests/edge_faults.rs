//! The edge under faults and hostile clients, against real nats-server and
//! redis-server (and, for the dead-pod rule, a worker, mosquitto and the fake platform).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use edge_gateway::codec::{Frame, cmd};
use redis::AsyncCommands;
use serde_json::json;
use tcpc_proto::names;
use tcpc_proto::v1::{
    DeliverRequest, DeliverStatus, DisconnectRequest, SessionState, UplinkKind, uplink_envelope,
};
use tcpc_tests::auth::{AuthDouble, custom_device, device};
use tcpc_tests::device::TpDevice;
use tcpc_tests::edge::TestEdge;
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::servers::{NatsServer, RedisServer};
use tcpc_tests::stream::UplinkReader;
use tcpc_tests::world::World;
use tcpc_tests::{init_logging, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Servers {
    nats: NatsServer,
    redis: RedisServer,
    auth: AuthDouble,
}

async fn servers() -> Servers {
    init_logging();
    let (nats, redis) = tokio::join!(NatsServer::spawn(), RedisServer::spawn());
    let auth = AuthDouble::spawn(nats.client().await).await;
    Servers { nats, redis, auth }
}

/// A TCP connection from a chosen loopback source address (all of 127.0.0.0/8 works).
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(to).await.expect("connect")
}

fn tp_auth(token: &str) -> Vec<u8> {
    Frame::data(cmd::AUTH, token.as_bytes().to_vec()).to_bytes().to_vec()
}

/// A metric's value in the edge's exposition (0 when absent).
async fn metric(edge: &TestEdge, series: &str) -> u64 {
    let text = edge.http_get("/metrics").await.unwrap_or_default();
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
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
    wait_until("the publish to fail", || async { metric(&edge, "edge_republished_total").await >= 1 }).await;
    let disconnect = DisconnectRequest { device_id: "dev-gone".into(), ..Default::default() };
    edge.grpc_client().await.disconnect(disconnect).await.unwrap();
    // Its session gives up (flush budget, then the offline event) while NATS is down.
    wait_until("the leaving device's session to end", || async {
        metric(&edge, "edge_connections{listener=\"official\"}").await == 1
    })
    .await;
    assert!(metric(&edge, "edge_uplinks_lost_total{reason=\"unacknowledged\"}").await >= 1);

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
    assert!(metric(&edge, "edge_routes_restored_total").await >= 1);
    // The device is still connected and served.
    stream.write_all(b"after").await.unwrap();
    assert_eq!(&reader.uplink().await.payload[..], b"after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_edges_devices_go_offline_but_a_device_that_moved_stays_online() {
    let w = World::start().await;
    w.device("tok-stay", "dev-stay", "N-stay", json!({}));
    w.device("tok-move", "dev-move", "N-move", json!({}));
    let _worker = w.worker("worker-a", &[]).await;
    let mut edge_a = w.edge_process("edge-a").await;
    let edge_b = w.edge_process("edge-b").await;
    let mut status = Watcher::subscribe(
        &w.broker,
        &["devices/status/dev-stay", "devices/status/dev-move", "devices/telemetry"],
    )
    .await;

    let _stay = TpDevice::online(edge_a.official, "tok-stay").await;
    let _moved_old = TpDevice::online(edge_a.official, "tok-move").await;
    let mut moved = TpDevice::online(edge_b.official, "tok-move").await;
    let mut online = 0;
    while online < 3 {
        let message = status.next().await;
        assert_eq!(&message.payload[..], b"1", "{}", message.topic);
        online += 1;
    }

    edge_a.kill();
    // The reaper on edge-b notices edge-a's liveness key expire and reports its devices.
    let offline = status.next().await;
    assert_eq!((offline.topic.as_str(), &offline.payload[..]), ("devices/status/dev-stay", &b"0"[..]));
    // Whatever the reaper published for dev-move's partition came before this uplink.
    moved.send(Frame::data(cmd::ATTRIBUTES, &b"{\"still\":1}"[..])).await;
    let next = status.next().await;
    assert_eq!(next.topic, "devices/telemetry", "no offline for the device that moved: {next:?}");
    assert_eq!(next.values("dev-move"), json!({"still": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_silent_sockets_from_one_address_do_not_shut_out_another() {
    let s = servers().await;
    s.auth.add("other", device("dev-other"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |config| {
        config.limits.max_connections = 1500;
    })
    .await;
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(connect_from(attacker, edge.official).await);
    }
    wait_until("the sockets past the per-source limit refused", || async {
        metric(&edge, "edge_connections_refused_total{reason=\"source_connections\"}").await == 1000
    })
    .await;
    let mut other = TpDevice::connect(edge.official).await;
    assert_eq!(other.auth("other").await, r#"{"result":0}"#, "a device from another address gets in");
    assert_eq!(s.auth.requests(), 1, "the silent sockets cost the workers nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_distinct_bad_tokens_from_one_address_costs_a_bounded_number_of_auth_calls() {
    let s = servers().await;
    s.auth.add("good", device("dev-good"));
    let edge = TestEdge::spawn(&s.nats, &s.redis, "edge-a", |_| {}).await;
    let attacker = Ipv4Addr::new(127, 0, 0, 3);
    let flood_until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut attempts = 0u64;
    let mut floods = Vec::new();
    for lane in 0..8 {
        let official = edge.official;
        floods.push(tokio::spawn(async move {
            let mut attempts = 0u64;
            while tokio::time::Instant::now() < flood_until {
                let mut stream = connect_from(attacker, official).await;
                let _ = stream.write_all(&tp_auth(&format!("bad-{lane}-{attempts}"))).await;
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer).await;
                attempts += 1;
            }
            attempts
        }));
    }
    for flood in floods {
        attempts += flood.await.unwrap();
    }
    let calls = s.auth.requests();
    // --ban-after (30) refused tokens ban the address; at most one attempt per lane can
    // be in flight when the ban falls.
    assert!(calls <= 30 + 8, "{calls} auth calls for {attempts} attempts");
    assert!(attempts > 100, "the flood ran: {attempts} attempts");
    println!("bad-token flood: {attempts} attempts in 10 s, {calls} auth calls");
    let mut good = TpDevice::connect(edge.official).await;
    assert_eq!(good.auth("good").await, r#"{"result":0}"#, "other addresses are not banned");
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
    assert_eq!(metric(&edge, "edge_connections_closed_total{reason=\"auth_timeout\"}").await, 1);
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
    assert_eq!(metric(&edge, "edge_downlinks_total{reason=\"abandoned\"}").await, 1);
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
    wait_until("the first publish to fail", || async { metric(&edge, "edge_republished_total").await >= 1 })
        .await;
    let disconnect = DisconnectRequest { device_id: "dev-busy".into(), ..Default::default() };
    assert_eq!(edge.grpc_client().await.disconnect(disconnect).await.unwrap().into_inner().closed, 1);

    s.nats.start().await;
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
    assert_eq!(metric(&edge, "edge_uplinks_lost_total{reason=\"unacknowledged\"}").await, 0);
}
