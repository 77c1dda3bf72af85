//! A run: connect every device, run the traffic, wait for what is on its way, report.
//! A progress line goes to stderr every second. The first SIGINT or SIGTERM ends the
//! connecting or the traffic (the drain and the report follow), a second one the drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::{Args, Traffic};
use crate::broker::{Broker, BrokerSettings};
use crate::devices::{DevicePlan, Fleet, Order, Progress, ShardReport};
use crate::downlink::{self, Answers};
use crate::error::Error;
use crate::report::{Parts, Report};
use crate::shard::Children;
use crate::stamp::now_us;
use crate::uplink::{self, Tally};

/// How often the run looks at its devices' counters.
const TICK: Duration = Duration::from_millis(20);

/// Runs the load the arguments describe, shard processes being this very program.
///
/// # Errors
/// See [`run_with_program`].
pub async fn run(args: Args) -> Result<Report, Error> {
    let program = std::env::current_exe().map_err(|source| Error::Spawn { index: 0, source })?;
    run_with_program(args, &program).await
}

/// Runs the load the arguments describe; with `--processes` above one, the shard
/// processes run `program` (`tcpc-load` itself, or a test's copy of it).
///
/// # Errors
/// Bad settings, an edge name that does not resolve, the broker refusing the connection
/// or a subscription, a shard process that failed.
pub async fn run_with_program(args: Args, program: &Path) -> Result<Report, Error> {
    let traffic = args.traffic().map_err(Error::Settings)?;
    let edges = edges(&args).await?;
    let run: Arc<str> =
        args.run_id.clone().unwrap_or_else(|| format!("{:08x}", rand::random::<u32>())).into();
    let broker = match &args.mqtt_url {
        Some(url) if traffic.uplink.is_some() || traffic.downlink.is_some() => {
            Some(connect_broker(&args, &traffic, url, &run).await?)
        }
        _ => None,
    };
    let received = broker.as_ref().map(|(_, received)| received.clone());
    let mut fleet = if args.processes > 1 {
        Shards::Processes(Children::spawn(program, &args, &traffic, &run)?)
    } else {
        Shards::Local(Fleet::start(DevicePlan::new(&args, &traffic, edges, &run)))
    };
    let signals = Signals::watch();
    let mut line = ProgressLine::new(args.devices, received.clone());

    // Connecting.
    while signals.count() == 0 {
        let progress = fleet.progress()?;
        line.show(&progress, None);
        if progress.settled == args.devices {
            break;
        }
        tokio::time::sleep(TICK).await;
    }

    // Traffic.
    let start = Instant::now();
    let traffic_start_us = now_us();
    fleet.order(Order::Start).await?;
    let published = Arc::new(AtomicU64::new(0));
    let stop_publishing = CancellationToken::new();
    let publisher = match (&traffic.downlink, &broker) {
        (Some(downlinks), Some((broker, _))) => {
            let plan = downlink::Plan {
                run: run.clone(),
                topic_prefix: args.topic_prefix.clone(),
                number: args.number.clone(),
                first: args.first,
                count: args.devices,
                rate: downlinks.rate,
                per_device: downlinks.per_device,
            };
            let client = broker.client.clone();
            let (stop, published) = (stop_publishing.clone(), published.clone());
            Some(tokio::spawn(downlink::publish(
                client,
                plan,
                start,
                start + traffic.duration,
                stop,
                published,
            )))
        }
        _ => None,
    };
    // Counted traffic ends when every count is done; the rest at the duration.
    let counted = !args.idle
        && traffic.uplink.is_none_or(|u| u.per_device.is_some())
        && traffic.downlink.is_none_or(|d| d.per_device.is_some());
    while signals.count() == 0 && start.elapsed() < traffic.duration {
        let progress = fleet.progress()?;
        line.show(&progress, Some(published.load(Ordering::Relaxed)));
        let publishing = publisher.as_ref().is_some_and(|task| !task.is_finished());
        if counted && progress.finished == args.devices && !publishing {
            break;
        }
        tokio::time::sleep(TICK).await;
    }
    fleet.order(Order::Drain).await?;
    stop_publishing.cancel();
    let published = match publisher {
        Some(task) => Some(task.await.expect("the publisher does not panic")?),
        None => None,
    };
    let traffic_seconds = start.elapsed().as_secs_f64();

    // Drain: what was sent and is still on its way.
    let drained_by = Instant::now() + args.drain;
    while signals.count() < 2 && Instant::now() < drained_by {
        let progress = fleet.progress()?;
        line.show(&progress, published);
        let uplinks_in =
            received.as_ref().is_none_or(|received| received.load(Ordering::Relaxed) >= progress.sent)
                || traffic.uplink.is_none();
        let downlinks_in = published.is_none_or(|published| progress.downlinks >= published);
        if progress.finished == args.devices && uplinks_in && downlinks_in {
            break;
        }
        tokio::time::sleep(TICK).await;
    }

    let devices = fleet.stop().await?;
    let heard = match broker {
        Some((broker, _)) => Some(broker.stop().await),
        None => None,
    };
    Ok(Report::assemble(Parts {
        run: &run,
        protocol: args.protocol,
        first: args.first,
        processes: args.processes,
        traffic_seconds,
        traffic_start_us,
        devices,
        heard,
        uplinks: traffic.uplink.is_some(),
        published,
    }))
}

/// The device ports, resolved.
///
/// # Errors
/// A name that does not resolve.
pub(crate) async fn edges(args: &Args) -> Result<Vec<SocketAddr>, Error> {
    args.edges().await.map_err(|(name, source)| Error::Resolve { name, source })
}

/// Subscribes what the traffic needs; the connection, and the count of uplinks received.
async fn connect_broker(
    args: &Args,
    traffic: &Traffic,
    url: &str,
    run: &Arc<str>,
) -> Result<(Broker, Arc<AtomicU64>), Error> {
    let tally = Tally::new(run.clone(), args.first, args.devices, args.device_id.clone());
    let received = tally.received();
    let mut topics = Vec::new();
    if traffic.uplink.is_some() {
        topics.push(uplink::TOPIC);
    }
    if traffic.downlink.is_some() {
        topics.push(downlink::ANSWER_TOPIC);
    }
    let settings = BrokerSettings {
        url,
        username: args.mqtt_username.as_deref(),
        password: args.mqtt_password.as_deref(),
        client_id: format!("tcpc-load-{run}"),
    };
    let broker = Broker::connect(settings, &topics, tally, Answers::new(run)).await?;
    Ok((broker, received))
}

/// The devices: in this process, or in shard processes.
enum Shards {
    Local(Fleet),
    Processes(Children),
}

impl Shards {
    fn progress(&self) -> Result<Progress, Error> {
        match self {
            Shards::Local(fleet) => Ok(fleet.progress()),
            Shards::Processes(children) => children.progress(),
        }
    }

    async fn order(&mut self, order: Order) -> Result<(), Error> {
        match self {
            Shards::Local(fleet) => {
                fleet.order(order);
                Ok(())
            }
            Shards::Processes(children) => children.order(order).await,
        }
    }

    async fn stop(self) -> Result<ShardReport, Error> {
        match self {
            Shards::Local(fleet) => Ok(fleet.stop().await),
            Shards::Processes(children) => children.stop().await,
        }
    }
}

/// SIGINT and SIGTERM received so far.
struct Signals(Arc<AtomicU32>);

impl Signals {
    fn watch() -> Signals {
        let count = Arc::new(AtomicU32::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            loop {
                tokio::select! {
                    interrupted = tokio::signal::ctrl_c() => if interrupted.is_err() { return },
                    _ = terminate.recv() => {}
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Signals(count)
    }

    fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The line on stderr, once a second.
struct ProgressLine {
    devices: u64,
    began: Instant,
    next: Instant,
    /// Uplinks received, when the broker is watched.
    received: Option<Arc<AtomicU64>>,
    /// Received (or, without the broker, sent) at the last line, for the rate.
    last_count: u64,
}

impl ProgressLine {
    fn new(devices: u64, received: Option<Arc<AtomicU64>>) -> Self {
        let now = Instant::now();
        ProgressLine { devices, began: now, next: now + Duration::from_secs(1), received, last_count: 0 }
    }

    fn show(&mut self, progress: &Progress, published: Option<u64>) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_secs(1);
        let mut line = format!(
            "[{:>5.0}s] connected {}/{}",
            self.began.elapsed().as_secs_f64(),
            progress.connected,
            self.devices
        );
        if progress.sent > 0 {
            let received = self.received.as_ref().map(|r| r.load(Ordering::Relaxed));
            let count = received.unwrap_or(progress.sent);
            line.push_str(&format!(" | up sent {}", progress.sent));
            if let Some(received) = received {
                line.push_str(&format!(" received {received}"));
            }
            line.push_str(&format!(" ({}/s)", count.saturating_sub(self.last_count)));
            self.last_count = count;
        }
        if let Some(published) = published.filter(|p| *p > 0) {
            line.push_str(&format!(" | down published {published} received {}", progress.downlinks));
        }
        line.push_str(&format!(" | errors {}", progress.errors));
        eprintln!("{line}");
    }
}
