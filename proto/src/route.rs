//! A device's route: which edge pod and connection hold it (the Redis hash of
//! [`crate::names::route_key`]).

use std::collections::HashMap;

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
    /// Reads a route hash; None when a field is missing (no route).
    pub fn from_fields(device_id: &str, fields: &HashMap<String, String>) -> Option<Self> {
        Some(Route {
            device_id: device_id.to_owned(),
            connection_id: fields.get(names::ROUTE_CONNECTION)?.clone(),
            pod: fields.get(names::ROUTE_POD)?.clone(),
            grpc_addr: fields.get(names::ROUTE_GRPC_ADDR)?.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_the_hash_fields() {
        let fields: HashMap<String, String> =
            [("conn", "c1"), ("pod", "edge-0"), ("addr", "10.0.0.1:50051"), ("since", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let route = Route::from_fields("d", &fields).unwrap();
        assert_eq!((route.connection_id.as_str(), route.grpc_addr.as_str()), ("c1", "10.0.0.1:50051"));
        assert_eq!(Route::from_fields("d", &HashMap::new()), None);
    }
}
