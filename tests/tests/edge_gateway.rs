//! The edge-gateway against real redis-server and nats-server, driven by real TCP
//! clients; the workers' auth responder is a test double.

use std::time::Duration;

use bytes::Bytes;
use edge_gateway::codec::{Frame, FrameType, cmd};
use redis::AsyncCommands;
use tcpc_proto::names;
use tcpc_proto::v1::{
    DeliverRequest, DeliverStatus, DisconnectRequest, Framing, IdleGap, LengthField, Protocol, SessionState,
    UplinkKind, framing,
};
use tcpc_tests::auth::{custom_device, device};
use tcpc_tests::device::{RawDevice, TpDevice};
use tcpc_tests::edge::{EdgeWorld, TestEdge};
use tcpc_tests::servers::RedisServer;
use tcpc_tests::stream::UplinkReader;
use tcpc_tests::wait_until;

async fn world() -> EdgeWorld {
    EdgeWorld::start().await
}

async fn route(redis: &RedisServer, device_id: &str) -> std::collections::HashMap<String, String> {
    redis.connection().await.hgetall(names::route_key(device_id)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tp_device_authenticates_and_its_frames_reach_jetstream_in_order() {
    let w = world().await;
    w.auth.add("tok-1", device("dev-1"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;

    let mut dev = TpDevice::online(edge.official, "tok-1").await;
    dev.send(Frame::data(cmd::ATTRIBUTES, &br#"{"temperature":36.5}"#[..])).await;
    dev.send(Frame::heartbeat(0)).await;
    assert_eq!(dev.next().await, Some(Frame::heartbeat(0)), "heartbeats are answered");
    dev.send(Frame::data(cmd::EVENTS, &br#"{"method":"alarm","params":{"level":2}}"#[..])).await;
    dev.send(Frame::data(cmd::TELEMETRY, &br#"{"hum":52}"#[..])).await;
    dev.send(Frame::data(cmd::COMMAND_RESPONSE, &br#"{"message_id":"m1","result":0}"#[..])).await;
    dev.send(Frame::data(cmd::ATTRIBUTE_SET_RESPONSE, &br#"{"message_id":"m2","result":0}"#[..])).await;

    let (envelope, online_id) = reader.next().await;
    let Some(tcpc_proto::v1::uplink_envelope::Body::Session(online)) = envelope.body else {
        panic!("online first")
    };
    assert_eq!(online.state(), SessionState::Online);
    assert_eq!((online.device_id.as_str(), online.pod.as_str(), online.sequence), ("dev-1", "edge-a", 0));
    assert_eq!(online.protocol(), Protocol::Official);
    assert_eq!(online_id, format!("{}-0", online.connection_id));

    let expected = [
        (UplinkKind::Attributes, &br#"{"temperature":36.5}"#[..]),
        (UplinkKind::Events, br#"{"method":"alarm","params":{"level":2}}"#),
        (UplinkKind::Telemetry, br#"{"hum":52}"#),
        (UplinkKind::CommandResponse, br#"{"message_id":"m1","result":0}"#),
        (UplinkKind::AttributeSetResponse, br#"{"message_id":"m2","result":0}"#),
    ];
    for (sequence, (kind, payload)) in (1..).zip(expected) {
        let uplink = reader.uplink().await;
        assert_eq!(uplink.kind(), kind);
        assert_eq!(&uplink.payload[..], payload);
        assert_eq!(uplink.device_id, "dev-1");
        assert_eq!(uplink.connection_id, online.connection_id);
        assert_eq!(uplink.protocol(), Protocol::Official);
        assert_eq!(uplink.sequence, sequence);
        assert!(uplink.received_at_ms > 0);
    }
    let stored = route(&w.redis, "dev-1").await;
    assert_eq!(stored[names::ROUTE_CONNECTION], online.connection_id);
    assert_eq!(stored[names::ROUTE_POD], "edge-a");
    assert_eq!(stored[names::ROUTE_GRPC_ADDR], edge.grpc.to_string());

    drop(dev);
    let offline = reader.session().await;
    assert_eq!(offline.state(), SessionState::Offline);
    assert_eq!((offline.reason.as_str(), offline.owned_route), ("peer_closed", true));
    assert_eq!(offline.connection_id, online.connection_id);
    assert!(route(&w.redis, "dev-1").await.is_empty(), "route removed with the connection");
    // The session counts the offline event's ack, then leaves the gauge, after the
    // reader may have the event.
    wait_until("the session to end in the metrics", || async {
        edge.metric("edge_connections{listener=\"official\"}").await == 0
    })
    .await;
    assert_eq!(edge.metric("edge_uplinks_total").await, 7, "online, five data frames, offline");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_gets_an_error_frame_and_the_close() {
    let w = world().await;
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut dev = TpDevice::connect(edge.official).await;
    assert_eq!(dev.auth("nope").await, r#"{"result":1,"message":"unknown access token"}"#);
    assert_eq!(dev.next().await, None);
    assert_eq!(w.auth.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn split_and_coalesced_frames() {
    let w = world().await;
    w.auth.add("tok-2", device("dev-2"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let mut dev = TpDevice::connect(edge.official).await;
    // Auth and two data frames in one write: the data must wait for the auth.
    let mut burst = Frame::data(cmd::AUTH, &b"tok-2"[..]).to_bytes().to_vec();
    burst.extend_from_slice(&Frame::data(cmd::ATTRIBUTES, &b"{\"a\":1}"[..]).to_bytes());
    burst.extend_from_slice(&Frame::data(cmd::ATTRIBUTES, &b"{\"a\":2}"[..]).to_bytes());
    dev.send_raw(&burst).await;
    assert_eq!(&dev.next().await.unwrap().payload[..], br#"{"result":0}"#);
    // One frame a byte at a time.
    for byte in Frame::data(cmd::ATTRIBUTES, &b"{\"a\":3}"[..]).to_bytes().iter() {
        dev.send_raw(&[*byte]).await;
    }
    assert_eq!(reader.session().await.state(), SessionState::Online);
    for n in 1..=3 {
        assert_eq!(reader.uplink().await.payload, Bytes::from(format!("{{\"a\":{n}}}")));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_devices_are_cut_by_their_framing() {
    let w = world().await;
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let framings = [
        (
            framing::Kind::Delimiter(Bytes::from_static(b"\r\n")),
            &b"temp=1\r\nte"[..],
            &b"mp=2\r\n"[..],
            vec![&b"temp=1"[..], b"temp=2"],
        ),
        (
            framing::Kind::FixedLength(4),
            b"\x01\x02\x03\x04\x05\x06",
            b"\x07\x08",
            vec![b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"],
        ),
        (
            framing::Kind::LengthField(LengthField {
                offset: 1,
                width: 2,
                little_endian: false,
                adjustment: 0,
            }),
            b"\xaa\x00\x03abc\xaa",
            b"\x00\x01z",
            vec![b"\xaa\x00\x03abc", b"\xaa\x00\x01z"],
        ),
        (
            framing::Kind::IdleGap(IdleGap { gap_ms: 100, buffer_size: 4 }),
            b"123456",
            b"",
            vec![b"1234", b"56"],
        ),
    ];
    for (n, (kind, first, second, messages)) in framings.into_iter().enumerate() {
        let token = format!("custom-{n}");
        let device_id = format!("dev-c{n}");
        w.auth.add(&token, custom_device(&device_id, Framing { kind: Some(kind) }));
        let mut dev = RawDevice::connect(edge.custom).await;
        // The token line and the first bytes of data in one write.
        dev.send(&[token.as_bytes(), b"\n", first].concat()).await;
        let online = reader.session().await;
        assert_eq!((online.device_id.as_str(), online.protocol()), (device_id.as_str(), Protocol::Custom));
        dev.send(second).await;
        for message in messages {
            let uplink = reader.uplink().await;
            assert_eq!((uplink.kind(), &uplink.payload[..]), (UplinkKind::Raw, message), "framing {n}");
        }
        drop(dev);
        assert_eq!(reader.session().await.state(), SessionState::Offline);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_token_ends_at_an_idle_gap_and_wrong_tokens_get_a_json_line() {
    let w = world().await;
    w.auth.add("gap-token", device("dev-gap"));
    let edge =
        TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| c.limits.token_gap = Duration::from_millis(100))
            .await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let mut dev = RawDevice::connect(edge.custom).await;
    dev.send(b"gap-token").await;
    assert_eq!(reader.session().await.device_id, "dev-gap");

    let mut wrong = RawDevice::connect(edge.custom).await;
    wrong.send(b"wrong\n").await;
    assert_eq!(wrong.read_to_close().await, b"{\"result\":1,\"message\":\"unknown access token\"}\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_close_only_their_connection() {
    let w = world().await;
    w.auth.add("good", device("dev-good"));
    w.auth.add("big", device("dev-big"));
    w.auth.add("magic", device("dev-magic"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| c.limits.max_frame = 1024).await;
    let mut good = TpDevice::online(edge.official, "good").await;

    let mut big = TpDevice::online(edge.official, "big").await;
    big.send_raw(b"TP\x00\x01\x00\x00\x04\x01").await; // LENGTH 1025
    big.expect_closed_with(cmd::ERROR, "frame LENGTH 1025 exceeds the maximum of 1024 bytes").await;

    let mut magic = TpDevice::online(edge.official, "magic").await;
    magic.send_raw(b"XP\x00\x01\x00\x00\x00\x00").await;
    magic.expect_closed_with(cmd::ERROR, "bad magic 0x58: frames start with 'T' 'P'").await;

    let mut unknown_type = TpDevice::connect(edge.official).await;
    unknown_type.send_raw(b"TP\x05").await;
    unknown_type.expect_closed_with(cmd::AUTH, "unknown frame TYPE 0x05").await;

    good.send(Frame::heartbeat(1)).await;
    assert_eq!(good.next().await, Some(Frame::heartbeat(1)), "the other connection still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_deadline_and_idle_timeout_close_with_an_error_frame() {
    let w = world().await;
    w.auth.add("idle", device("dev-idle"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| {
        c.limits.auth_timeout = Duration::from_millis(300);
        c.limits.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let mut silent = TpDevice::connect(edge.official).await;
    silent.expect_closed_with(cmd::AUTH, "no authentication within the deadline").await;

    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let mut idle = TpDevice::online(edge.official, "idle").await;
    idle.expect_closed_with(cmd::ERROR, "idle timeout").await;
    assert_eq!(reader.session().await.state(), SessionState::Online);
    let offline = reader.session().await;
    assert_eq!((offline.state(), offline.reason.as_str()), (SessionState::Offline, "idle_timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_to_another_edge_moves_the_route_and_the_late_close_keeps_it() {
    let w = world().await;
    w.auth.add("roam", device("dev-roam"));
    let edge_a = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let edge_b = TestEdge::spawn(&w.nats, &w.redis, "edge-b", |_| {}).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;

    let on_a = TpDevice::online(edge_a.official, "roam").await;
    let online_a = reader.session().await;
    assert_eq!(route(&w.redis, "dev-roam").await[names::ROUTE_POD], "edge-a");

    // The device reconnects to B before A noticed that the old connection is gone.
    let mut on_b = TpDevice::online(edge_b.official, "roam").await;
    let online_b = reader.session().await;
    assert_eq!(online_b.pod, "edge-b");
    assert_eq!(route(&w.redis, "dev-roam").await[names::ROUTE_CONNECTION], online_b.connection_id);

    // A's late close must neither delete B's route nor report the device offline.
    drop(on_a);
    on_b.send(Frame::data(cmd::ATTRIBUTES, &b"{\"after\":1}"[..])).await;
    let next = reader.next().await.0;
    let Some(tcpc_proto::v1::uplink_envelope::Body::Uplink(uplink)) = next.body else {
        panic!("the old connection's close published {next:?}")
    };
    assert_eq!(uplink.connection_id, online_b.connection_id);
    wait_until("edge-a to close the old session", || async {
        edge_a
            .http_get("/metrics")
            .await
            .is_some_and(|m| m.contains("edge_connections{listener=\"official\"} 0"))
    })
    .await;
    let stored = route(&w.redis, "dev-roam").await;
    assert_eq!(
        (stored[names::ROUTE_POD].as_str(), &stored[names::ROUTE_CONNECTION]),
        ("edge-b", &online_b.connection_id)
    );
    assert_ne!(online_a.connection_id, online_b.connection_id);

    // Downlinks follow the route: B delivers, A answers offline for its old connection.
    let mut client_b = edge_b.grpc_client().await;
    let delivered = client_b
        .deliver(DeliverRequest {
            device_id: "dev-roam".into(),
            connection_id: online_b.connection_id.clone(),
            payload: Bytes::from_static(b"{\"method\":\"reboot\"}"),
            tp_cmd: cmd::COMMAND.into(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delivered.status(), DeliverStatus::Delivered);
    assert_eq!(on_b.next().await, Some(Frame::data(cmd::COMMAND, &b"{\"method\":\"reboot\"}"[..])));
    let stale = edge_a
        .grpc_client()
        .await
        .deliver(DeliverRequest {
            device_id: "dev-roam".into(),
            connection_id: online_a.connection_id,
            payload: Bytes::from_static(b"x"),
            tp_cmd: 0,
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.status(), DeliverStatus::Offline);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_to_the_same_edge_supersedes_the_older_connection() {
    let w = world().await;
    w.auth.add("twice", device("dev-twice"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut first = TpDevice::online(edge.official, "twice").await;
    let _second = TpDevice::online(edge.official, "twice").await;
    first.expect_closed_with(cmd::ERROR, "replaced by a newer connection").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_disconnect_closes_the_device_connection() {
    let w = world().await;
    w.auth.add("bye", device("dev-bye"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut dev = TpDevice::online(edge.official, "bye").await;
    let mut client = edge.grpc_client().await;
    let offline = client
        .deliver(DeliverRequest {
            device_id: "nobody".into(),
            connection_id: "00".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offline.status(), DeliverStatus::Offline);
    let disconnect = |connection_id: String| DisconnectRequest {
        device_id: "dev-bye".into(),
        connection_id,
        reason: "test".into(),
    };
    // "Any connection of the device" is no order: the caller names the connection.
    let anonymous = client.disconnect(disconnect(String::new())).await.unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::InvalidArgument);
    let connection_id = route(&w.redis, "dev-bye").await["conn"].clone();
    let reply = client.disconnect(disconnect(connection_id)).await.unwrap().into_inner();
    assert_eq!(reply.closed, 1);
    dev.expect_closed_with(cmd::ERROR, "disconnected by the platform").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_are_refused() {
    let w = world().await;
    w.auth.add("one", device("dev-one"));
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| c.limits.max_connections = 1).await;
    let _one = TpDevice::online(edge.official, "one").await;
    let mut two = TpDevice::connect(edge.official).await;
    two.expect_closed_with(cmd::AUTH, "too many connections").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_outage_loses_no_accepted_frame() {
    let mut w = world().await;
    w.auth.add("steady", device("dev-steady"));
    // A window of one: the stream itself holds each device's frames in order, across
    // the outage (with a wider window the worker restores the order, see
    // script_worker.rs).
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| c.limits.max_in_flight = 1).await;
    let mut dev = TpDevice::online(edge.official, "steady").await;
    let send = |n: u32| Frame::data(cmd::TELEMETRY, Bytes::from(format!("{{\"n\":{n}}}")));
    for n in 0..50 {
        dev.send(send(n)).await;
    }
    w.nats.stop();
    wait_until("the edge to report the bus unavailable", || async {
        edge.http_status("/readyz").await == Some(503)
    })
    .await;
    let mut refused = TpDevice::connect(edge.official).await;
    refused.expect_closed_with(cmd::AUTH, "service unavailable, retry later").await;
    // The device keeps sending while NATS is down; the edge holds what it accepted and
    // stops reading past its window.
    for n in 50..100 {
        dev.send(send(n)).await;
    }
    w.nats.start().await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    assert_eq!(reader.session().await.state(), SessionState::Online);
    let mut seen = Vec::new();
    while seen.len() < 100 {
        let uplink = reader.uplink().await;
        let value: serde_json::Value = serde_json::from_slice(&uplink.payload).unwrap();
        seen.push(value["n"].as_u64().unwrap());
    }
    assert_eq!(seen, (0..100).collect::<Vec<_>>(), "every frame, once, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeat_before_auth_is_refused() {
    let w = world().await;
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |_| {}).await;
    let mut dev = TpDevice::connect(edge.official).await;
    dev.send(Frame { frame_type: FrameType::Heartbeat, cmd: 0, payload: Bytes::new() }).await;
    dev.expect_closed_with(cmd::AUTH, "the first frame must be auth (TYPE 0, CMD 0)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_every_session_with_a_reason_and_offline_events() {
    let w = world().await;
    for n in 0..3 {
        w.auth.add(&format!("drain-{n}"), device(&format!("dev-drain-{n}")));
    }
    let edge =
        TestEdge::spawn(&w.nats, &w.redis, "edge-a", |c| c.limits.drain_window = Duration::from_millis(300))
            .await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let mut devices = Vec::new();
    for n in 0..3 {
        devices.push(TpDevice::online(edge.official, &format!("drain-{n}")).await);
        assert_eq!(reader.session().await.state(), SessionState::Online);
    }
    edge.stop().await;
    for device in &mut devices {
        device.expect_closed_with(cmd::ERROR, "server shutting down, reconnect").await;
    }
    let mut offline = Vec::new();
    for _ in 0..3 {
        let event = reader.session().await;
        assert_eq!(
            (event.state(), event.reason.as_str(), event.owned_route),
            (SessionState::Offline, "draining", true)
        );
        offline.push(event.device_id);
    }
    offline.sort();
    assert_eq!(offline, ["dev-drain-0", "dev-drain-1", "dev-drain-2"]);
    assert!(route(&w.redis, "dev-drain-0").await.is_empty());
}
