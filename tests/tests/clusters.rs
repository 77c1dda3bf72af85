//! Clustered NATS and Redis, and their failovers, on real servers: a JetStream cluster
//! losing the uplink stream's leader mid-stream, a Redis Cluster losing the master of a
//! device's route, Redis behind Sentinel losing its master; and how an existing stream
//! with other settings is met. What each failover cost is printed:
//! `cargo test -p tcpc-tests --test clusters -- --nocapture`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use edge_gateway::codec::{Frame, cmd};
use serde_json::{Value, json};
use tcpc_proto::names;
use tcpc_proto::stream::{
    Comparison, StreamCheck, StreamError, StreamSettings, compare, dead_letter_stream_config,
    uplink_stream_config,
};
use tcpc_tests::clusters::{NatsCluster, RedisCluster, RedisSentinels};
use tcpc_tests::device::TpDevice;
use tcpc_tests::edge::{TestEdge, one_address_load};
use tcpc_tests::mqtt::{Received, Watcher};
use tcpc_tests::servers::{Endpoint, NatsServer, RedisServer};
use tcpc_tests::worker::WorkerProcess;
use tcpc_tests::world::{World, wait_for_partitions};
use tcpc_tests::{DEADLINE, first_seen};

/// Numbered uplinks per device.
const COUNT: u32 = 1000;

/// Every device's numbered telemetry as it arrived (duplicates included), and when.
#[derive(Default)]
struct Seen {
    by_device: HashMap<String, Vec<u64>>,
    arrivals: Vec<Instant>,
}

impl Seen {
    fn record(&mut self, message: &Received) {
        let envelope: Value = serde_json::from_slice(&message.payload).expect("a JSON envelope");
        let device = envelope["device_id"].as_str().expect("a device id").to_owned();
        let n = message.values(&device)["n"].as_u64().expect("a number");
        self.by_device.entry(device).or_default().push(n);
        self.arrivals.push(Instant::now());
    }

    /// Reads telemetry until `done`.
    async fn read_until(&mut self, watcher: &mut Watcher, done: impl Fn(&Self) -> bool) {
        while !done(self) {
            self.record(&watcher.next().await);
        }
    }

    fn distinct(&self, device: &str) -> usize {
        self.by_device.get(device).map_or(0, |seen| first_seen(seen).len())
    }

    /// The longest wait between two arrivals after `since`.
    fn longest_gap_after(&self, since: Instant) -> Duration {
        let mut last = since;
        let mut longest = Duration::ZERO;
        for &at in self.arrivals.iter().filter(|&&at| at > since) {
            longest = longest.max(at - last);
            last = at;
        }
        longest
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_server_killed_mid_stream_loses_no_uplink() {
    const DEVICES: usize = 3;
    let mut w = World::on(NatsCluster::spawn(3).await, RedisServer::spawn().await).await;
    let ids: Vec<String> = (0..DEVICES).map(|d| format!("dev-steady-{d}")).collect();
    for (d, id) in ids.iter().enumerate() {
        w.device(&format!("steady-{d}"), id, &format!("S{d:03}"), Value::Null);
    }
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/telemetry"]).await;
    let worker = w.worker("worker-a", &["--stream-replicas", "3"]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = TestEdge::spawn(&w.nats, &w.redis, "edge-a", |config| {
        one_address_load(config);
        config.stream.replicas = 3;
    })
    .await;
    let jetstream = jetstream::new(w.nats.client().await);
    let mut stream = jetstream.get_stream(names::UPLINK_STREAM).await.expect("the uplink stream");
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3, "created with three replicas");

    let mut devices = Vec::new();
    for d in 0..DEVICES {
        devices.push(TpDevice::online(edge.official, &format!("steady-{d}")).await);
    }
    for device in &mut devices {
        device.send_numbered(0..300).await;
    }
    let mut seen = Seen::default();
    seen.read_until(&mut watcher, |seen| seen.arrivals.len() >= 150).await;
    // The stream's leader dies (kill -9) while the devices keep sending: another server
    // is elected, and what the edge had not got acknowledged it publishes again.
    let cluster = stream.info().await.unwrap().cluster.clone().expect("a clustered stream");
    let leader = cluster.leader.expect("the stream has a leader");
    let victim = w.nats.index_of(&leader);
    w.nats.nodes[victim].stop();
    let killed = Instant::now();
    for device in &mut devices {
        device.send_numbered(300..COUNT).await;
    }
    seen.read_until(&mut watcher, |seen| ids.iter().all(|id| seen.distinct(id) == COUNT as usize)).await;

    let mut duplicates = 0;
    for id in &ids {
        let values = &seen.by_device[id];
        assert_eq!(
            first_seen(values),
            (0..u64::from(COUNT)).collect::<Vec<_>>(),
            "{id}: all, first seen in order"
        );
        duplicates += values.len() - COUNT as usize;
    }
    for reason in ["unacknowledged", "incomplete"] {
        assert_eq!(
            edge.metric(&format!("edge_uplinks_lost_total{{reason=\"{reason}\"}}")).await,
            0,
            "{reason}"
        );
    }
    println!(
        "stream leader {leader} killed mid-stream: {DEVICES}×{COUNT} uplinks arrived in order, {duplicates} \
         duplicates, longest pause {:?}, republished {}",
        seen.longest_gap_after(killed),
        edge.metric("edge_republished_total").await
    );
}

const D001: &str = "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10";
/// How often the platform sends a command while downlinks fail (load, not a wait).
const PACE: Duration = Duration::from_millis(200);

/// How one downlink ended, as the platform saw it.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The device got it and its answer came back.
    Delivered,
    /// Answered with a failure (`device offline`…).
    Refused(String),
    /// No answer at all (no worker took it).
    Unanswered,
}

/// A worker, an edge and a device online, on the world's NATS and Redis; the platform's
/// side of its downlinks.
struct Downlinks {
    _worker: WorkerProcess,
    _edge: TestEdge,
    device: TpDevice,
    watcher: Watcher,
    sent: u32,
}

impl Downlinks {
    async fn start<R: Endpoint>(w: &World<NatsServer, R>) -> Self {
        w.device("tp-token", D001, "D001", Value::Null);
        let mut watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
        let worker = w.worker("worker-a", &[]).await;
        wait_for_partitions(&[&worker]).await;
        let edge = w.edge().await;
        let device = TpDevice::online(edge.official, "tp-token").await;
        assert_eq!(&watcher.next_on(&format!("devices/status/{D001}")).await.payload[..], b"1");
        Downlinks { _worker: worker, _edge: edge, device, watcher, sent: 0 }
    }

    /// Sends one command and waits for its end: the device answers what it gets.
    async fn command(&mut self) -> Outcome {
        self.sent += 1;
        let id = format!("f{}", self.sent);
        let answer_topic = format!("devices/command/response/{id}");
        self.watcher.publish(&format!("plugin/TCP/devices/command/D001/{id}"), r#"{"method":"ping"}"#).await;
        // Every downlink is answered within 4 s of its arrival, or taken by no worker.
        let give_up = tokio::time::sleep(Duration::from_secs(6));
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                _ = &mut give_up => return Outcome::Unanswered,
                frame = self.device.next() => {
                    let frame = frame.expect("the device stays connected");
                    let message: Value = serde_json::from_slice(&frame.payload).expect("a JSON command");
                    let answer = json!({"message_id": message["message_id"], "result": 0});
                    self.device.send(Frame::data(cmd::COMMAND_RESPONSE, answer.to_string().into_bytes())).await;
                }
                message = self.watcher.next() => {
                    if message.topic == answer_topic {
                        let values = message.values(D001);
                        return match values["result"].as_i64() {
                            Some(0) => Outcome::Delivered,
                            _ => Outcome::Refused(values["message"].as_str().unwrap_or_default().to_owned()),
                        };
                    }
                }
            }
        }
    }

    /// A command every [`PACE`] until one is delivered (within a deadline): what the
    /// failover that began at `failed` cost the platform.
    async fn until_delivered(&mut self, failed: Instant) -> String {
        let deadline = failed + DEADLINE * 2;
        let mut pace = tokio::time::interval(PACE);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut refused, mut unanswered) = (Vec::new(), 0);
        loop {
            assert!(Instant::now() < deadline, "downlinks still failing after {:?}", DEADLINE * 2);
            pace.tick().await;
            let sent = Instant::now();
            match self.command().await {
                Outcome::Delivered => {
                    return format!(
                        "downlinks delivered again {:.1} s after the kill; before that, one command \
                         every {PACE:?}: {} answered {:?}, {unanswered} unanswered",
                        (sent - failed).as_secs_f64(),
                        refused.len(),
                        refused.first().map(String::as_str).unwrap_or("-"),
                    );
                }
                Outcome::Refused(message) => refused.push(message),
                Outcome::Unanswered => unanswered += 1,
            }
        }
    }

    /// The device's partition is consumed again: an uplink reaches the platform.
    async fn uplinks_flow(&mut self) {
        self.device.send(Frame::data(cmd::TELEMETRY, &br#"{"after":"failover"}"#[..])).await;
        let telemetry = self.watcher.next_on("devices/telemetry").await;
        assert_eq!(telemetry.values(D001), json!({"after": "failover"}));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn downlinks_come_back_after_a_redis_cluster_master_is_killed() {
    // Failed over 2 s after it stops answering (the test waits less than with Redis's
    // 15 s; the cost scales with it).
    let redis = RedisCluster::spawn(3, Duration::from_secs(2)).await;
    let mut w = World::on(NatsServer::spawn().await, redis).await;
    let mut downlinks = Downlinks::start(&w).await;
    assert_eq!(downlinks.command().await, Outcome::Delivered);
    // The master holding the device's route dies; its replica takes over its slots.
    let master = w.redis.master_of(&names::route_key(D001)).await.expect("a master");
    w.redis.kill(master);
    let failed = Instant::now();
    let cost = downlinks.until_delivered(failed).await;
    // The node the test asks may learn of the promotion (gossip) after the worker was
    // redirected to the promoted replica.
    let key = names::route_key(D001);
    tcpc_tests::wait_until("the replica to serve the route", || async {
        w.redis.master_of(&key).await.is_some_and(|now| now != master)
    })
    .await;
    assert_eq!(downlinks.command().await, Outcome::Delivered);
    downlinks.uplinks_flow().await;
    println!("Redis Cluster master killed: {cost}");
}

#[tokio::test(flavor = "multi_thread")]
async fn downlinks_come_back_after_sentinel_fails_the_master_over() {
    let mut w = World::on(NatsServer::spawn().await, RedisSentinels::spawn().await).await;
    let mut downlinks = Downlinks::start(&w).await;
    assert_eq!(downlinks.command().await, Outcome::Delivered);
    w.redis.master.kill();
    let failed = Instant::now();
    let cost = downlinks.until_delivered(failed).await;
    assert_eq!(downlinks.command().await, Outcome::Delivered);
    // Leases and membership live on the one master: the worker consumes again.
    downlinks.uplinks_flow().await;
    println!("Sentinel master killed: {cost}");
}

fn replicas(replicas: usize) -> StreamSettings {
    StreamSettings { replicas, ..StreamSettings::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_stream_with_other_settings_is_refused_or_reported() {
    let nats = NatsServer::spawn().await;
    let jetstream = jetstream::new(nats.client().await);
    // Created as the services create them, they read back as the same: no difference
    // out of the server's defaults.
    for config in [uplink_stream_config(replicas(1)), dead_letter_stream_config(1)] {
        let created = StreamCheck::new(config.clone()).ensure(&jetstream).await.expect("created");
        assert_eq!(compare(&config, &created.cached_info().config), Comparison::default(), "{}", config.name);
    }

    // A work queue deletes what one consumer acknowledged: the services cannot use it.
    jetstream.delete_stream(names::UPLINK_STREAM).await.unwrap();
    let work_queue =
        stream::Config { retention: stream::RetentionPolicy::WorkQueue, ..uplink_stream_config(replicas(1)) };
    jetstream.create_stream(work_queue).await.unwrap();
    match StreamCheck::new(uplink_stream_config(replicas(1))).ensure(&jetstream).await {
        Err(StreamError::Incompatible { differences, .. }) => {
            assert_eq!(differences.iter().map(|d| d.field).collect::<Vec<_>>(), ["retention"]);
        }
        other => panic!("refused, naming the retention: {:?}", other.map(|_| ())),
    }

    // One replica where three are asked, an hour of retention: used as it is, reported.
    jetstream.delete_stream(names::UPLINK_STREAM).await.unwrap();
    let shorter = stream::Config { max_age: Duration::from_secs(3600), ..uplink_stream_config(replicas(1)) };
    jetstream.create_stream(shorter).await.unwrap();
    let existing =
        StreamCheck::new(uplink_stream_config(replicas(3))).ensure(&jetstream).await.expect("used");
    let comparison = compare(&uplink_stream_config(replicas(3)), &existing.cached_info().config);
    assert!(comparison.fatal.is_empty());
    let fields: Vec<_> = comparison.other.iter().map(|d| d.field).collect();
    assert_eq!(fields, ["num_replicas", "max_age"]);
}

/// The lease generation of each partition's consumer (`tcpc-p<p>-g<generation>`).
async fn consumer_generations(jetstream: &jetstream::Context) -> HashMap<u32, Vec<u64>> {
    let mut generations: HashMap<u32, Vec<u64>> = HashMap::new();
    let Ok(stream) = jetstream.get_stream(names::UPLINK_STREAM).await else { return generations };
    let mut consumers = stream.consumer_names();
    while let Some(Ok(name)) = futures::StreamExt::next(&mut consumers).await {
        let parsed = name.strip_prefix("tcpc-p").and_then(|rest| rest.split_once("-g"));
        if let Some((Ok(partition), Ok(generation))) = parsed.map(|(p, g)| (p.parse(), g.parse())) {
            generations.entry(partition).or_default().push(generation);
        }
    }
    generations
}

/// Waits until each partition has one consumer; their generations.
async fn one_consumer_each(jetstream: &jetstream::Context) -> HashMap<u32, Vec<u64>> {
    tcpc_tests::wait_until("one consumer for each partition", || async {
        let generations = consumer_generations(jetstream).await;
        generations.len() == names::DEFAULT_PARTITIONS as usize
            && generations.values().all(|each| each.len() == 1)
    })
    .await;
    consumer_generations(jetstream).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_master_killed_costs_only_the_partitions_it_served() {
    // Failed over after longer than a lease lives without renewal: the leases of the
    // dead master's partitions lapse; the others must be renewed throughout.
    let redis = RedisCluster::spawn(3, Duration::from_secs(8)).await;
    let mut w = World::on(NatsServer::spawn().await, redis).await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let jetstream = jetstream::new(w.nats.client().await);
    let before = one_consumer_each(&jetstream).await;
    // A master that holds leases but not the workers' membership (which, lost, holds
    // up every renewal).
    let membership = w.redis.master_of(names::WORKERS_KEY).await.expect("a master");
    let mut served: HashMap<usize, Vec<u32>> = HashMap::new();
    for partition in 0..names::DEFAULT_PARTITIONS {
        let master = w.redis.master_of(&names::partition_lease_key(partition)).await.expect("a master");
        served.entry(master).or_default().push(partition);
    }
    let (victim, lapsed) =
        served.into_iter().find(|(master, _)| *master != membership).expect("another master");
    w.redis.kill(victim);
    let key = names::partition_lease_key(lapsed[0]);
    tcpc_tests::wait_until("the replica to serve the dead master's slots", || async {
        w.redis.master_of(&key).await.is_some_and(|master| master != victim)
    })
    .await;
    let rounds = worker.metric("worker_lease_rounds_total").await;
    tcpc_tests::wait_until("two lease rounds after the failover", || async {
        worker.metric("worker_lease_rounds_total").await >= rounds + 2.0
    })
    .await;
    // The partitions of the other masters kept their consumers throughout; those of the
    // dead one are consumed again (under a newer generation if their lease lapsed).
    let after = one_consumer_each(&jetstream).await;
    for partition in 0..names::DEFAULT_PARTITIONS {
        if lapsed.contains(&partition) {
            assert!(after[&partition][0] >= before[&partition][0], "partition {partition}");
        } else {
            assert_eq!(after[&partition], before[&partition], "partition {partition} untouched");
        }
    }
    assert_eq!(worker.metric("worker_partitions_lost_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_generation_lost_in_a_failover_is_never_handed_out_again() {
    let w = World::start().await;
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let jetstream = jetstream::new(w.nats.client().await);
    let partitions = names::DEFAULT_PARTITIONS;
    let before = one_consumer_each(&jetstream).await;
    // A failover to a replica that had not got the takes: the leases and generations
    // are gone (here deleted), while the worker goes on as their holder.
    let mut keys: Vec<String> = (0..partitions).map(names::partition_lease_key).collect();
    keys.extend((0..partitions).map(names::partition_generation_key));
    let () = redis::AsyncCommands::del(&mut w.redis.connection().await, keys).await.unwrap();
    // Each lease is taken again under a generation never used before: the worker
    // restarts its consumers under it (the same number would be counted as its own).
    tcpc_tests::wait_until("every partition under a newer generation, its old consumer gone", || async {
        let now = consumer_generations(&jetstream).await;
        (0..partitions).all(|p| match (now.get(&p).map(Vec::as_slice), before.get(&p).map(Vec::as_slice)) {
            (Some([now]), Some([before])) => now > before,
            _ => false,
        })
    })
    .await;
}
