//! The simulated devices of one process: connected at the connect rate from the source
//! addresses, authenticated, then (once told) sending stamped uplinks at their pace,
//! while receiving downlinks, timing them and answering commands as a device does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use edge_gateway::codec::{Frame, FrameType, TpCodec, cmd};
use futures::StreamExt;
use rumqttc::{ConnectReturnCode, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::args::{Args, Pattern, Protocol, Rate, Traffic, Uplinks};
use crate::histogram::Latency;
use crate::seen::{Arrival, Seen};
use crate::stamp::{Stamp, now_us};

/// How long a device waits for its connection and the edge's answer to its token.
const AUTH_WAIT: Duration = Duration::from_secs(30);
/// The largest frame or line a device reads (a downlink is far smaller).
const MAX_INBOUND: usize = 1 << 20;
/// QoS 1 publishes an MQTT device has unacknowledged at most: rumqttc's default, the
/// usual client's window (the edge's is one message per device, see README Ordering).
const MQTT_IN_FLIGHT: u16 = 100;

/// The devices of this process and how they behave.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    pub run: Arc<str>,
    pub protocol: Protocol,
    pub edges: Vec<SocketAddr>,
    pub sources: Vec<IpAddr>,
    pub token: Pattern,
    /// The device ids MQTT devices put in their envelopes (else their tokens).
    pub device_id: Option<Pattern>,
    pub first: u64,
    pub count: u64,
    pub connect_rate: f64,
    /// This process's uplinks (its share of the rate).
    pub uplink: Option<Uplinks>,
    pub duration: Duration,
    pub heartbeat: Duration,
}

impl DevicePlan {
    pub fn new(args: &Args, traffic: &Traffic, edges: Vec<SocketAddr>, run: &str) -> Self {
        DevicePlan {
            run: run.into(),
            protocol: args.protocol,
            edges,
            sources: args.source.clone().map(|s| s.0).unwrap_or_default(),
            token: args.token.clone(),
            device_id: args.device_id.clone(),
            first: args.first,
            count: args.devices,
            connect_rate: args.connect_rate,
            uplink: traffic.uplink,
            duration: traffic.duration,
            heartbeat: args.heartbeat,
        }
    }
}

/// Where the devices are in the run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Connecting,
    /// Traffic began at this instant.
    Traffic(Instant),
    /// Stop sending; keep the connections (downlinks and uplinks still on their way).
    Drain,
    /// Close the connections.
    Stop,
}

/// What the run tells its devices, in this process or a shard's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Start sending.
    Start,
    /// Stop sending and keep the connections (what is on its way still arrives).
    Drain,
}

/// Counters of a process's devices, summed across processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Devices whose connection attempt ended, either way.
    pub settled: u64,
    pub authenticated: u64,
    /// Connected now.
    pub connected: u64,
    /// Uplinks sent.
    pub sent: u64,
    /// Devices that will send no more uplinks (done, disconnected or never connected).
    pub finished: u64,
    /// Distinct downlinks received.
    pub downlinks: u64,
    pub errors: u64,
}

impl std::ops::AddAssign for Progress {
    fn add_assign(&mut self, other: Progress) {
        self.settled += other.settled;
        self.authenticated += other.authenticated;
        self.connected += other.connected;
        self.sent += other.sent;
        self.finished += other.finished;
        self.downlinks += other.downlinks;
        self.errors += other.errors;
    }
}

/// What a process's devices did, for the run's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShardReport {
    /// At the end, before the connections closed.
    pub progress: Progress,
    /// Connect to the edge's answer, per device.
    pub connect_latency: Latency,
    /// From the first connection attempt to the last device authenticated.
    pub all_connected_us: u64,
    /// Uplinks sent, per device in index order.
    pub sent: Vec<u64>,
    /// Distinct downlinks received, per device in index order.
    pub downlinks_seen: Vec<u64>,
    pub downlink_duplicates: u64,
    pub downlink_out_of_order: u64,
    /// Downlinks stamped for another device than the one that got them.
    pub downlinks_misdelivered: u64,
    pub downlink_latency: Latency,
    /// Wall-clock microseconds of the last downlink received.
    pub last_downlink_us: u64,
    /// What went wrong, and how often.
    pub errors: BTreeMap<String, u64>,
}

impl ShardReport {
    /// Adds the report of the next shard (the next devices in index order).
    pub fn merge(&mut self, other: ShardReport) {
        self.progress += other.progress;
        self.connect_latency.merge(&other.connect_latency);
        self.all_connected_us = self.all_connected_us.max(other.all_connected_us);
        self.sent.extend(other.sent);
        self.downlinks_seen.extend(other.downlinks_seen);
        self.downlink_duplicates += other.downlink_duplicates;
        self.downlink_out_of_order += other.downlink_out_of_order;
        self.downlinks_misdelivered += other.downlinks_misdelivered;
        self.downlink_latency.merge(&other.downlink_latency);
        self.last_downlink_us = self.last_downlink_us.max(other.last_downlink_us);
        for (error, count) in other.errors {
            *self.errors.entry(error).or_default() += count;
        }
    }
}

/// State shared by the devices of this process.
struct Shared {
    plan: DevicePlan,
    /// When connecting began.
    began: Instant,
    settled: AtomicU64,
    authenticated: AtomicU64,
    connected: AtomicU64,
    sent: AtomicU64,
    finished: AtomicU64,
    downlinks: AtomicU64,
    downlinks_misdelivered: AtomicU64,
    errors: AtomicU64,
    all_connected_us: AtomicU64,
    last_downlink_us: AtomicU64,
    connect_latency: Mutex<Latency>,
    downlink_latency: Mutex<Latency>,
    error_counts: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.error_counts.lock().unwrap_or_else(|e| e.into_inner()).entry(what).or_default() += 1;
    }

    fn progress(&self) -> Progress {
        // Finished first: a device counts its last uplink before it counts itself
        // finished (Release), so every device finished here has its uplinks in `sent`.
        let finished = self.finished.load(Ordering::Acquire);
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Progress {
            settled: get(&self.settled),
            authenticated: get(&self.authenticated),
            connected: get(&self.connected),
            sent: get(&self.sent),
            finished,
            downlinks: get(&self.downlinks),
            errors: get(&self.errors),
        }
    }
}

/// The devices of this process.
pub struct Fleet {
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    connector: JoinHandle<Vec<JoinHandle<DeviceEnd>>>,
}

impl Fleet {
    /// Starts connecting the devices at the plan's rate.
    pub fn start(plan: DevicePlan) -> Fleet {
        raise_open_files(plan.count);
        let shared = Arc::new(Shared {
            plan,
            began: Instant::now(),
            settled: AtomicU64::new(0),
            authenticated: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            downlinks: AtomicU64::new(0),
            downlinks_misdelivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            all_connected_us: AtomicU64::new(0),
            last_downlink_us: AtomicU64::new(0),
            connect_latency: Mutex::default(),
            downlink_latency: Mutex::default(),
            error_counts: Mutex::default(),
        });
        let (phase, watching) = watch::channel(Phase::Connecting);
        let connector = tokio::spawn(connect_all(shared.clone(), watching));
        Fleet { shared, phase, connector }
    }

    pub fn progress(&self) -> Progress {
        self.shared.progress()
    }

    /// Moves the devices on in the run.
    pub fn order(&self, order: Order) {
        match order {
            Order::Start => {
                self.phase.send_replace(Phase::Traffic(Instant::now()));
            }
            Order::Drain => {
                self.phase.send_if_modified(|phase| {
                    let changed = !matches!(phase, Phase::Drain | Phase::Stop);
                    if changed {
                        *phase = Phase::Drain;
                    }
                    changed
                });
            }
        }
    }

    /// Closes every connection; what the devices did.
    pub async fn stop(self) -> ShardReport {
        let progress = self.shared.progress();
        self.phase.send_replace(Phase::Stop);
        // The connector stops spawning on Stop; a device in a panic is a bug reported
        // as missing counts, not a crash of the run.
        let devices = self.connector.await.unwrap_or_default();
        let count = self.shared.plan.count as usize;
        let (mut sent, mut downlinks_seen) = (vec![0; count], vec![0; count]);
        let (mut duplicates, mut out_of_order) = (0, 0);
        for device in devices {
            let Ok(end) = device.await else { continue };
            sent[end.local] = end.sent;
            downlinks_seen[end.local] = end.downlinks.unique;
            duplicates += end.downlinks.duplicates;
            out_of_order += end.downlinks.out_of_order;
        }
        let shared = &self.shared;
        let take = |latency: &Mutex<Latency>| {
            std::mem::take(&mut *latency.lock().unwrap_or_else(|e| e.into_inner()))
        };
        ShardReport {
            progress,
            connect_latency: take(&shared.connect_latency),
            all_connected_us: shared.all_connected_us.load(Ordering::Relaxed),
            sent,
            downlinks_seen,
            downlink_duplicates: duplicates,
            downlink_out_of_order: out_of_order,
            downlinks_misdelivered: shared.downlinks_misdelivered.load(Ordering::Relaxed),
            downlink_latency: take(&shared.downlink_latency),
            last_downlink_us: shared.last_downlink_us.load(Ordering::Relaxed),
            errors: std::mem::take(&mut *shared.error_counts.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// One process may hold as many devices as its open-files limit: the soft limit is
/// raised as far as the hard one allows, and a shortfall said at once.
fn raise_open_files(devices: u64) {
    // The broker connection, stdio, the runtime's own descriptors.
    let wanted = devices + 64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => eprintln!(
            "tcpc-load: {devices} devices need {wanted} open files, the limit is {limit}: \
             connections past it will fail (use --processes)"
        ),
        Ok(_) => {}
        Err(error) => eprintln!("tcpc-load: the open files limit could not be raised: {error}"),
    }
}

/// Spawns the devices at the connect rate, until all are or the run stops.
async fn connect_all(shared: Arc<Shared>, phase: watch::Receiver<Phase>) -> Vec<JoinHandle<DeviceEnd>> {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / shared.plan.connect_rate));
    let mut devices = Vec::with_capacity(shared.plan.count as usize);
    for local in 0..shared.plan.count as usize {
        ticks.tick().await;
        if matches!(*phase.borrow(), Phase::Drain | Phase::Stop) {
            break;
        }
        devices.push(tokio::spawn(device(shared.clone(), local, phase.clone())));
    }
    devices
}

/// What one device did.
struct DeviceEnd {
    local: usize,
    sent: u64,
    downlinks: Seen,
}

/// One device's whole life.
async fn device(shared: Arc<Shared>, local: usize, mut phase: watch::Receiver<Phase>) -> DeviceEnd {
    let index = shared.plan.first + local as u64;
    let mut end = DeviceEnd { local, sent: 0, downlinks: Seen::default() };
    let attempt = Instant::now();
    let connected = tokio::select! {
        connected = tokio::time::timeout(AUTH_WAIT, connect(&shared.plan, index)) => {
            connected.unwrap_or_else(|_| Err(format!("no auth answer within {}s", AUTH_WAIT.as_secs())))
        }
        _ = phase.wait_for(|phase| *phase == Phase::Stop) => Err("stopped while connecting".to_owned()),
    };
    shared.settled.fetch_add(1, Ordering::Relaxed);
    let link = match connected {
        Ok(link) => link,
        Err(error) => {
            shared.error(error);
            shared.finished.fetch_add(1, Ordering::Release);
            return end;
        }
    };
    shared
        .connect_latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(attempt.elapsed().as_micros() as u64);
    shared.all_connected_us.fetch_max(shared.began.elapsed().as_micros() as u64, Ordering::Relaxed);
    shared.authenticated.fetch_add(1, Ordering::Relaxed);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut session = Session { shared: &shared, index, link, sender: None, sending: true, end: &mut end };
    let lost = session.run(&mut phase).await;
    session.finish_sending();
    match lost {
        Some(Lost::Closed(reason)) => {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            shared.error(reason);
        }
        // Only now does a custom device learn that it was never authenticated.
        Some(Lost::Refused(reason)) => {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            shared.authenticated.fetch_sub(1, Ordering::Relaxed);
            shared.error(format!("auth refused: {reason}"));
        }
        None => {}
    }
    end
}

/// Waits until `deadline`; at once when it has passed (as fast as possible, every
/// message is due now: no timer for each).
async fn at(deadline: Instant) {
    if deadline > Instant::now() {
        tokio::time::sleep_until(deadline).await;
    }
}

/// How a device's connection was lost.
enum Lost {
    Closed(String),
    Refused(String),
}

/// A device's connection.
struct Link {
    inbound: Inbound,
    writer: OwnedWriteHalf,
    /// Bytes queued for the edge.
    out: BytesMut,
    /// MQTT: publishes not yet acknowledged.
    unacked: u16,
}

impl Link {
    fn new(inbound: Inbound, writer: OwnedWriteHalf) -> Link {
        Link { inbound, writer, out: BytesMut::new(), unacked: 0 }
    }
}

enum Inbound {
    Tp(FramedRead<OwnedReadHalf, TpCodec>),
    Custom(FramedRead<OwnedReadHalf, LinesCodec>),
    Mqtt(FramedRead<OwnedReadHalf, rumqttc::Codec>),
}

/// What the edge sent.
enum Incoming {
    /// A downlink's payload, and the TP CMD it came with (custom: none).
    Downlink(Bytes, Option<u8>),
    /// The edge is closing the connection, for this reason.
    Closing(String),
    /// A custom device's token was refused (the line before the close).
    Refused(String),
    /// The broker acknowledged an MQTT device's publish.
    Acked,
    Nothing,
}

impl Inbound {
    /// The next message; None when the connection closed.
    async fn next(&mut self) -> Option<Result<Incoming, String>> {
        match self {
            Inbound::Tp(frames) => Some(match frames.next().await? {
                Ok(frame) => Ok(tp_incoming(frame)),
                Err(error) => Err(error.to_string()),
            }),
            Inbound::Custom(lines) => Some(match lines.next().await? {
                Ok(line) => Ok(custom_incoming(line)),
                Err(error) => Err(error.to_string()),
            }),
            Inbound::Mqtt(packets) => Some(match packets.next().await? {
                Ok(Packet::PubAck(_)) => Ok(Incoming::Acked),
                Ok(_) => Ok(Incoming::Nothing),
                Err(error) => Err(error.to_string()),
            }),
        }
    }
}

fn tp_incoming(frame: Frame) -> Incoming {
    match (frame.frame_type, frame.cmd) {
        (FrameType::Data, cmd::TELEMETRY_CONTROL..=cmd::ATTRIBUTE_GET) => {
            Incoming::Downlink(frame.payload, Some(frame.cmd))
        }
        // Before authentication the reason comes as the auth answer, after it as 0xFF.
        (FrameType::Data, cmd::ERROR | cmd::AUTH) => {
            Incoming::Closing(format!("closed by the edge: {}", refusal(&frame.payload)))
        }
        _ => Incoming::Nothing,
    }
}

/// A custom device reads nothing from the edge but the refusal line, or the downlinks
/// published for it (JSON lines, passed as they are without a downlink script).
fn custom_incoming(line: String) -> Incoming {
    #[derive(Deserialize)]
    struct Answer {
        result: i64,
    }
    match serde_json::from_str::<Answer>(&line) {
        Ok(answer) if answer.result != 0 => Incoming::Refused(refusal(line.as_bytes())),
        _ => Incoming::Downlink(line.into(), None),
    }
}

/// The message of an answer `{"result":1,"message":"…"}`.
fn refusal(payload: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Refusal {
        message: String,
    }
    serde_json::from_slice::<Refusal>(payload)
        .map_or_else(|_| String::from_utf8_lossy(payload).into_owned(), |r| r.message)
}

/// Connects device `index` and authenticates it.
async fn connect(plan: &DevicePlan, index: u64) -> Result<Link, String> {
    let edge = plan.edges[(index % plan.edges.len() as u64) as usize];
    let socket = if edge.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| format!("socket: {e}"))?;
    if !plan.sources.is_empty() {
        let source = plan.sources[(index % plan.sources.len() as u64) as usize];
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = socket.connect(edge).await.map_err(|e| format!("connect: {e}"))?;
    // Each message is timed from its write: none may wait for a delayed ACK.
    stream.set_nodelay(true).map_err(|e| format!("socket: {e}"))?;
    let (read, mut writer) = stream.into_split();
    let token = plan.token.at(index);
    match plan.protocol {
        Protocol::Tp => {
            writer
                .write_all(&Frame::data(cmd::AUTH, token).to_bytes())
                .await
                .map_err(|e| format!("send the token: {e}"))?;
            let mut frames = FramedRead::with_capacity(read, TpCodec::new(MAX_INBOUND), 256);
            let answer = frames
                .next()
                .await
                .ok_or("closed before the auth answer")?
                .map_err(|e| format!("auth answer: {e}"))?;
            if &answer.payload[..] != br#"{"result":0}"# {
                return Err(format!("auth refused: {}", refusal(&answer.payload)));
            }
            Ok(Link::new(Inbound::Tp(frames), writer))
        }
        // The custom protocol answers nothing on success: a refusal arrives later as a
        // line, then the close (counted then).
        Protocol::Custom => {
            writer
                .write_all(format!("{token}\n").as_bytes())
                .await
                .map_err(|e| format!("send the token: {e}"))?;
            let lines = FramedRead::with_capacity(read, LinesCodec::new_with_max_length(MAX_INBOUND), 256);
            Ok(Link::new(Inbound::Custom(lines), writer))
        }
        Protocol::Mqtt => {
            let mut connect = rumqttc::Connect::new(format!("tcpc-load-{}-{index}", plan.run));
            connect.set_login(token, "");
            // The broker closes a client silent for 1.5 keep-alives; the device pings
            // after a heartbeat of silence.
            connect.keep_alive = u16::try_from(plan.heartbeat.as_secs() * 2).unwrap_or(u16::MAX).max(1);
            let mut packet = BytesMut::new();
            connect.write(&mut packet).map_err(|e| format!("CONNECT: {e}"))?;
            writer.write_all(&packet).await.map_err(|e| format!("send CONNECT: {e}"))?;
            let codec = rumqttc::Codec { max_incoming_size: MAX_INBOUND, max_outgoing_size: MAX_INBOUND };
            let mut packets = FramedRead::with_capacity(read, codec, 256);
            match packets.next().await {
                Some(Ok(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                    Ok(Link::new(Inbound::Mqtt(packets), writer))
                }
                Some(Ok(Packet::ConnAck(ack))) => Err(format!("auth refused: {:?}", ack.code)),
                Some(Ok(other)) => Err(format!("auth answer: {other:?} before CONNACK")),
                Some(Err(error)) => Err(format!("auth answer: {error}")),
                None => Err("closed before the auth answer".to_owned()),
            }
        }
    }
}

/// When a device sends its next uplink.
struct Sender {
    next: Instant,
    /// None: as fast as the edge takes them.
    every: Option<Duration>,
    until: Instant,
    limit: Option<u64>,
}

impl Sender {
    /// Device `local` of `count` paces its messages so that the devices together send
    /// at the rate, spread evenly over each period.
    fn new(uplinks: &Uplinks, start: Instant, until: Instant, local: usize, count: u64) -> Sender {
        let every = match uplinks.rate {
            Rate::PerSecond(rate) => Some(Duration::from_secs_f64(count as f64 / rate)),
            Rate::Max => None,
        };
        let offset = every.map_or(Duration::ZERO, |every| every.mul_f64(local as f64 / count as f64));
        Sender { next: start + offset, every, until, limit: uplinks.per_device }
    }
}

/// An authenticated device's loop.
struct Session<'a> {
    shared: &'a Shared,
    index: u64,
    link: Link,
    sender: Option<Sender>,
    /// Whether it may still send uplinks (not yet counted as finished).
    sending: bool,
    end: &'a mut DeviceEnd,
}

impl Session<'_> {
    /// Runs until the run stops (None) or the connection is lost (how).
    async fn run(&mut self, phase: &mut watch::Receiver<Phase>) -> Option<Lost> {
        let heartbeat = self.shared.plan.heartbeat;
        let mut next_heartbeat = Instant::now() + heartbeat;
        let mut closing: Option<Lost> = None;
        let current = *phase.borrow_and_update();
        if self.apply(current) {
            return None;
        }
        loop {
            let send_at = self.sender.as_ref().map(|s| s.next);
            // Paced messages queue behind a slow socket (their stamps count the wait);
            // as-fast-as-possible ones are made when the socket took the last one (and
            // an MQTT device's window has room).
            let may_send = self.sender.as_ref().is_some_and(|sender| {
                sender.every.is_some() || (self.link.out.is_empty() && self.link.unacked < MQTT_IN_FLIGHT)
            });
            tokio::select! {
                // Every branch is cancel-safe: a `watch` change stays pending, a framed
                // read keeps its buffer, a write that lost the race wrote nothing.
                changed = phase.changed() => {
                    let next = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Stop };
                    if self.apply(next) {
                        return None;
                    }
                }
                incoming = self.link.inbound.next() => match incoming {
                    Some(Ok(Incoming::Downlink(payload, tp_cmd))) => self.downlink(&payload, tp_cmd),
                    Some(Ok(Incoming::Closing(reason))) => closing = Some(Lost::Closed(reason)),
                    Some(Ok(Incoming::Refused(reason))) => closing = Some(Lost::Refused(reason)),
                    Some(Ok(Incoming::Acked)) => self.link.unacked = self.link.unacked.saturating_sub(1),
                    Some(Ok(Incoming::Nothing)) => {}
                    // The edge's reason, when it gave one before the socket failed.
                    Some(Err(error)) => return Some(closing.unwrap_or(Lost::Closed(format!("closed: {error}")))),
                    None => return Some(closing.unwrap_or_else(|| Lost::Closed("closed by the edge".to_owned()))),
                },
                written = self.link.writer.write(&self.link.out), if !self.link.out.is_empty() => match written {
                    Ok(n) => self.link.out.advance(n),
                    Err(error) => return Some(closing.unwrap_or(Lost::Closed(format!("closed: {error}")))),
                },
                () = at(send_at.unwrap_or(next_heartbeat)), if may_send => {
                    self.send_next();
                    next_heartbeat = Instant::now() + heartbeat;
                }
                () = tokio::time::sleep_until(next_heartbeat), if self.shared.plan.protocol != Protocol::Custom => {
                    match self.shared.plan.protocol {
                        // Writing a PINGREQ cannot fail.
                        Protocol::Mqtt => {
                            let _ = rumqttc::PingReq.write(&mut self.link.out);
                        }
                        _ => self.link.out.extend_from_slice(&Frame::heartbeat(0).to_bytes()),
                    }
                    next_heartbeat = Instant::now() + heartbeat;
                }
            }
        }
    }

    /// Follows the run's phase; true when the device is to close.
    fn apply(&mut self, phase: Phase) -> bool {
        match phase {
            Phase::Connecting => false,
            Phase::Traffic(start) => {
                let plan = &self.shared.plan;
                match (&plan.uplink, &self.sender) {
                    (Some(uplinks), None) if self.sending => {
                        let local = (self.index - plan.first) as usize;
                        let until = start + plan.duration;
                        self.sender = Some(Sender::new(uplinks, start, until, local, plan.count));
                    }
                    (None, _) => self.finish_sending(),
                    _ => {}
                }
                false
            }
            Phase::Drain => {
                self.finish_sending();
                false
            }
            Phase::Stop => true,
        }
    }

    fn finish_sending(&mut self) {
        self.sender = None;
        if std::mem::replace(&mut self.sending, false) {
            self.shared.finished.fetch_add(1, Ordering::Release);
        }
    }

    /// Queues the next uplink, or ends the sending when its count or time is up.
    fn send_next(&mut self) {
        let now = Instant::now();
        let Some(sender) = &self.sender else { return };
        if now >= sender.until || sender.limit.is_some_and(|limit| self.end.sent >= limit) {
            self.finish_sending();
            return;
        }
        let plan = &self.shared.plan;
        let size = plan.uplink.map_or(0, |u| u.size);
        let stamp = Stamp { device: self.index, seq: self.end.sent, sent_us: now_us() };
        let json = stamp.to_json(&plan.run, size);
        match plan.protocol {
            Protocol::Tp => self.link.out.extend_from_slice(&Frame::data(cmd::TELEMETRY, json).to_bytes()),
            Protocol::Custom => {
                self.link.out.extend_from_slice(json.as_bytes());
                self.link.out.extend_from_slice(b"\n");
            }
            Protocol::Mqtt => {
                let id = plan.device_id.as_ref().unwrap_or(&plan.token).at(self.index);
                let values = base64::engine::general_purpose::STANDARD.encode(json);
                let envelope = serde_json::json!({"device_id": id, "values": values}).to_string();
                let mut publish = rumqttc::Publish::new(crate::uplink::TOPIC, QoS::AtLeastOnce, envelope);
                // Packet ids 1..=65535 in turn: far more than the window holds.
                publish.pkid = (self.end.sent % u64::from(u16::MAX)) as u16 + 1;
                // Fails only for a packet id of 0 or a payload past 256 MiB.
                publish.write(&mut self.link.out).expect("a publish within the protocol's limits");
                self.link.unacked = self.link.unacked.saturating_add(1);
            }
        }
        self.end.sent += 1;
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        let Some(sender) = &mut self.sender else { return };
        sender.next = match sender.every {
            // On the device's schedule, not from now: a late message does not delay the next.
            Some(every) => sender.next + every,
            None => now,
        };
        if sender.limit.is_some_and(|limit| self.end.sent >= limit) {
            self.finish_sending();
        }
    }

    /// Times a downlink, and answers a command as a TP device does.
    fn downlink(&mut self, payload: &[u8], tp_cmd: Option<u8>) {
        let shared = self.shared;
        let Some(stamp) = Stamp::read_command(&shared.plan.run, payload) else { return };
        if stamp.device != self.index {
            shared.downlinks_misdelivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = now_us();
        if matches!(self.end.downlinks.record(stamp.seq), Arrival::New | Arrival::OutOfOrder) {
            shared.downlinks.fetch_add(1, Ordering::Relaxed);
            shared.last_downlink_us.fetch_max(now, Ordering::Relaxed);
            let latency = now.saturating_sub(stamp.sent_us);
            shared.downlink_latency.lock().unwrap_or_else(|e| e.into_inner()).record(latency);
        }
        if tp_cmd == Some(cmd::COMMAND) {
            #[derive(Deserialize)]
            struct Id<'a> {
                message_id: &'a str,
            }
            if let Ok(Id { message_id }) = serde_json::from_slice::<Id>(payload) {
                let answer = serde_json::json!({"message_id": message_id, "result": 0}).to_string();
                self.link.out.extend_from_slice(&Frame::data(cmd::COMMAND_RESPONSE, answer).to_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_devices_spread_over_the_period() {
        let uplinks = Uplinks { rate: Rate::PerSecond(100.0), per_device: None, size: 0 };
        let start = Instant::now();
        let until = start + Duration::from_secs(1);
        // 10 devices at 100/s in total: each every 100 ms, device 5 half-way through.
        let sender = Sender::new(&uplinks, start, until, 5, 10);
        assert_eq!(sender.every, Some(Duration::from_millis(100)));
        assert_eq!(sender.next - start, Duration::from_millis(50));
        let fastest = Sender::new(&Uplinks { rate: Rate::Max, ..uplinks }, start, until, 5, 10);
        assert_eq!((fastest.every, fastest.next), (None, start));
    }

    #[test]
    fn the_edges_answers_are_read_as_a_device_would() {
        let closing = tp_incoming(Frame::data(cmd::ERROR, &br#"{"result":1,"message":"idle timeout"}"#[..]));
        assert!(matches!(closing, Incoming::Closing(reason) if reason == "closed by the edge: idle timeout"));
        assert!(matches!(
            tp_incoming(Frame::data(cmd::COMMAND, &b"{}"[..])),
            Incoming::Downlink(_, Some(cmd::COMMAND))
        ));
        assert!(matches!(tp_incoming(Frame::heartbeat(0)), Incoming::Nothing));
        let refused = custom_incoming(r#"{"result":1,"message":"unknown access token"}"#.to_owned());
        assert!(matches!(refused, Incoming::Refused(reason) if reason == "unknown access token"));
        assert!(matches!(custom_incoming(r#"{"params":{}}"#.to_owned()), Incoming::Downlink(_, None)));
    }
}
