//! Holds many authenticated, idle TP connections to an edge, to measure the edge's
//! memory per connection (see BENCHMARKS.md).
//!
//! `idle-load --edge 127.0.0.1:7653 --nats-url nats://127.0.0.1:4222 --connections 10000`
//! answers the edge's auth requests itself (any token is a device), connects from
//! several loopback source addresses, authenticates every connection, prints `ready N`,
//! and holds the connections until stdin closes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, bail};
use edge_gateway::codec::{Frame, TpCodec, cmd};
use futures::{SinkExt, StreamExt};
use tcpc_tests::auth::AuthDouble;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;

/// Connections per loopback source address (each has ~28k ephemeral ports).
const PER_SOURCE: usize = 20_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut edge, mut nats_url, mut connections) = (None, None, 10_000usize);
    while let Some(flag) = args.next() {
        let value = args.next().context("every flag takes a value")?;
        match flag.as_str() {
            "--edge" => edge = Some(value.parse::<SocketAddr>()?),
            "--nats-url" => nats_url = Some(value),
            "--connections" => connections = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let edge = edge.context("--edge is required")?;
    let nats = async_nats::connect(nats_url.context("--nats-url is required")?).await?;
    let auth = AuthDouble::spawn(nats).await;
    auth.accept_any();

    let limit = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let permit = limit.clone().acquire_owned().await?;
        let source = Ipv4Addr::new(127, 0, 1, 1 + (i / PER_SOURCE) as u8);
        tasks.push(tokio::spawn(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            let stream = socket.connect(edge).await?;
            let mut framed = Framed::new(stream, TpCodec::new(1024));
            framed.send(Frame::data(cmd::AUTH, format!("load-{i}"))).await?;
            let answer = framed.next().await.context("closed before the auth answer")??;
            drop(permit);
            anyhow::ensure!(&answer.payload[..] == br#"{"result":0}"#, "refused: {answer:?}");
            Ok::<_, anyhow::Error>(framed.into_inner())
        }));
    }
    let mut held = Vec::with_capacity(connections);
    for task in tasks {
        held.push(task.await??);
    }
    println!("ready {}", held.len());
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    stdin.read_to_end(&mut sink).await?;
    Ok(())
}
