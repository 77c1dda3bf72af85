//! Many single-slot commands and scripts sent at once, on any Redis deployment.
//!
//! A pipeline to one server carries commands on any keys. The async Redis Cluster client
//! refuses a pipeline whose keys span slots (`CROSSSLOT`) instead of splitting it, so a
//! [`Batch`] knows each step's slot: on a cluster it sends one pipeline per slot, all at
//! once (the client's connections to the nodes are multiplexed: one round trip's worth
//! of waiting), and puts the replies back in the order the steps were added.
//!
//! Scripts go by digest (`EVALSHA`). A server without the script (restarted, or a
//! replica promoted in a failover: the script cache is not replicated) answers
//! `NOSCRIPT` without running it; those steps alone are sent again by body (`EVAL`,
//! which also caches it there).

use std::collections::HashMap;
use std::time::Duration;

use redis::cluster_routing::Slot;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, ServerErrorKind, ToRedisArgs, Value};

use super::RedisConnection;

/// A Lua script: its body and its digest.
pub struct Lua {
    code: &'static str,
    script: redis::Script,
}

impl Lua {
    pub fn new(code: &'static str) -> Self {
        Lua { code, script: redis::Script::new(code) }
    }

    /// A single call on `key` (`invoke_async` loads the script where it is missing).
    pub fn key(&self, key: impl ToRedisArgs) -> redis::ScriptInvocation<'_> {
        self.script.key(key)
    }
}

/// Steps whose replies come back together, one reply per step, in order.
#[derive(Default)]
pub struct Batch<'l> {
    steps: Vec<Step<'l>>,
}

struct Step<'l> {
    slot: Slot,
    call: Call<'l>,
}

enum Call<'l> {
    Command(Cmd),
    Script { lua: &'l Lua, keys: Vec<String>, args: Args },
}

/// A script's arguments (`ARGV`).
#[derive(Default)]
pub struct Args(Vec<Vec<u8>>);

impl Args {
    pub fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.0);
        self
    }
}

impl<'l> Batch<'l> {
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds the command `name key`; further arguments go on the command returned.
    pub fn command(&mut self, name: &str, key: &str) -> &mut Cmd {
        let mut command = redis::cmd(name);
        command.arg(key);
        self.steps.push(Step { slot: Slot::for_key(key), call: Call::Command(command) });
        match &mut self.steps.last_mut().expect("just pushed").call {
            Call::Command(command) => command,
            Call::Script { .. } => unreachable!("a command was pushed"),
        }
    }

    /// Adds a call of `lua` on `keys` (which must share one slot: hash tags); its
    /// arguments go on the [`Args`] returned.
    pub fn script(&mut self, lua: &'l Lua, keys: &[String]) -> &mut Args {
        let slot = Slot::for_key(keys.first().map_or("", String::as_str));
        debug_assert!(keys.iter().all(|key| Slot::for_key(key) == slot), "a script's keys share a slot");
        self.steps
            .push(Step { slot, call: Call::Script { lua, keys: keys.to_vec(), args: Args::default() } });
        match &mut self.steps.last_mut().expect("just pushed").call {
            Call::Script { args, .. } => args,
            Call::Command(_) => unreachable!("a script was pushed"),
        }
    }

    /// Sends every step; their replies in order.
    ///
    /// # Errors
    /// Redis could not be reached, or a step failed (the first failure is returned;
    /// the other steps ran).
    pub async fn query<T: FromRedisValue>(self, connection: &RedisConnection) -> RedisResult<Vec<T>> {
        self.replies(connection, None).await.into_iter().collect()
    }

    /// Sends every step; each step's reply or failure, in order. On a cluster a node
    /// that cannot be reached, or does not answer `within` (the client retries a
    /// failing node for longer), fails its own steps only: the others' replies count.
    pub async fn query_each<T: FromRedisValue>(
        self,
        connection: &RedisConnection,
        within: Duration,
    ) -> Vec<RedisResult<T>> {
        self.replies(connection, Some(within)).await
    }

    async fn replies<T: FromRedisValue>(
        self,
        connection: &RedisConnection,
        within: Option<Duration>,
    ) -> Vec<RedisResult<T>> {
        let mut replies: Vec<RedisResult<Value>> = self.steps.iter().map(|_| Ok(Value::Nil)).collect();
        let all: Vec<usize> = (0..self.steps.len()).collect();
        self.send(connection, &all, false, within, &mut replies).await;
        let missing: Vec<usize> =
            all.into_iter().filter(|&index| replies[index].as_ref().is_ok_and(lacks_script)).collect();
        if !missing.is_empty() {
            self.send(connection, &missing, true, within, &mut replies).await;
        }
        replies.into_iter().map(|reply| Ok(redis::from_redis_value(reply?.extract_error()?)?)).collect()
    }

    /// Sends the steps `indexes` (scripts by body if `by_body`), their replies into
    /// `replies`: one pipeline, or on a cluster one per slot, each bounded by `within`.
    async fn send(
        &self,
        connection: &RedisConnection,
        indexes: &[usize],
        by_body: bool,
        within: Option<Duration>,
        replies: &mut [RedisResult<Value>],
    ) {
        // Nothing to send (a worker with no partition to lease): no empty pipeline.
        if indexes.is_empty() {
            return;
        }
        let groups: Vec<Vec<usize>> = if connection.is_cluster() {
            let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
            for &index in indexes {
                by_slot.entry(self.steps[index].slot).or_default().push(index);
            }
            by_slot.into_values().collect()
        } else {
            vec![indexes.to_vec()]
        };
        let sent = groups.iter().map(|group| {
            let mut pipe = Pipeline::with_capacity(group.len());
            // Each step's reply is kept, failures included: a NOSCRIPT is answered here.
            pipe.ignore_errors();
            for &index in group {
                pipe.add_command(self.steps[index].call.command(by_body));
            }
            let mut connection = connection.clone();
            async move {
                let answers = pipe.query_async::<Vec<Value>>(&mut connection);
                match within {
                    Some(within) => tokio::time::timeout(within, answers).await.unwrap_or_else(|_| {
                        Err(RedisError::from((redis::ErrorKind::Io, "no answer in time")))
                    }),
                    None => answers.await,
                }
            }
        });
        for (group, answers) in groups.iter().zip(futures::future::join_all(sent).await) {
            let answers = answers.and_then(|answers| {
                if answers.len() == group.len() {
                    Ok(answers)
                } else {
                    Err(RedisError::from((redis::ErrorKind::UnexpectedReturnType, "a reply per step")))
                }
            });
            match answers {
                Ok(answers) => {
                    for (&index, answer) in group.iter().zip(answers) {
                        replies[index] = Ok(answer);
                    }
                }
                Err(error) => {
                    for &index in group {
                        replies[index] = Err(error.clone());
                    }
                }
            }
        }
    }
}

impl Call<'_> {
    fn command(&self, by_body: bool) -> Cmd {
        match self {
            Call::Command(command) => command.clone(),
            Call::Script { lua, keys, args } => {
                let mut command = if by_body { redis::cmd("EVAL") } else { redis::cmd("EVALSHA") };
                if by_body {
                    command.arg(lua.code);
                } else {
                    command.arg(lua.script.get_hash());
                }
                command.arg(keys.len()).arg(keys).arg(&args.0);
                command
            }
        }
    }
}

/// The server did not have the script and did not run the step.
fn lacks_script(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(error) if error.kind() == Some(ServerErrorKind::NoScript))
}
