//! Devices as the worker knows them, from the platform's device config or the local
//! devices file, and the per-device settings of our CFG form.
//!
//! Both sources carry the settings as form values (a JSON object keyed by the form's
//! `dataKey`s), so both go through [`DeviceSettings::from_form`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tcpc_proto::v1::{self, framing};

/// ThingsPanel's device_type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    #[default]
    Direct,
    Gateway,
    SubDevice,
}

impl DeviceKind {
    /// From the platform's `"1"`, `"2"`, `"3"` (or the file's names).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1" | "direct" => Some(DeviceKind::Direct),
            "2" | "gateway" => Some(DeviceKind::Gateway),
            "3" | "sub_device" => Some(DeviceKind::SubDevice),
            _ => None,
        }
    }
}

/// A gateway's sub-device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubDevice {
    pub id: String,
    pub number: String,
    /// The address the gateway keys this sub-device's data by.
    pub address: String,
}

/// Which listener a device is configured for (unset: either).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolChoice {
    Official,
    Custom,
}

/// What TP CMD 0x1 ("publish attributes") becomes on the platform. ThingsPanel 0.x
/// attributes are what v1.x calls telemetry, hence the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmd1Mapping {
    #[default]
    Telemetry,
    Attributes,
}

/// How a custom device's stream is cut (the edge does the cutting).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Framing {
    /// Bytes until a silence, or a full buffer (the original plugin's default).
    #[default]
    IdleGap,
    Delimiter {
        delimiter: Vec<u8>,
    },
    FixedLength {
        length: u32,
    },
    LengthField {
        offset: u32,
        width: u32,
        little_endian: bool,
        adjustment: i32,
    },
}

/// Our per-device settings (the CFG form).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSettings {
    pub protocol: Option<ProtocolChoice>,
    pub framing: Framing,
    /// Idle-gap framing: bytes per message at most (0: the edge's default, 1 KiB).
    pub buffer_size: u32,
    /// Idle-gap framing: the silence that ends a message in ms (0: the default, 50).
    pub idle_gap_ms: u32,
    /// Inline JavaScript, or `lib:<name>` for a script of the script library.
    pub uplink_script: Option<String>,
    pub downlink_script: Option<String>,
    pub cmd1: Cmd1Mapping,
}

/// A form value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("device setting {key}: {problem}")]
pub struct SettingsError {
    pub key: &'static str,
    pub problem: String,
}

fn text<'a>(form: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    form.get(key).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

/// A number given as a JSON number or a string of one (form inputs are strings).
fn number<T: TryFrom<i64>>(form: &Map<String, Value>, key: &'static str) -> Result<Option<T>, SettingsError> {
    let bad = |problem: &str| SettingsError { key, problem: problem.to_owned() };
    let value = match form.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| bad("not an integer"))?,
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().parse().map_err(|_| bad("not an integer"))?,
        Some(_) => return Err(bad("not a number")),
    };
    T::try_from(value).map(Some).map_err(|_| bad("out of range"))
}

/// Reads hex bytes: `0a0b`, `0a 0b`, `0x0a0b`.
///
/// # Errors
/// No digits, an odd number of them, or a non-hex digit.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let text = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).unwrap_or(text);
    let digits: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err("hex needs an even, non-zero number of digits".to_owned());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair: String = pair.iter().collect();
            u8::from_str_radix(&pair, 16).map_err(|_| format!("not hex: {pair:?}"))
        })
        .collect()
}

/// Reads a delimiter written as an escaped string (`\r\n`, `;`) or hex (`0x0d0a`).
pub fn parse_delimiter(text: &str) -> Result<Vec<u8>, String> {
    if text.starts_with("0x") || text.starts_with("0X") {
        return parse_hex(text);
    }
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            other => return Err(format!("unknown escape \\{}", other.map(String::from).unwrap_or_default())),
        }
    }
    if out.is_empty() {
        return Err("empty delimiter".to_owned());
    }
    Ok(out)
}

impl DeviceSettings {
    /// Parses the CFG form's values; absent keys take their defaults.
    ///
    /// # Errors
    /// A value that cannot be used, naming its key.
    pub fn from_form(form: &Map<String, Value>) -> Result<Self, SettingsError> {
        let protocol = match text(form, "protocol") {
            None => None,
            Some("official") => Some(ProtocolChoice::Official),
            Some("custom") => Some(ProtocolChoice::Custom),
            Some(other) => {
                return Err(SettingsError {
                    key: "protocol",
                    problem: format!("unknown protocol {other:?}"),
                });
            }
        };
        let cmd1 = match text(form, "cmd1_maps_to") {
            None | Some("telemetry") => Cmd1Mapping::Telemetry,
            Some("attributes") => Cmd1Mapping::Attributes,
            Some(other) => {
                return Err(SettingsError {
                    key: "cmd1_maps_to",
                    problem: format!("unknown mapping {other:?}"),
                });
            }
        };
        let framing = match text(form, "framing") {
            None | Some("idle_gap") => Framing::IdleGap,
            Some("delimiter") => {
                let raw = text(form, "delimiter").unwrap_or("\\n");
                let delimiter =
                    parse_delimiter(raw).map_err(|problem| SettingsError { key: "delimiter", problem })?;
                Framing::Delimiter { delimiter }
            }
            Some("fixed_length") => Framing::FixedLength {
                length: number(form, "fixed_length")?.filter(|&n| n > 0).ok_or(SettingsError {
                    key: "fixed_length",
                    problem: "a positive length is required".into(),
                })?,
            },
            Some("length_field") => Framing::LengthField {
                offset: number(form, "length_offset")?.unwrap_or(0),
                width: match number(form, "length_width")?.unwrap_or(2) {
                    w @ (1 | 2 | 4 | 8) => w,
                    _ => {
                        return Err(SettingsError {
                            key: "length_width",
                            problem: "must be 1, 2, 4 or 8".into(),
                        });
                    }
                },
                little_endian: text(form, "length_endian") == Some("little"),
                adjustment: number(form, "length_adjustment")?.unwrap_or(0),
            },
            Some(other) => {
                return Err(SettingsError { key: "framing", problem: format!("unknown framing {other:?}") });
            }
        };
        Ok(DeviceSettings {
            protocol,
            framing,
            buffer_size: number(form, "buffer_size")?.unwrap_or(0),
            idle_gap_ms: number(form, "idle_gap_ms")?.unwrap_or(0),
            uplink_script: text(form, "uplink_script").map(str::to_owned),
            downlink_script: text(form, "downlink_script").map(str::to_owned),
            cmd1,
        })
    }

    /// The framing as the edge takes it in the auth reply.
    pub fn framing_proto(&self) -> v1::Framing {
        let kind = match &self.framing {
            Framing::IdleGap => framing::Kind::IdleGap(v1::IdleGap {
                gap_ms: self.idle_gap_ms,
                buffer_size: self.buffer_size,
            }),
            Framing::Delimiter { delimiter } => framing::Kind::Delimiter(Bytes::from(delimiter.clone())),
            Framing::FixedLength { length } => framing::Kind::FixedLength(*length),
            Framing::LengthField { offset, width, little_endian, adjustment } => {
                framing::Kind::LengthField(v1::LengthField {
                    offset: *offset,
                    width: *width,
                    little_endian: *little_endian,
                    adjustment: *adjustment,
                })
            }
        };
        v1::Framing { kind: Some(kind) }
    }
}

/// A device, ready to authenticate and to have its data mapped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub number: String,
    /// The digest of the device's voucher ([`crate::platform::voucher::digest`]), what
    /// the platform's rate limit and the config caches key it by; empty when not known
    /// (a device file, an old cache entry).
    #[serde(default)]
    pub voucher_digest: String,
    pub kind: DeviceKind,
    pub sub_devices: Vec<SubDevice>,
    pub settings: DeviceSettings,
}

impl Device {
    /// The sub-device a gateway keys by `address`.
    pub fn sub_device(&self, address: &str) -> Option<&SubDevice> {
        self.sub_devices.iter().find(|s| s.address == address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn form(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn empty_form_is_the_defaults() {
        assert_eq!(DeviceSettings::from_form(&Map::new()).unwrap(), DeviceSettings::default());
    }

    #[test]
    fn form_values_as_the_platform_sends_them() {
        let settings = DeviceSettings::from_form(&form(json!({
            "protocol": "custom", "framing": "length_field", "length_offset": "1", "length_width": 2,
            "length_endian": "little", "length_adjustment": "-2", "uplink_script": "lib:meter",
            "cmd1_maps_to": "attributes", "buffer_size": ""
        })))
        .unwrap();
        assert_eq!(settings.protocol, Some(ProtocolChoice::Custom));
        assert_eq!(
            settings.framing,
            Framing::LengthField { offset: 1, width: 2, little_endian: true, adjustment: -2 }
        );
        assert_eq!(settings.uplink_script.as_deref(), Some("lib:meter"));
        assert_eq!(settings.cmd1, Cmd1Mapping::Attributes);
        assert_eq!(settings.buffer_size, 0);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = DeviceSettings::from_form(&form(json!({"framing": "fixed_length"}))).unwrap_err();
        assert_eq!(err.key, "fixed_length");
        let err = DeviceSettings::from_form(&form(json!({"framing": "length_field", "length_width": "3"})))
            .unwrap_err();
        assert_eq!(err.to_string(), "device setting length_width: must be 1, 2, 4 or 8");
    }

    #[test]
    fn delimiters() {
        assert_eq!(parse_delimiter("\\r\\n").unwrap(), b"\r\n");
        assert_eq!(parse_delimiter("0x0D0a").unwrap(), b"\r\n");
        assert_eq!(parse_delimiter(";").unwrap(), b";");
        assert!(parse_delimiter("0x0").is_err());
        assert!(parse_delimiter("\\q").is_err());
        assert_eq!(parse_hex("0a 0B").unwrap(), [0x0a, 0x0b]);
        assert!(parse_hex("0a0").is_err());
        assert!(parse_hex("zz").is_err());
    }

    #[test]
    fn framing_goes_to_the_edge_as_proto() {
        let settings = DeviceSettings {
            framing: Framing::Delimiter { delimiter: b"\n".to_vec() },
            ..Default::default()
        };
        assert_eq!(settings.framing_proto().kind, Some(framing::Kind::Delimiter(Bytes::from_static(b"\n"))));
    }
}
