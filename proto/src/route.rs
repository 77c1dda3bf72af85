//! A device's route: which edge pod and connection hold it (the Redis hash of
//! [`crate::names::route_key`]).

use crate::connect::Batch;
use crate::names;

/// Where a device's current connection lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub device_id: String,
    /// The fence: a route is only removed by the connection it names.
    pub connection_id: String,
    pub pod: String,
    /// host:port of the pod's EdgeGateway gRPC.
    pub grpc_addr: String,
}

impl Route {
    /// The hash fields a route is read from (what a route needs of the hash, not all of
    /// it), in the order [`Route::from_values`] takes them.
    const FIELDS: [&'static str; 3] = [names::ROUTE_CONNECTION, names::ROUTE_POD, names::ROUTE_GRPC_ADDR];

    /// Adds the read of `device_id`'s route to `batch`; its reply, as `[Option<String>; 3]`,
    /// goes to [`Route::from_values`].
    pub fn read(batch: &mut Batch<'_>, device_id: &str) {
        batch.command("HMGET", &names::route_key(device_id)).arg(&Self::FIELDS);
    }

    /// The route of what [`Route::read`] read; None when a field is missing (no route).
    pub fn from_values(
        device_id: &str,
        [connection_id, pod, grpc_addr]: [Option<String>; 3],
    ) -> Option<Self> {
        Some(Route {
            device_id: device_id.to_owned(),
            connection_id: connection_id?,
            pod: pod?,
            grpc_addr: grpc_addr?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_the_hash_fields() {
        let values = ["c1", "edge-0", "10.0.0.1:50051"].map(|value| Some(value.to_owned()));
        let route = Route::from_values("d", values).unwrap();
        assert_eq!((route.connection_id.as_str(), route.grpc_addr.as_str()), ("c1", "10.0.0.1:50051"));
        assert_eq!(Route::from_values("d", [Some("c1".to_owned()), None, None]), None);
        assert_eq!(Route::from_values("d", [None, None, None]), None);
    }
}
