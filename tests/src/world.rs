//! Everything a worker test needs: real nats-server, redis-server and mosquitto, and
//! the fake ThingsPanel backend; NATS or Redis may be clusters instead (`clusters`).

use serde_json::Value;

use crate::edge::TestEdge;
use crate::mqtt::Mosquitto;
use crate::platform::{FakePlatform, direct_device};
use crate::servers::{Endpoint, NatsServer, RedisServer};
use crate::worker::{EdgeProcess, WorkerProcess};

pub struct World<N = NatsServer, R = RedisServer> {
    pub nats: N,
    pub redis: R,
    pub broker: Mosquitto,
    pub platform: FakePlatform,
}

impl World {
    pub async fn start() -> Self {
        crate::init_logging();
        let (nats, redis, broker) =
            tokio::join!(NatsServer::spawn(), RedisServer::spawn(), Mosquitto::spawn());
        World { nats, redis, broker, platform: FakePlatform::spawn().await }
    }
}

impl<N: Endpoint, R: Endpoint> World<N, R> {
    /// A world on the NATS and Redis given (clusters).
    pub async fn on(nats: N, redis: R) -> Self {
        crate::init_logging();
        World { nats, redis, broker: Mosquitto::spawn().await, platform: FakePlatform::spawn().await }
    }

    /// A worker process with extra flags.
    pub async fn worker(&self, name: &str, extra: &[&str]) -> WorkerProcess {
        WorkerProcess::spawn(&self.nats, &self.redis, &self.broker, &self.platform, name, extra).await
    }

    /// An edge in this process. Worker tests drive many devices, and wrong tokens on
    /// purpose, from 127.0.0.1: the edge's per-source limits (tested on their own in
    /// `edge_faults`) are lifted so that what is tested is the worker's behaviour.
    pub async fn edge(&self) -> TestEdge {
        TestEdge::spawn(&self.nats, &self.redis, "edge-a", crate::edge::one_address_load).await
    }

    /// An edge process (killable).
    pub async fn edge_process(&self, pod: &str) -> EdgeProcess {
        EdgeProcess::spawn(&self.nats, &self.redis, pod, &[]).await
    }

    /// Registers a direct device with the platform; `template` is its CFG form values.
    pub fn device(&self, token: &str, id: &str, number: &str, template: Value) {
        let voucher = format!(r#"{{"access_token":"{token}"}}"#);
        self.platform.add(&voucher, direct_device(id, number, &voucher, template));
    }

    /// Registers the gateway of the platform's fixture (token `gw-token-001`, G001 with
    /// sub-devices S001 at 3c20c6206 and S002 at 3c20c6207).
    pub fn fixture_gateway(&self) {
        let fixture: Value =
            serde_json::from_str(include_str!("../fixtures/thingspanel/device_config_gateway.json")).unwrap();
        let data = fixture["data"].clone();
        let voucher = data["voucher"].as_str().unwrap().to_owned();
        self.platform.add(&voucher, data);
    }
}

/// Waits until the workers own every uplink partition between them, each some
/// (membership settled, no partition between owners).
pub async fn wait_for_partitions(workers: &[&WorkerProcess]) {
    crate::wait_until("the workers to share every partition", || async {
        let mut total = 0.0;
        for worker in workers {
            let owned = worker.metric("worker_partitions").await;
            if owned == 0.0 {
                return false;
            }
            total += owned;
        }
        total == f64::from(tcpc_proto::names::DEFAULT_PARTITIONS)
    })
    .await;
}

/// Which of `workers` holds the lease of `device_id`'s partition (the lease names the
/// worker and its boot nonce: `worker-a#1f2e3d4c`).
pub async fn partition_owner(w: &World, workers: &[WorkerProcess], device_id: &str) -> usize {
    partition_holder(w, workers, device_id).await.expect("the owner is one of ours")
}

/// Which of `workers` holds the lease of `device_id`'s partition now, if one does (none
/// while it is handed over: released by one, not yet taken by the other).
pub async fn partition_holder(w: &World, workers: &[WorkerProcess], device_id: &str) -> Option<usize> {
    let partition = tcpc_proto::names::partition_of(device_id, tcpc_proto::names::DEFAULT_PARTITIONS);
    let holder: Option<String> = redis::AsyncCommands::get(
        &mut w.redis.connection().await,
        tcpc_proto::names::partition_lease_key(partition),
    )
    .await
    .unwrap();
    let holder = holder?;
    workers
        .iter()
        .position(|worker| holder.strip_prefix(&worker.name).is_some_and(|rest| rest.starts_with('#')))
}
