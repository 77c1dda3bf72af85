//! The PROXY protocol header (v1 text, v2 binary) that cloud load balancers put before a
//! connection's first byte, carrying the client's address.
//!
//! Opt-in (`--proxy-protocol`): with it on, every connection of the device listeners
//! must start with a header, since a device could otherwise claim any address. The
//! header is bounded (v1: 107 bytes; v2: 16 + a length we cap at 512) before it is
//! buffered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Largest v2 address block we accept (addresses plus TLVs).
const V2_MAX_BODY: usize = 512;

/// A parsed header.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the stream the header took.
    pub length: usize,
    /// The client's address; None for a LOCAL (health check) or UNKNOWN connection,
    /// which keeps the TCP peer's.
    pub source: Option<SocketAddr>,
}

/// Why the first bytes are not a PROXY header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("expected a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Parses the header at the start of `buf`; None while more bytes are needed.
///
/// # Errors
/// The bytes cannot start a header, or the header is malformed.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..prefix] == V2_SIGNATURE[..prefix] && !buf.is_empty() && buf[0] == b'\r' {
        return parse_v2(buf);
    }
    let prefix = buf.len().min(6);
    if buf[..prefix] != b"PROXY "[..prefix] {
        return Err(ProxyError::Missing);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Err(ProxyError::Malformed("v1 header too long")) } else { Ok(None) };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError::Malformed("v1 header too long"));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::Malformed("v1 header not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let source = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4" | "TCP6", source, _destination, source_port, _destination_port] => {
            let ip: IpAddr = source.parse().map_err(|_| ProxyError::Malformed("v1 source address"))?;
            let port: u16 = source_port.parse().map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::Malformed("v1 fields")),
    };
    Ok(Some(Header { length: end + 2, source }))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    let body = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if body > V2_MAX_BODY {
        return Err(ProxyError::Malformed("v2 header too long"));
    }
    if buf.len() < 16 + body {
        return Ok(None);
    }
    let length = 16 + body;
    let addresses = &buf[16..length];
    let source = match (version_command & 0x0f, buf[13]) {
        // LOCAL: the balancer's own connection (health check).
        (0x0, _) => None,
        // PROXY over TCP/IPv4: src 4, dst 4, src port 2, dst port 2.
        (0x1, 0x11) if addresses.len() >= 12 => {
            let ip = Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addresses[8], addresses[9]])))
        }
        // PROXY over TCP/IPv6: src 16, dst 16, src port 2, dst port 2.
        (0x1, 0x21) if addresses.len() >= 36 => {
            let octets: [u8; 16] = addresses[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([addresses[32], addresses[33]]),
            ))
        }
        (0x1, _) => None,
        _ => return Err(ProxyError::Malformed("v2 command")),
    };
    Ok(Some(Header { length, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_split_anywhere() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7653\r\nTP";
        let end = header.len() - 2;
        for cut in 0..end {
            assert_eq!(parse(&header[..cut]), Ok(None), "cut at {cut}");
        }
        let parsed = parse(header).unwrap().unwrap();
        assert_eq!(parsed.length, end);
        assert_eq!(parsed.source, Some("203.0.113.7:51000".parse().unwrap()));
    }

    #[test]
    fn v1_tcp6_and_unknown() {
        let parsed = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 7653\r\n").unwrap().unwrap();
        assert_eq!(parsed.source, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().source, None);
    }

    #[test]
    fn v2_tcp4_and_local() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x1d, 0xe5]);
        assert_eq!(parse(&header[..20]), Ok(None));
        let parsed = parse(&header).unwrap().unwrap();
        assert_eq!((parsed.length, parsed.source), (28, Some("198.51.100.9:8080".parse().unwrap())));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap().unwrap(), Header { length: 16, source: None });
    }

    #[test]
    fn anything_else_is_refused_early_and_bounded() {
        assert_eq!(parse(b"TP\x00\x00"), Err(ProxyError::Missing));
        assert_eq!(parse(&[b'P'; 2]), Err(ProxyError::Missing));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyError::Malformed(_))));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Err(ProxyError::Malformed(_))));
    }
}
