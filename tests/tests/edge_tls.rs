//! TLS on the device ports, with certificates made by the test: TP and custom devices
//! over TLS, plaintext refused, a certificate replaced under a live connection, and
//! client certificates.

use bytes::Bytes;
use edge_gateway::codec::{Frame, TpCodec, cmd};
use futures::{SinkExt, StreamExt};
use tcpc_proto::v1::{Framing, Protocol, UplinkKind, framing};
use tcpc_tests::auth::{custom_device, device};
use tcpc_tests::device::TpDevice;
use tcpc_tests::edge::{EdgeWorld, TestEdge};
use tcpc_tests::stream::UplinkReader;
use tcpc_tests::tls::{PemFiles, TestCa, connect};
use tcpc_tests::wait_until;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

/// An edge with both TLS ports on, serving `files`' `cert.pem` and `key.pem` (and
/// requiring client certificates from `client_ca.pem` when `client_ca`).
async fn tls_edge(w: &EdgeWorld, files: &PemFiles, client_ca: bool) -> TestEdge {
    let (cert, key, ca) = (files.path("cert.pem"), files.path("key.pem"), files.path("client_ca.pem"));
    TestEdge::spawn(&w.nats, &w.redis, "edge-tls", move |config| {
        let any = edge_gateway::config::Listen(Some("127.0.0.1:0".parse().unwrap()));
        config.ports.official_tls_listen = any;
        config.ports.custom_tls_listen = any;
        config.ports.tls_cert_file = Some(cert);
        config.ports.tls_key_file = Some(key);
        config.ports.tls_client_ca_file = client_ca.then_some(ca);
    })
    .await
}

/// Sends an auth frame over `framed` and returns the answer's payload.
async fn auth<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    framed: &mut Framed<T, TpCodec>,
    token: &str,
) -> String {
    framed.send(Frame::data(cmd::AUTH, Bytes::copy_from_slice(token.as_bytes()))).await.unwrap();
    let answer = framed.next().await.expect("an answer").expect("a frame");
    String::from_utf8(answer.payload.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tp_and_custom_devices_authenticate_and_send_over_tls() {
    let w = EdgeWorld::start().await;
    w.auth.add("tls-tp", device("dev-tls-tp"));
    let four = Framing { kind: Some(framing::Kind::FixedLength(4)) };
    w.auth.add("tls-custom", custom_device("dev-tls-custom", four));
    let ca = TestCa::new("tcpc test CA");
    let files = PemFiles::new("devices");
    files.serve(&ca.issue(&["localhost", "127.0.0.1"]));
    let edge = tls_edge(&w, &files, false).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;

    let tls = connect(edge.official_tls.unwrap(), ca.client_config(None)).await.expect("a TLS handshake");
    let mut tp = Framed::new(tls, TpCodec::new(1 << 20));
    assert_eq!(auth(&mut tp, "tls-tp").await, r#"{"result":0}"#);
    assert_eq!(reader.session().await.device_id, "dev-tls-tp");
    tp.send(Frame::data(cmd::TELEMETRY, &br#"{"t":1}"#[..])).await.unwrap();
    let uplink = reader.uplink().await;
    assert_eq!((uplink.kind(), &uplink.payload[..]), (UplinkKind::Telemetry, &br#"{"t":1}"#[..]));

    let mut custom =
        connect(edge.custom_tls.unwrap(), ca.client_config(None)).await.expect("a TLS handshake");
    custom.write_all(b"tls-custom\nabcdefgh").await.unwrap();
    custom.flush().await.unwrap();
    let online = reader.session().await;
    assert_eq!((online.device_id.as_str(), online.protocol()), ("dev-tls-custom", Protocol::Custom));
    for expected in [b"abcd", b"efgh"] {
        assert_eq!(&reader.uplink().await.payload[..], expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_on_a_tls_port_is_refused() {
    let w = EdgeWorld::start().await;
    w.auth.add("tls-tp", device("dev-plain"));
    let ca = TestCa::new("tcpc test CA");
    let files = PemFiles::new("plaintext");
    files.serve(&ca.issue(&["localhost"]));
    let edge = tls_edge(&w, &files, false).await;
    let mut plain = TpDevice::connect(edge.official_tls.unwrap()).await;
    plain.send(Frame::data(cmd::AUTH, &b"tls-tp"[..])).await;
    assert_eq!(plain.next().await, None, "closed without an answer");
    wait_until("the refusal to be counted", || async {
        edge.metric("edge_connections_closed_total{reason=\"tls_handshake\"}").await == 1
    })
    .await;
    assert_eq!(w.auth.requests(), 0, "no token was read");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_certificate_serves_new_connections_and_old_ones_keep_working() {
    let w = EdgeWorld::start().await;
    w.auth.add("tok-old", device("dev-old"));
    let (old_ca, new_ca) = (TestCa::new("old CA"), TestCa::new("new CA"));
    let files = PemFiles::new("reload");
    files.serve(&old_ca.issue(&["localhost"]));
    let edge = tls_edge(&w, &files, false).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let addr = edge.official_tls.unwrap();
    let tls = connect(addr, old_ca.client_config(None)).await.expect("the old certificate served");
    let mut old = Framed::new(tls, TpCodec::new(1 << 20));
    assert_eq!(auth(&mut old, "tok-old").await, r#"{"result":0}"#);
    reader.session().await;

    // A Secret update: new files swapped in; no restart.
    files.serve(&new_ca.issue(&["localhost"]));
    wait_until("new connections to get the new certificate", || async {
        connect(addr, new_ca.client_config(None)).await.is_ok()
    })
    .await;
    assert!(connect(addr, old_ca.client_config(None)).await.is_err(), "the old one is no longer served");

    // A key that does not match: refused, the last good pair kept.
    let refused = || async { edge.metric("edge_tls_certificate_reloads_total{reason=\"refused\"}").await };
    let before = refused().await;
    files.write("key.pem", &old_ca.issue(&["localhost"]).key_pem);
    wait_until("the bad pair to be refused", || async { refused().await > before }).await;
    assert!(connect(addr, new_ca.client_config(None)).await.is_ok(), "still the last good certificate");

    old.send(Frame::data(cmd::TELEMETRY, &br#"{"after":"reload"}"#[..])).await.unwrap();
    assert_eq!(
        &reader.uplink().await.payload[..],
        br#"{"after":"reload"}"#,
        "the old connection still works"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_client_ca_devices_need_its_certificate() {
    let w = EdgeWorld::start().await;
    w.auth.add("tok-cert", device("dev-cert"));
    let (server_ca, client_ca, stranger_ca) =
        (TestCa::new("server CA"), TestCa::new("client CA"), TestCa::new("other"));
    let files = PemFiles::new("client-ca");
    files.serve(&server_ca.issue(&["localhost"]));
    files.write("client_ca.pem", &client_ca.cert_pem);
    let edge = tls_edge(&w, &files, true).await;
    let addr = edge.official_tls.unwrap();

    // TLS 1.3 clients learn of a refused certificate at their first read.
    for identity in [None, Some(stranger_ca.issue(&["device"]))] {
        let refused = match connect(addr, server_ca.client_config(identity.as_ref())).await {
            Err(_) => true,
            Ok(tls) => {
                let mut framed = Framed::new(tls, TpCodec::new(1 << 20));
                let _ = framed.send(Frame::data(cmd::AUTH, &b"tok-cert"[..])).await;
                !matches!(framed.next().await, Some(Ok(_)))
            }
        };
        assert!(refused, "a device without a certificate of the client CA is refused");
    }
    let tls = connect(addr, server_ca.client_config(Some(&client_ca.issue(&["device"])))).await.unwrap();
    let mut framed = Framed::new(tls, TpCodec::new(1 << 20));
    assert_eq!(auth(&mut framed, "tok-cert").await, r#"{"result":0}"#);
    assert_eq!(w.auth.requests(), 1, "only the device with a certificate asked");
}

/// An edge whose gRPC port takes only clients with a certificate of `ca` (files in
/// `files`: `grpc-cert.pem`, `grpc-key.pem`, `grpc-ca.pem`) and the token "s3cret".
async fn mtls_edge(w: &EdgeWorld, files: &PemFiles, ca: &TestCa) -> TestEdge {
    let issued = ca.issue(&["edge-gateway"]);
    files.write("grpc-cert.pem", &issued.cert_pem);
    files.write("grpc-key.pem", &issued.key_pem);
    files.write("grpc-ca.pem", &ca.cert_pem);
    let security = grpc_security(files, "s3cret");
    TestEdge::spawn(&w.nats, &w.redis, "edge-mtls", move |config| config.grpc_security = security).await
}

fn grpc_security(files: &PemFiles, token: &str) -> edge_gateway::config::GrpcSecurity {
    edge_gateway::config::GrpcSecurity {
        grpc_tls_cert_file: Some(files.path("grpc-cert.pem")),
        grpc_tls_key_file: Some(files.path("grpc-key.pem")),
        grpc_tls_ca_file: Some(files.path("grpc-ca.pem")),
        grpc_token: Some(token.into()),
    }
}

fn route_to(edge: &TestEdge, device_id: &str, connection_id: &str) -> tcpc_proto::route::Route {
    tcpc_proto::route::Route {
        device_id: device_id.to_owned(),
        connection_id: connection_id.to_owned(),
        pod: edge.pod.clone(),
        grpc_addr: edge.grpc.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_mutual_tls_workers_deliver_and_clients_without_a_certificate_are_refused() {
    let w = EdgeWorld::start().await;
    w.auth.add("tok-mtls", device("dev-mtls"));
    let ca = TestCa::new("hop CA");
    let files = PemFiles::new("mtls");
    let edge = mtls_edge(&w, &files, &ca).await;
    let mut reader = UplinkReader::open(w.nats.client().await).await;
    let mut device = TpDevice::online(edge.official, "tok-mtls").await;
    let online = reader.session().await;

    // The worker's client: its own certificate of the CA, and the token.
    let worker_files = PemFiles::new("mtls-worker");
    let issued = ca.issue(&["script-worker"]);
    worker_files.write("grpc-cert.pem", &issued.cert_pem);
    worker_files.write("grpc-key.pem", &issued.key_pem);
    worker_files.write("grpc-ca.pem", &ca.cert_pem);
    let edges =
        script_worker::routes::EdgeClients::new(&grpc_security(&worker_files, "s3cret"), "edge-gateway")
            .unwrap();
    let route = route_to(&edge, "dev-mtls", &online.connection_id);
    let timeout = std::time::Duration::from_secs(5);
    let delivered =
        edges.deliver(&route, Bytes::from_static(b"{\"m\":1}"), u32::from(cmd::COMMAND), timeout).await;
    assert_eq!(delivered.unwrap().0, tcpc_proto::v1::DeliverStatus::Delivered);
    assert_eq!(&device.next().await.unwrap().payload[..], b"{\"m\":1}");

    // A client with the right token but no certificate: refused at the handshake.
    let no_certificate =
        edge_gateway::config::GrpcSecurity { grpc_token: Some("s3cret".into()), ..Default::default() };
    let plain = script_worker::routes::EdgeClients::new(&no_certificate, "edge-gateway").unwrap();
    assert!(plain.deliver(&route, Bytes::from_static(b"x"), 0, timeout).await.is_err());
    // A certificate of another CA: refused.
    let stranger = TestCa::new("other CA");
    let issued = stranger.issue(&["script-worker"]);
    worker_files.write("grpc-cert.pem", &issued.cert_pem);
    worker_files.write("grpc-key.pem", &issued.key_pem);
    let strange =
        script_worker::routes::EdgeClients::new(&grpc_security(&worker_files, "s3cret"), "edge-gateway")
            .unwrap();
    assert!(strange.deliver(&route, Bytes::from_static(b"x"), 0, timeout).await.is_err());
    // The right certificate and a wrong token: refused by the token check.
    let issued = ca.issue(&["script-worker"]);
    worker_files.write("grpc-cert.pem", &issued.cert_pem);
    worker_files.write("grpc-key.pem", &issued.key_pem);
    let wrong_token =
        script_worker::routes::EdgeClients::new(&grpc_security(&worker_files, "guess"), "edge-gateway")
            .unwrap();
    let refused = wrong_token.deliver(&route, Bytes::from_static(b"x"), 0, timeout).await.unwrap_err();
    assert!(refused.contains("token"), "{refused}");

    // Disconnect must name its connection.
    let anonymous = route_to(&edge, "dev-mtls", "");
    let refused = edges.disconnect(&anonymous, "test").await.unwrap_err();
    assert!(refused.contains("connection_id"), "{refused}");
    assert_eq!(edges.disconnect(&route, "test").await.unwrap(), 1);
    assert_eq!(device.next().await.map(|frame| frame.cmd), Some(cmd::ERROR), "told before the close");
}
