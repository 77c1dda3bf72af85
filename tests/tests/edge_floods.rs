//! Floods from one source address against a real edge (nats-server, redis-server):
//! apart from the other end-to-end tests, since each loads both cores for seconds.

use std::net::Ipv4Addr;
use std::time::Duration;

use edge_gateway::codec::{Frame, cmd};
use tcpc_tests::auth::device;
use tcpc_tests::device::{TpDevice, connect_from};
use tcpc_tests::edge::{EdgeWorld, TestEdge};
use tcpc_tests::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tp_auth(token: &str) -> Vec<u8> {
    Frame::data(cmd::AUTH, token.as_bytes().to_vec()).to_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_silent_sockets_from_one_address_do_not_shut_out_another() {
    let s = EdgeWorld::start().await;
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
        edge.metric("edge_connections_refused_total{reason=\"source_connections\"}").await == 1000
    })
    .await;
    let mut other = TpDevice::connect(edge.official).await;
    assert_eq!(other.auth("other").await, r#"{"result":0}"#, "a device from another address gets in");
    assert_eq!(s.auth.requests(), 1, "the silent sockets cost the workers nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_distinct_bad_tokens_from_one_address_costs_a_bounded_number_of_auth_calls() {
    let s = EdgeWorld::start().await;
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
