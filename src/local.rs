//! The all-in-one's in-process seams: the uplink bus (the edge hands each envelope
//! straight to the worker's pipeline) and the route table (a map with the same fencing
//! as the Redis scripts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use edge_gateway::routes::{Route, RouteError, RouteStore};
use edge_gateway::uplink::{AckFuture, BusError, UplinkBus};
use futures::future::BoxFuture;
use script_worker::auth::Authenticator;
use script_worker::pipeline::Pipeline;
use script_worker::routes::RouteLookup;
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
            let handled =
                self.pipeline.handle(envelope).await.map_err(|e| BusError::Publish(e.to_string()))?;
            let ack: AckFuture =
                Box::pin(async move { handled.await.map_err(|e| BusError::Ack(e.to_string())) });
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

/// Routes in memory, fenced by connection id like the Redis ones.
#[derive(Default)]
pub struct LocalRoutes {
    routes: Mutex<HashMap<String, Route>>,
}

impl LocalRoutes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RouteStore for LocalRoutes {
    fn register<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<Option<String>, RouteError>> {
        let replaced =
            self.lock().insert(route.device_id.clone(), route.clone()).map(|old| old.connection_id);
        Box::pin(async move { Ok(replaced) })
    }

    fn remove<'a>(
        &'a self,
        device_id: &'a str,
        connection_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, RouteError>> {
        let mut routes = self.lock();
        let owned = routes.get(device_id).is_some_and(|route| route.connection_id == connection_id);
        if owned {
            routes.remove(device_id);
        }
        Box::pin(async move { Ok(owned) })
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
    fn route<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Route>, String>> {
        let route = self.lock().get(device_id).cloned();
        Box::pin(async move { Ok(route) })
    }

    fn pod_alive<'a>(&'a self, _pod: &'a str) -> BoxFuture<'a, Result<bool, String>> {
        // The only pod is this process.
        Box::pin(async { Ok(true) })
    }

    fn purge<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<(), String>> {
        let removed = RouteStore::remove(self, &route.device_id, &route.connection_id);
        Box::pin(async move { removed.await.map(drop).map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(connection_id: &str) -> Route {
        Route {
            device_id: "d".into(),
            connection_id: connection_id.into(),
            pod: "local".into(),
            grpc_addr: "127.0.0.1:50051".into(),
        }
    }

    #[tokio::test]
    async fn routes_are_fenced_like_the_redis_ones() {
        let routes = LocalRoutes::default();
        assert_eq!(routes.register(&route("c1")).await.unwrap(), None);
        assert_eq!(routes.register(&route("c2")).await.unwrap(), Some("c1".to_owned()));
        assert!(!routes.remove("d", "c1").await.unwrap(), "the late close of c1 keeps c2's route");
        assert_eq!(routes.route("d").await.unwrap().unwrap().connection_id, "c2");
        assert!(routes.remove("d", "c2").await.unwrap());
        assert_eq!(routes.route("d").await.unwrap(), None);
    }
}
