//! The all-in-one's in-process seams: the uplink bus (the edge hands each envelope
//! straight to the worker's pipeline) and the route table (a map with the same fencing
//! as the Redis scripts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use edge_gateway::routes::{Claim, Leftovers, Reasserted, Registered, Route, RouteError, RouteStore};
use edge_gateway::uplink::{AckFuture, BusError, UplinkBus};
use futures::future::BoxFuture;
use script_worker::auth::Authenticator;
use script_worker::pipeline::Pipeline;
use script_worker::routes::{ClaimAndRoute, RouteLookup, RouteLookupError};
use tcpc_proto::v1::{AuthReply, AuthRequest};

/// Envelopes go straight to the pipeline; the edge's acknowledgement is the platform
/// sink's. Per-device order holds because each connection publishes one envelope at a
/// time (its window) and the pipeline queues a message before returning.
pub struct LocalBus {
    pub pipeline: Arc<Pipeline>,
    pub authenticator: Arc<Authenticator>,
}

impl UplinkBus for LocalBus {
    fn publish(
        &self,
        _subject: String,
        _message_id: String,
        envelope: Bytes,
    ) -> BoxFuture<'_, Result<AckFuture, BusError>> {
        Box::pin(async move {
            let epoch = self.pipeline.sink.epoch();
            let handled =
                self.pipeline.handle(envelope, epoch).await.map_err(|e| BusError::Publish(e.into()))?;
            let ack: AckFuture = Box::pin(async move { handled.await.map_err(|e| BusError::Ack(e.into())) });
            Ok(ack)
        })
    }

    fn authenticate(
        &self,
        request: AuthRequest,
        _timeout: std::time::Duration,
    ) -> BoxFuture<'_, Result<AuthReply, BusError>> {
        Box::pin(async move { Ok(self.authenticator.answer(&request).await) })
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Routes in memory, fenced by connection id and epoch like the Redis ones. The map
/// lives and dies with the process, so nothing is ever lost to re-assert and no other
/// pod can die: re-asserts find their routes held, and there is nothing to reap.
#[derive(Default)]
pub struct LocalRoutes {
    routes: Mutex<HashMap<String, (Route, u64)>>,
}

impl LocalRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Route, u64)>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RouteStore for LocalRoutes {
    fn register<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Registered, RouteError>> {
        let mut routes = self.lock();
        let held =
            routes.get(&claim.route.device_id).map(|(route, epoch)| (route.connection_id.clone(), *epoch));
        let epoch = held.as_ref().map_or(claim.epoch, |(_, held)| claim.epoch.max(held + 1));
        routes.insert(claim.route.device_id.clone(), (claim.route.clone(), epoch));
        let registered = Registered { replaced: held.map(|(connection, _)| connection), epoch };
        Box::pin(async move { Ok(registered) })
    }

    fn reassert<'a>(&'a self, claims: &'a [Claim]) -> BoxFuture<'a, Result<Vec<Reasserted>, RouteError>> {
        let mut routes = self.lock();
        let outcomes = claims
            .iter()
            .map(|claim| match routes.get(&claim.route.device_id) {
                Some((route, _)) if route.connection_id == claim.route.connection_id => Reasserted::Held,
                Some((_, epoch)) if *epoch >= claim.epoch => Reasserted::Superseded,
                _ => {
                    routes.insert(claim.route.device_id.clone(), (claim.route.clone(), claim.epoch));
                    Reasserted::Restored
                }
            })
            .collect();
        Box::pin(async move { Ok(outcomes) })
    }

    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
        _pod: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>> {
        let mut routes = self.lock();
        let owned = routes.get(device_id).is_some_and(|(route, _)| route.connection_id == connection_id);
        if owned {
            routes.remove(device_id);
        }
        Box::pin(async move { Ok(owned) })
    }

    fn claim_dead_pods<'a>(&'a self, _me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RouteError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn leftovers_of_pod<'a>(&'a self, _pod: &'a str) -> BoxFuture<'a, Result<Leftovers, RouteError>> {
        // Every route is this process's, and an earlier process's died with it.
        Box::pin(async { Ok(Leftovers::default()) })
    }

    fn clear_leftovers<'a>(
        &'a self,
        _pod: &'a str,
        _routes: &'a [Route],
        _orphans: &'a [String],
    ) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async { Ok(()) })
    }

    fn reaped<'a>(&'a self, _pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async { Ok(()) })
    }

    fn keep_alive<'a>(&'a self, _pod: &'a str, _grpc_addr: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        // One process: it is alive while it answers.
        Box::pin(async { Ok(()) })
    }

    fn forget_pod<'a>(&'a self, _pod: &'a str) -> BoxFuture<'a, Result<(), RouteError>> {
        Box::pin(async { Ok(()) })
    }
}

impl RouteLookup for LocalRoutes {
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, RouteLookupError>> {
        let route = self.lock().get(device_id).map(|(route, _)| route.clone());
        Box::pin(async move { Ok(route) })
    }

    fn pod_alive<'a>(&'a self, _pod: &'a str) -> BoxFuture<'a, Result<bool, RouteLookupError>> {
        // The only pod is this process.
        Box::pin(async { Ok(true) })
    }

    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), RouteLookupError>> {
        let removed = RouteStore::remove(self, &route.device_id, &route.connection_id, &route.pod);
        Box::pin(async move { removed.await.map(drop).map_err(|e| RouteLookupError::Local(Box::new(e))) })
    }

    fn claim_and_route<'a>(&'a self, _digest: &'a str, device_id: &'a str) -> BoxFuture<'a, ClaimAndRoute> {
        let route = RouteLookup::route(self, device_id);
        // One process sees each downlink once: nothing to claim.
        Box::pin(async move { ClaimAndRoute { claim: Ok(true), route: route.await } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(connection_id: &str, epoch: u64) -> Claim {
        let route = Route {
            device_id: "d".into(),
            connection_id: connection_id.into(),
            pod: "local".into(),
            grpc_addr: "127.0.0.1:50051".into(),
        };
        Claim { route, epoch }
    }

    #[tokio::test]
    async fn routes_are_fenced_like_the_redis_ones() {
        let routes = LocalRoutes::default();
        let first = routes.register(&claim("c1", 10)).await.unwrap();
        assert_eq!(first, Registered { replaced: None, epoch: 10 });
        let second = routes.register(&claim("c2", 5)).await.unwrap();
        assert_eq!(
            second,
            Registered { replaced: Some("c1".to_owned()), epoch: 11 },
            "raised above the held epoch"
        );
        assert_eq!(
            routes.reassert(&[claim("c1", 10), claim("c2", 11)]).await.unwrap(),
            [Reasserted::Superseded, Reasserted::Held]
        );
        assert!(!routes.remove("d", "c1", "local").await.unwrap(), "the late close of c1 keeps c2's route");
        assert_eq!(routes.route("d").await.unwrap().unwrap().connection_id, "c2");
        assert!(routes.remove("d", "c2", "local").await.unwrap());
        assert_eq!(routes.route("d").await.unwrap(), None);
        assert_eq!(routes.reassert(&[claim("c2", 11)]).await.unwrap(), [Reasserted::Restored]);
    }
}
