//! Where devices come from: the platform's HTTP API (with caches), or a local devices
//! file (the all-in-one without a platform). One trait, so the auth responder and the
//! pipelines do not care which.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::devices::{Device, DeviceKind, DeviceSettings, SubDevice};

/// The answer to "who is this AccessToken?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<Device>),
    /// Not a device; the message is for the device.
    Unknown(String),
}

/// A device could not be looked up now; every case is transient (asked again later).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The platform failed recently: calls back off.
    #[error("platform unavailable, retrying")]
    BackingOff,
    /// This worker asked for the same voucher less than 3 s ago.
    #[error("asked the platform less than 3 s ago")]
    RateGated,
    /// Another worker is asking for the same voucher; its answer was not shared in time.
    #[error("another worker asked the platform less than 3 s ago")]
    AnotherWorker,
    /// The platform call failed and nothing is cached.
    #[error("device config")]
    Platform(#[source] crate::platform::client::PlatformError),
}

/// Who devices are.
pub trait DeviceSource: Send + Sync + 'static {
    /// The device an AccessToken belongs to.
    fn by_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Lookup, SourceError>>;
    /// A device by id (the pipelines, which see ids).
    fn by_id<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Arc<Device>>, SourceError>>;
    /// Drops what is cached of a device (its config changed).
    fn forget<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, ()>;
    /// Where a downlink for `reference` (a device number or id, of a device or a
    /// gateway's sub-device) goes.
    fn resolve<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<Option<Target>, SourceError>>;
}

/// Where a downlink goes: the device whose connection carries it, and the sub-device
/// address when it is for a gateway's sub-device.
#[derive(Clone, Debug)]
pub struct Target {
    /// The device that holds the connection (a direct device or a gateway).
    pub carrier: Arc<Device>,
    /// The id of the device the downlink is for (answers are published under it).
    pub device_id: String,
    pub sub_address: Option<String>,
}

/// The targets a device answers to: itself by id and number, and each of its
/// sub-devices by id and number.
pub fn targets_of(device: &Arc<Device>) -> Vec<(String, Target)> {
    let own = Target { carrier: device.clone(), device_id: device.id.clone(), sub_address: None };
    let mut targets = vec![(device.id.clone(), own.clone()), (device.number.clone(), own)];
    for sub in &device.sub_devices {
        let target = Target {
            carrier: device.clone(),
            device_id: sub.id.clone(),
            sub_address: Some(sub.address.clone()),
        };
        targets.push((sub.id.clone(), target.clone()));
        targets.push((sub.number.clone(), target));
    }
    targets
}

/// Devices from a TOML file:
///
/// ```toml
/// [[device]]
/// token = "tp-token-1"          # the AccessToken
/// id = "6b1f0c9e-…"             # the platform's device id (any unique string here)
/// number = "D001"
/// type = "direct"               # direct (default) | gateway
/// protocol = "custom"           # and the other CFG form keys: framing, delimiter,
/// framing = "delimiter"         # uplink_script, downlink_script, cmd1_maps_to, …
/// uplink_script = "lib:meter"
///
/// [[device.sub_devices]]        # gateways
/// id = "…"
/// number = "S001"
/// address = "3c20c6206"
/// ```
pub struct FileDevices {
    by_token: HashMap<String, Arc<Device>>,
    by_id: HashMap<String, Arc<Device>>,
    targets: HashMap<String, Target>,
}

#[derive(Deserialize)]
struct DevicesFile {
    #[serde(default)]
    device: Vec<FileDevice>,
}

#[derive(Deserialize)]
struct FileDevice {
    token: String,
    id: String,
    #[serde(default)]
    number: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    sub_devices: Vec<SubDevice>,
    /// Every other key: the CFG form's values.
    #[serde(flatten)]
    settings: Map<String, Value>,
}

/// The devices file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl FileDevices {
    /// Reads and checks the whole file.
    ///
    /// # Errors
    /// Unreadable, not TOML of this shape, a bad setting, a duplicate token or id.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| FileError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| FileError::Invalid { path: path.display().to_string(), message })
    }

    /// Parses the file's text.
    ///
    /// # Errors
    /// What is wrong, naming the device.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: DevicesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut devices =
            FileDevices { by_token: HashMap::new(), by_id: HashMap::new(), targets: HashMap::new() };
        for entry in file.device {
            let kind = match entry.kind.as_deref() {
                None => DeviceKind::Direct,
                Some(text) => DeviceKind::parse(text)
                    .ok_or_else(|| format!("device {}: unknown type {text:?}", entry.id))?,
            };
            let settings = DeviceSettings::from_form(&entry.settings)
                .map_err(|e| format!("device {}: {e}", entry.id))?;
            let device = Arc::new(Device {
                id: entry.id.clone(),
                number: if entry.number.is_empty() { entry.id.clone() } else { entry.number },
                voucher_digest: String::new(),
                kind,
                sub_devices: entry.sub_devices,
                settings,
            });
            if devices.by_token.insert(entry.token, device.clone()).is_some() {
                return Err(format!("device {}: its token is used twice", entry.id));
            }
            devices.targets.extend(targets_of(&device));
            if devices.by_id.insert(entry.id.clone(), device).is_some() {
                return Err(format!("device id {} is used twice", entry.id));
            }
        }
        Ok(devices)
    }
}

impl DeviceSource for FileDevices {
    fn by_token<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Lookup, SourceError>> {
        let found = self.by_token.get(token).cloned();
        Box::pin(async move {
            Ok(found.map_or_else(|| Lookup::Unknown("unknown access token".to_owned()), Lookup::Found))
        })
    }

    fn by_id<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<Option<Arc<Device>>, SourceError>> {
        let found = self.by_id.get(device_id).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn forget<'a>(&'a self, _device_id: &'a str) -> BoxFuture<'a, ()> {
        // The file is the truth and is read at start; nothing is cached.
        Box::pin(async {})
    }

    fn resolve<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<Option<Target>, SourceError>> {
        let found = self.targets.get(reference).cloned();
        Box::pin(async move { Ok(found) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Framing;

    const FILE: &str = r#"
[[device]]
token = "tp-1"
id = "dev-1"
number = "D001"

[[device]]
token = "custom-1"
id = "dev-2"
protocol = "custom"
framing = "delimiter"
delimiter = "\\r\\n"
uplink_script = "lib:meter"

[[device]]
token = "gw-1"
id = "gw"
type = "gateway"
[[device.sub_devices]]
id = "sub-1"
number = "S001"
address = "3c20c6206"
"#;

    #[tokio::test]
    async fn devices_by_token_and_id() {
        let devices = FileDevices::parse(FILE).unwrap();
        let Lookup::Found(custom) = devices.by_token("custom-1").await.unwrap() else { panic!() };
        assert_eq!(custom.settings.framing, Framing::Delimiter { delimiter: b"\r\n".to_vec() });
        assert_eq!(custom.settings.uplink_script.as_deref(), Some("lib:meter"));
        assert_eq!(custom.number, "dev-2", "number defaults to the id");
        let sub = devices.resolve("S001").await.unwrap().unwrap();
        assert_eq!((sub.carrier.id.as_str(), sub.device_id.as_str()), ("gw", "sub-1"));
        assert_eq!(sub.sub_address.as_deref(), Some("3c20c6206"));
        assert_eq!(devices.resolve("dev-2").await.unwrap().unwrap().sub_address, None);
        assert!(devices.resolve("nobody").await.unwrap().is_none());
        let gateway = devices.by_id("gw").await.unwrap().unwrap();
        assert_eq!(gateway.kind, DeviceKind::Gateway);
        assert_eq!(gateway.sub_device("3c20c6206").unwrap().number, "S001");
        assert_eq!(
            devices.by_token("nope").await.unwrap(),
            Lookup::Unknown("unknown access token".to_owned())
        );
    }

    #[test]
    fn mistakes_are_named() {
        let twice = "[[device]]\ntoken='a'\nid='x'\n[[device]]\ntoken='a'\nid='y'\n";
        assert_eq!(FileDevices::parse(twice).err().unwrap(), "device y: its token is used twice");
        let bad = "[[device]]\ntoken='a'\nid='x'\nframing='telepathy'\n";
        assert!(FileDevices::parse(bad).err().unwrap().contains("unknown framing"));
    }
}
