//! # The `nbd` cfgstring: an NBD URI
//!
//! A TCMU device served by this handler is configured with `dev_config=nbd/<URI>`, where the
//! URI follows the NBD URI standard (the syntax qemu and libnbd accept):
//!
//! - `nbd://host[:port]/export`: TCP (default port 10809, the port IANA assigned to NBD);
//!   `host` may be a name, an IPv4 address or a bracketed IPv6 address.
//! - `nbd+unix:///export?socket=/path/to/socket`: a Unix socket.
//!
//! The export name is the path after the first `/`, percent-decoded (empty: the server's
//! default export). TLS (`nbds://`, `nbds+unix://`) is refused for now with a message that
//! says so, as are query parameters other than `socket` and anything after `#`.
//!
//! The cfgstring comes from whoever configured the backstore: it is parsed strictly and never
//! panics.

use std::path::PathBuf;

use thiserror::Error;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an export lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP server.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix {
        /// The socket's absolute path.
        socket: PathBuf,
    },
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server.
    pub endpoint: Endpoint,
    /// The export's name (may be empty: the default export).
    pub export: String,
}

/// Why a cfgstring is not an NBD URI this handler accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("nbd cfgstring {uri:?}: {why}")]
pub struct UriError {
    /// The cfgstring (shortened).
    pub uri: String,
    /// What is wrong.
    pub why: String,
}

fn err(uri: &str, why: impl Into<String>) -> UriError {
    UriError {
        uri: uri.chars().take(256).collect(),
        why: why.into(),
    }
}

fn percent_decode(uri: &str, s: &str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| err(uri, format!("bad percent escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let text = String::from_utf8(out).map_err(|_| err(uri, "not UTF-8 once decoded"))?;
    if text.contains('\0') {
        return Err(err(uri, "contains a NUL byte"));
    }
    Ok(text)
}

/// Parses a cfgstring (the part after `nbd/`).
pub fn parse(uri: &str) -> Result<Target, UriError> {
    if uri.len() > 4096 {
        return Err(err(uri, "longer than 4096 bytes"));
    }
    if uri.contains('#') {
        return Err(err(uri, "a fragment (#...) has no meaning here"));
    }
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        err(
            uri,
            "not a URI: expected nbd://host/export or nbd+unix:///export?socket=PATH",
        )
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (
            rest.get(..i).unwrap_or_default(),
            rest.get(i + 1..).unwrap_or_default(),
        ),
        None => (rest, ""),
    };
    let export = percent_decode(uri, path)?;
    if export.len() > crate::wire::MAX_STRING {
        return Err(err(uri, "export name longer than 4096 bytes"));
    }
    let mut socket = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "socket" => socket = Some(percent_decode(uri, v)?),
            "tls-certificates" | "tls-psk-file" | "tls-hostname" | "tls-verify-peer" => {
                return Err(err(uri, "TLS is not supported by this handler yet"));
            }
            other => return Err(err(uri, format!("unknown query parameter {other:?}"))),
        }
    }
    let endpoint = match scheme {
        "nbd" | "nbd+tcp" => {
            if socket.is_some() {
                return Err(err(uri, "socket= belongs to nbd+unix:// URIs"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| err(uri, "unclosed [ in the host"))?;
                let port = match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if after.is_empty() => None,
                    None => return Err(err(uri, "garbage after the IPv6 address")),
                };
                (h.to_owned(), port)
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), Some(p)),
                    None => (authority.to_owned(), None),
                }
            };
            if host.is_empty() {
                return Err(err(uri, "no host"));
            }
            if host.contains('@') {
                return Err(err(uri, "user names are not supported"));
            }
            if !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
            {
                return Err(err(
                    uri,
                    format!("host {host:?} has characters a host cannot"),
                ));
            }
            let port =
                match port {
                    None => DEFAULT_PORT,
                    Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                        err(uri, format!("port {p:?} is not a number in 1..=65535"))
                    })?,
                };
            Endpoint::Tcp { host, port }
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(err(
                    uri,
                    "nbd+unix:// takes no host (three slashes: nbd+unix:///export)",
                ));
            }
            let socket =
                socket.ok_or_else(|| err(uri, "nbd+unix:// needs ?socket=/path/to/socket"))?;
            if !socket.starts_with('/') {
                return Err(err(uri, "the socket path must be absolute"));
            }
            Endpoint::Unix {
                socket: PathBuf::from(socket),
            }
        }
        "nbds" | "nbds+unix" | "nbds+tcp" => {
            return Err(err(
                uri,
                "TLS (nbds://) is not supported by this handler yet",
            ));
        }
        other => return Err(err(uri, format!("unknown scheme {other:?}"))),
    };
    Ok(Target { endpoint, export })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> Target {
        Target {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(parse("nbd://srv/disk0"), Ok(tcp("srv", 10809, "disk0")));
        assert_eq!(
            parse("nbd://10.0.0.1:10900/a%20b"),
            Ok(tcp("10.0.0.1", 10900, "a b"))
        );
        assert_eq!(parse("nbd://[::1]:7000/"), Ok(tcp("::1", 7000, "")));
        assert_eq!(parse("nbd://srv"), Ok(tcp("srv", 10809, "")));
        assert_eq!(
            parse("nbd://srv/dir/file"),
            Ok(tcp("srv", 10809, "dir/file"))
        );
        assert_eq!(
            parse("nbd+unix:///exp?socket=/run/nbd/s.sock"),
            Ok(Target {
                endpoint: Endpoint::Unix {
                    socket: "/run/nbd/s.sock".into()
                },
                export: "exp".into()
            })
        );
    }

    #[test]
    fn refused_forms_say_why() {
        for (uri, why) in [
            ("/srv/disk.img", "not a URI"),
            ("nbds://srv/x", "TLS"),
            ("nbd://srv/x?tls-certificates=/x", "TLS"),
            ("nbd://srv:0/x", "port"),
            ("nbd://srv:99999/x", "port"),
            ("nbd://:10809/x", "no host"),
            ("nbd://u@srv/x", "user"),
            ("nbd://[::1/x", "unclosed"),
            ("nbd+unix:///x", "socket="),
            ("nbd+unix:///x?socket=rel.sock", "absolute"),
            ("nbd+unix://host/x?socket=/s", "no host"),
            ("nbd://srv/x?socket=/s", "belongs"),
            ("nbd://srv/x?frob=1", "unknown query"),
            ("nbd://srv/%zz", "percent"),
            ("nbd://srv/%00", "NUL"),
            ("nbd://srv/x#frag", "fragment"),
            ("http://srv/x", "scheme"),
            ("nbd://sr v/x", "characters"),
        ] {
            let e = parse(uri).expect_err(uri).to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }
}
