//! Several processes: with `--processes K` the run re-executes its own program K times
//! (`--shard`), each holding a disjoint share of the devices (one process may hold only
//! as many connections as its open-files limit). The parent keeps the broker side.
//!
//! A shard writes JSON lines on stdout: its progress every 250 ms, its report at the
//! end; it reads `start` (traffic), `drain` (stop sending) and `stop` (or the end of
//! stdin, when the parent is gone) on stdin.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;

use crate::args::{Args, Traffic};
use crate::devices::{DevicePlan, Fleet, Order, Progress, ShardReport};
use crate::error::Error;

/// What a shard tells its parent.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Event {
    Progress(Progress),
    Done(Box<ShardReport>),
}

const START: &str = "start";
const DRAIN: &str = "drain";
const STOP: &str = "stop";

fn order_line(order: Order) -> &'static str {
    match order {
        Order::Start => START,
        Order::Drain => DRAIN,
    }
}

/// How often a shard reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The parent's side: the shard processes.
pub struct Children {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    states: Arc<Mutex<Vec<State>>>,
    readers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    progress: Progress,
    done: Option<ShardReport>,
    /// Its stdout ended.
    ended: bool,
}

impl Children {
    /// Starts `args.processes` shards of `program`.
    ///
    /// # Errors
    /// A process could not be started.
    pub fn spawn(program: &Path, args: &Args, traffic: &Traffic, run: &str) -> Result<Children, Error> {
        let count = args.processes;
        let states = Arc::new(Mutex::new((0..count).map(|_| State::default()).collect::<Vec<_>>()));
        let mut children = Children { children: Vec::new(), stdins: Vec::new(), states, readers: Vec::new() };
        for index in 0..count {
            let mut child = Command::new(program)
                .args(args.shard_args(traffic, index, count, run))
                // The broker is the parent's; its credentials stay there.
                .env_remove("MQTT_URL")
                .env_remove("MQTT_USERNAME")
                .env_remove("MQTT_PASSWORD")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| Error::Spawn { index, source })?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                unreachable!("both piped above");
            };
            let states = children.states.clone();
            children.readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut states = states.lock().unwrap_or_else(|e| e.into_inner());
                    let state = &mut states[index as usize];
                    match serde_json::from_str(&line) {
                        Ok(Event::Progress(progress)) => state.progress = progress,
                        Ok(Event::Done(report)) => state.done = Some(*report),
                        // Not ours (a shard prints nothing else): its report is what counts.
                        Err(_) => {}
                    }
                }
                states.lock().unwrap_or_else(|e| e.into_inner())[index as usize].ended = true;
            }));
            children.children.push(child);
            children.stdins.push(stdin);
        }
        Ok(children)
    }

    /// The shards' progress summed.
    ///
    /// # Errors
    /// A shard ended before its report.
    pub fn progress(&self) -> Result<Progress, Error> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = Progress::default();
        for (index, state) in states.iter().enumerate() {
            if state.ended && state.done.is_none() {
                return Err(Error::ShardLost { index: index as u32 });
            }
            sum += state.progress;
        }
        Ok(sum)
    }

    /// Tells every shard.
    ///
    /// # Errors
    /// A shard's stdin is closed (it died).
    pub async fn order(&mut self, order: Order) -> Result<(), Error> {
        self.tell(order_line(order)).await
    }

    async fn tell(&mut self, command: &str) -> Result<(), Error> {
        for (index, stdin) in self.stdins.iter_mut().enumerate() {
            let line = format!("{command}\n");
            stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|source| Error::ShardIo { index: index as u32, source })?;
        }
        Ok(())
    }

    /// Stops the shards; their reports merged in device order.
    ///
    /// # Errors
    /// A shard ended without its report.
    pub async fn stop(mut self) -> Result<ShardReport, Error> {
        // A shard that already died is found missing below.
        let _ = self.tell(STOP).await;
        self.stdins.clear();
        for reader in self.readers {
            let _ = reader.await;
        }
        for child in &mut self.children {
            let _ = child.wait().await;
        }
        let states = std::mem::take(&mut *self.states.lock().unwrap_or_else(|e| e.into_inner()));
        let mut merged = ShardReport::default();
        for (index, state) in states.into_iter().enumerate() {
            merged.merge(state.done.ok_or(Error::ShardLost { index: index as u32 })?);
        }
        Ok(merged)
    }
}

/// The shard's side: holds its devices as the parent says, reporting on stdout.
///
/// # Errors
/// Bad settings, or the parent's pipes failed.
pub async fn serve(args: Args) -> Result<(), Error> {
    let traffic = args.traffic().map_err(Error::Settings)?;
    let edges = crate::run::edges(&args).await?;
    let run = args.run_id.clone().ok_or_else(|| Error::Settings("--shard needs --run-id".into()))?;
    let fleet = Fleet::start(DevicePlan::new(&args, &traffic, edges, &run));
    // A Ctrl-C in a terminal reaches the whole process group: the parent decides.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => tell(&mut out, &Event::Progress(fleet.progress())).await?,
            line = commands.next_line() => match line.map_err(Error::Parent)?.as_deref() {
                Some(START) => fleet.order(Order::Start),
                Some(DRAIN) => fleet.order(Order::Drain),
                Some(STOP) | None => break,
                Some(_) => {}
            },
        }
    }
    let report = fleet.stop().await;
    tell(&mut out, &Event::Done(Box::new(report))).await
}

async fn tell(out: &mut tokio::io::Stdout, event: &Event) -> Result<(), Error> {
    let mut line = serde_json::to_vec(event).expect("the events serialize");
    line.push(b'\n');
    out.write_all(&line).await.map_err(Error::Parent)?;
    out.flush().await.map_err(Error::Parent)
}
